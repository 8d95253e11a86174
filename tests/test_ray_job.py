"""The Ray-job path: launch/submit.py against a real local Ray head (launch/local_cluster.py).

The head is a separate cluster from the test session's ``ray_session`` (own ports, own temp dir,
token auth on); the tests only talk to it over HTTP through submit.py run as a subprocess, and
never call ``ray.init``. The pure tests at the top need no Ray at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


submit = _load("submit")


# ------------------------------------------------------------------------- pure: no Ray
def test_entrypoint_joins_the_cluster_and_quotes_words():
    args = submit.parse_args(["--config", "configs/cpu_smoke_ppo.yaml", "ppo.iterations=2",
                              "data.prompts=my file.jsonl", "--address", "http://10.0.0.5:8265"])
    overrides = submit.job_overrides(args, "/mnt/rlhf/runs/x")
    entry = submit.build_entrypoint("python", submit.stage_words(args.stage), args.config, overrides)
    assert entry == ("python -m rlhf_ray.cli ppo --config configs/cpu_smoke_ppo.yaml ppo.iterations=2 "
                     "'data.prompts=my file.jsonl' ray_address=auto")


def test_relative_run_dir_is_anchored_on_a_local_head_only(capsys):
    local = submit.parse_args(["--config", "c.yaml", "--working-dir", "/repo"])
    assert submit.job_overrides(local, "runs/smoke")[-1] == "run_dir=/repo/runs/smoke"
    remote = submit.parse_args(["--config", "c.yaml", "--address", "http://head.svc:8265"])
    assert submit.job_overrides(remote, "runs/smoke") == ["ray_address=auto"]
    assert "run_dir 'runs/smoke' is relative" in capsys.readouterr().err
    explicit = submit.parse_args(["--config", "c.yaml", "--address", "http://head:8265", "--run-dir", "/mnt/r"])
    assert submit.job_overrides(explicit, "runs/smoke")[-1] == "run_dir=/mnt/r"
    user = submit.parse_args(["--config", "c.yaml", "ray_address=10.0.0.1:6379"])
    assert "ray_address=auto" not in submit.job_overrides(user, "/abs")


def test_secrets_pass_by_name_and_never_print():
    args = submit.parse_args(["--config", "c.yaml", "--env", "NCCL_SOCKET_IFNAME=eth0",
                              "--env", "MY_API_KEY=k"])
    env, shown = submit.build_env(args, "cuda", {"HF_TOKEN": "hf_secret", "HOME": "/h"})
    assert env["HF_TOKEN"] == "hf_secret" and shown["HF_TOKEN"] == "***"
    assert shown["MY_API_KEY"] == "***" and "WANDB_API_KEY" not in env and "HOME" not in env
    assert shown["NCCL_SOCKET_IFNAME"] == "eth0" and shown["TOKENIZERS_PARALLELISM"] == "false"
    # NCCL_CUMEM_ENABLE is not forced (stale with vLLM 0.32 and NCCL 2.27+; it must match across a group).
    assert "NCCL_CUMEM_ENABLE" not in env and env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    cpu_env, _ = submit.build_env(submit.parse_args(["--config", "c.yaml"]), "cpu", {})
    assert cpu_env["DS_ACCELERATOR"] == "cpu" and "NCCL_CUMEM_ENABLE" not in cpu_env


def test_runtime_env_ships_code_not_packages():
    args = submit.parse_args(["--config", "c.yaml"])
    runtime_env = submit.build_runtime_env(args, {"A": "1"})
    assert runtime_env["working_dir"] == str(REPO)
    assert {".venv", "runs", ".git"} <= set(runtime_env["excludes"])
    assert not {"pip", "conda", "uv"} & set(runtime_env)
    assert "working_dir" not in submit.build_runtime_env(
        submit.parse_args(["--config", "c.yaml", "--no-working-dir"]), {})


def test_stage_names_are_checked():
    assert submit.stage_words("config check") == ["config", "check"]
    with pytest.raises(SystemExit, match="unknown --stage 'sft2'"):
        submit.stage_words("sft2")


def test_local_check_catches_typos_before_upload(capsys):
    with pytest.raises(SystemExit, match="did you mean ppo.kl_coef"):
        submit.main(["--config", "configs/cpu_smoke_ppo.yaml", "ppo.kl_cof=1"])


# ------------------------------------------------------------------------- a real head
@pytest.fixture(scope="module")
def head():
    local_cluster = _load("local_cluster")
    ray_bin = REPO / ".venv" / "bin" / "ray"
    with local_cluster.local_head(num_cpus=8, ray_bin=str(ray_bin) if ray_bin.exists() else None,
                                  auth="token") as h:
        yield h


def run_submit(head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **head.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(LAUNCH / "submit.py"), "--address", head.address, *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)


@pytest.mark.slow
def test_job_succeeds_and_its_logs_come_back(head):
    r = run_submit(head, "--stage", "config check", "--config", "configs/cpu_smoke_ppo.yaml",
                   "--wait", "--env", "HF_TOKEN_SHOULD_HIDE_TOKEN=zzz-secret-value")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "config ok" in r.stdout  # printed by the job's own process on the head
    assert "succeeded" in r.stdout
    assert "zzz-secret-value" not in r.stdout + r.stderr


@pytest.mark.slow
def test_failed_job_surfaces_its_own_error(head):
    r = run_submit(head, "--stage", "config check", "--config", "configs/cpu_smoke_ppo.yaml",
                   "ppo.kl_cof=0.1", "--skip-local-check", "--wait")
    assert r.returncode == 1, r.stdout + r.stderr
    # The job's stderr (rlhf-ray's ConfigError), streamed while it ran and repeated in the verdict.
    assert "unknown config key ppo.kl_cof; did you mean ppo.kl_coef?" in r.stdout
    verdict = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert "failed" in r.stderr and "did you mean ppo.kl_coef?" in r.stderr, verdict


@pytest.mark.slow
def test_short_ppo_job_writes_the_run_dir(head, tmp_path):
    run_dir = tmp_path / "run"
    r = run_submit(head, "--config", "configs/cpu_smoke_ppo.yaml", "--run-dir", str(run_dir),
                   "ppo.iterations=2", "rollout.num_engines=1", "policy.num_ranks=1", "critic.num_ranks=1",
                   "ppo.prompts_per_iteration=4", "rollout.max_new_tokens=4", "--wait", "--timeout", "540",
                   timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"run dir {run_dir}" in r.stdout  # the stage's own last line, from the job's logs
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
