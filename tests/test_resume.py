"""Checkpoint and resume: atomic checkpoints, and a driver killed by a real signal that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.stages import checkpoint as ckpt
from rlhf_ray.tracking import MetricsWriter, open_trackers, truncate_jsonl


def _fake_learners(tmp: Path) -> None:
    (tmp / "policy").mkdir()
    (tmp / "policy" / "shard.pt").write_bytes(b"x" * 100)


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    for it in (2, 4, 6):
        path = ckpt.save_checkpoint(tmp_path, it, {"iteration": it}, "seed: 0\n", _fake_learners, keep_last=2)
        assert path.name == f"iter-{it:06d}" and (path / ckpt.COMPLETE).is_file()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["iter-000004", "iter-000006"]
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))["iteration"] == 6


def test_incomplete_checkpoints_are_ignored_with_a_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, {"iteration": 2}, "", _fake_learners)
    root = ckpt.checkpoint_root(tmp_path)
    (root / "iter-000008").mkdir()  # no COMPLETE marker
    (root / ".tmp-iter-000010").mkdir()  # a writer killed before the rename
    damaged = ckpt.save_checkpoint(tmp_path, 6, {"iteration": 6}, "", _fake_learners, keep_last=5)
    (damaged / "policy" / "shard.pt").write_bytes(b"x")  # wrong size: a copy cut short
    with pytest.warns(ckpt.IncompleteCheckpointWarning) as caught:
        latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "iter-000002"
    assert len(caught) == 3


@pytest.mark.parametrize("damage", ["every checkpoint damaged", "logs but no checkpoint"])
def test_resume_without_a_loadable_checkpoint_is_refused_and_loses_nothing(tmp_path, damage, capsys):
    """Refused before Ray starts: the earlier run's metrics, samples and config stay as they were."""
    from rlhf_ray.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logs = {"metrics.jsonl": '{"iteration": 1}\n{"iteration": 2}\n', "samples.jsonl": '{"iteration": 1}\n',
            "config.yaml": "seed: 7\n"}
    for name, text in logs.items():
        (run_dir / name).write_text(text)
    if damage == "every checkpoint damaged":
        ckpt.save_checkpoint(run_dir, 2, {"iteration": 2}, "", _fake_learners)
        (ckpt.checkpoint_root(run_dir) / "iter-000002" / "policy" / "shard.pt").write_bytes(b"x")
        (ckpt.checkpoint_root(run_dir) / ".tmp-iter-000004").mkdir()
    code = main(["ppo", "--resume", f"run_dir={run_dir}", "data.task=arithmetic", "model.tiny_hidden_size=64",
                 "logging.trackers=[]"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err and "Nothing was changed" in err and "Traceback" not in err
    if damage == "every checkpoint damaged":
        assert "iter-000002: policy/shard.pt is missing or has the wrong size" in err
        assert ".tmp-iter-000004: interrupted while writing" in err
    else:
        assert "holds the metrics of an earlier run but no checkpoint" in err
    for name, text in logs.items():
        assert (run_dir / name).read_text() == text, name


def test_an_empty_run_dir_is_refused():
    from rlhf_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="run_dir: must name a folder"):
        load_config(None, ["run_dir="])


def test_failed_writer_leaves_no_checkpoint(tmp_path):
    def boom(tmp: Path) -> None:
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path, 2, {"iteration": 2}, "", boom)
    assert ckpt.complete_checkpoints(tmp_path) == []


def test_truncate_jsonl_drops_lines_past_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6)) + '{"iteration": 6, "rew')
    assert truncate_jsonl(log, 3) == 3
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [1, 2, 3]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard shows them, read from every event file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_rewound_metrics_show_each_step_once_in_tensorboard(tmp_path):
    """A run logs steps 1-5 and dies; its successor resumes from step 3 and logs 4-6."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.trackers=[tensorboard]"])
    first = open_trackers(cfg, tmp_path, "ppo", "iteration")
    MetricsWriter(tmp_path, mirror=first.log_metrics).write_many(
        [{"iteration": i, "reward_mean": float(i)} for i in range(1, 6)])
    with open_trackers(cfg, tmp_path, "ppo", "iteration") as second:
        metrics = MetricsWriter(tmp_path, mirror=second.log_metrics)
        assert metrics.rewind(3) == 2
        second.rewind(3)
        metrics.write_many([{"iteration": i, "reward_mean": 10.0 * i} for i in range(4, 7)])
    assert tensorboard_scalars(tmp_path, "reward_mean") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                                            (6, 60.0)]


# --- a real driver, killed with SIGKILL mid-run, then resumed ----------------------------------

ITERATIONS, PROMPTS = 6, 16
TOKEN_ENV = "RLHF_RAY_TEST_REWARD_TOKEN"


def _overrides(run_dir: Path, reward_url: str) -> list[str]:
    """The reward is a remote HTTP endpoint that wants a bearer token."""
    return [f"run_dir={run_dir}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
            "scorers.use_task_gold_as_reward=false", f"scorers.http.urls=[{reward_url}]",
            f"scorers.http.token_env={TOKEN_ENV}",
            "rollout.max_new_tokens=8", "rollout.max_model_len=64", "data.max_prompt_tokens=32", "rollout.gpu_memory_utilization=0.05",
            "rollout.num_engines=1", "policy.num_ranks=1", "critic.num_ranks=1", "policy.micro_batch_size=16",
            "critic.micro_batch_size=16", f"ppo.prompts_per_iteration={PROMPTS}", f"ppo.iterations={ITERATIONS}",
            "ppo.kl_controller=proportional", "policy.lr=3e-3", "critic.lr=3e-3",
            "checkpoint.every=2", "checkpoint.resume=auto"]


def _driver(run_dir: Path, log: Path, server) -> subprocess.Popen:
    """``rlhf-ray ppo`` in its own process (and session), with its own local Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", TOKEN_ENV: server.token}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "ppo", *_overrides(run_dir, server.url())],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])


def _iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["iteration"] for x in path.read_text().splitlines() if x.strip().endswith("}")]


def _metrics_by_iteration(run_dir: Path) -> dict[int, dict]:
    """Each iteration's metrics less the clock's (phase times, throughput)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
            for r in rows}


def _assert_same_checkpoint(resumed: Path, unbroken: Path) -> None:
    """Every learner file (DeepSpeed's weights, optimizer and RNG states) and the driver's state
    hold equal values, bitwise."""
    files = sorted(str(p.relative_to(unbroken)) for p in unbroken.rglob("*.pt"))
    assert sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*.pt")) == files
    assert any("optim_states" in f for f in files) and any(f.startswith("critic/") for f in files), files
    for name in files:
        # Files this test's own runs just wrote; DeepSpeed's hold config objects besides tensors.
        a = torch.load(resumed / name, weights_only=False, map_location="cpu")
        b = torch.load(unbroken / name, weights_only=False, map_location="cpu")
        _assert_same(a, b, name)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif type(a).__module__ == "builtins":  # numbers, strings, None; DeepSpeed's config objects are skipped
        assert a == b or repr(a) == repr(b), f"{where}: {a!r} != {b!r}"  # repr: NaN equals NaN


def _dashboard_http(session: int) -> tuple[list[str], list[str]] | None:
    """(its command line, the addresses it listens on for HTTP) of the Ray dashboard of a process
    session; None if it has none. (Ray's internal gRPC ports are not the dashboard's API.)"""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if os.getsid(p.pid) == session and any("dashboard/dashboard.py" in a for a in cmdline):
                port = int(next(a.split("=", 1)[1] for a in cmdline if a.startswith("--port=")))
                return cmdline, [c.laddr.ip for c in p.net_connections(kind="inet")
                                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        except (psutil.Error, OSError):
            continue
    return None


def _kill_session(proc: subprocess.Popen) -> None:
    """What the killed driver leaves behind (its Ray, engine processes): same session, our child."""
    time.sleep(3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_without_gap_or_repeat(tmp_path, reward_server):
    from rlhf_ray.config import load_config
    from rlhf_ray.data.prompts import PromptStream, run_prompts
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = tmp_path / "run"
    first = _driver(run_dir, tmp_path / "first.log", reward_server)
    deadline = time.time() + 240
    # Kill once iteration 5 is logged: checkpoints 2 and 4 exist, and line 5 lies beyond them.
    dashboard = None
    while 5 not in _iterations(run_dir):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the first driver never reached iteration 5"
        if dashboard is None and _iterations(run_dir):  # Ray is up: look once, while waiting
            dashboard = _dashboard_http(first.pid)
            # The local Ray the driver started serves no dashboard beyond the loopback interface.
            assert dashboard is not None and "--host=127.0.0.1" in dashboard[0], dashboard
            assert set(dashboard[1]) <= {"127.0.0.1", "::1"}, dashboard
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    _kill_session(first)
    killed_at = max(_iterations(run_dir))
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["iter-000002", "iter-000004"]
    # The unbroken run to compare with: the killed driver's checkpoint 4 and its iterations 3-5,
    # taken away so that the second driver resumes from checkpoint 2 and does them again.
    straight = tmp_path / "unbroken-iter-000004"
    os.replace(ckpt.checkpoint_root(run_dir) / "iter-000004", straight)
    unbroken_rows = _metrics_by_iteration(run_dir)
    resume_from = 2
    assert killed_at > 4  # the killed run logged an iteration no checkpoint holds
    (ckpt.checkpoint_root(run_dir) / "iter-000099").mkdir()  # newest, but incomplete

    second = _driver(run_dir, tmp_path / "second.log", reward_server)
    try:
        rc = second.wait(300)
    finally:
        _kill_session(second)
    out = (tmp_path / "second.log").read_text()
    assert rc == 0, out[-3000:]
    assert "ignoring incomplete checkpoint" in out and "iter-000099" in out
    assert f"resumed from {ckpt.checkpoint_root(run_dir) / 'iter-000002'} at iteration {resume_from}" in out

    # Metrics: every iteration exactly once, in order.
    assert _iterations(run_dir) == list(range(1, ITERATIONS + 1))
    # Data: each iteration used the next prompts of the one seeded stream, none skipped or repeated.
    cfg = load_config(None, _overrides(run_dir, reward_server.url()))
    tokenizer = load_tokenizer(str(run_dir / "base_model"))
    stream = PromptStream(run_prompts(cfg.data, cfg.seed, tokenizer), cfg.seed, cfg.data.shuffle)
    logged = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == list(range(1, ITERATIONS + 1))
    for it, row in enumerate(logged, start=1):
        assert row["position"] == (it - 1) * PROMPTS
        assert row["prompts"] == stream.next_batch(PROMPTS), f"iteration {it}"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["prompts_position"] for r in rows] == [i * PROMPTS for i in range(ITERATIONS)]
    # The endpoint paid every iteration; the token travelled in each request's header and nowhere else.
    assert all("reward/http_mean" in r for r in rows)
    assert len(reward_server.seen) >= ITERATIONS
    assert {auth for _, auth in reward_server.seen} == {f"Bearer {reward_server.token}"}
    secret = reward_server.token.encode()
    leaks = [p for p in [*run_dir.rglob("*"), tmp_path / "first.log", tmp_path / "second.log"]
             if p.is_file() and secret in p.read_bytes()]
    assert leaks == []
    samples = {json.loads(x)["iteration"] for x in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert samples == set(range(1, ITERATIONS + 1))
    # TensorBoard: the killed run's event file holds steps past the checkpoint; the resumed run's
    # purge step hides them, so every step shows once.
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    assert [step for step, _ in tensorboard_scalars(run_dir, "reward_mean")] == list(range(1, ITERATIONS + 1))
    # Equivalence: iterations 3-5 after the resume are those of the unbroken run, and checkpoint 4
    # holds the same weights, optimizer states and driver state, bitwise (CPU, seeded sampling).
    resumed_rows = _metrics_by_iteration(run_dir)
    for it in (3, 4, 5):
        assert resumed_rows[it] == unbroken_rows[it], f"iteration {it}"
    _assert_same_checkpoint(ckpt.checkpoint_root(run_dir) / "iter-000004", straight)
    # The end of the run leaves a complete final checkpoint and the HF policy.
    assert ckpt.latest_checkpoint(run_dir).name == f"iter-{ITERATIONS:06d}"
    assert (run_dir / "policy" / "model.safetensors").exists()
