#!/usr/bin/env python3
"""Submit an rlhf-ray stage to a Ray cluster as a Ray job (the Ray Job Submission API over HTTP).

    python launch/submit.py --address http://HEAD:8265 --config configs/llama8b_2x8gpu_ppo.yaml \
        [section.key=value ...] [--wait]

The job runs ``python -m rlhf_ray.cli <stage> --config <file> <overrides> ray_address=auto`` on
the cluster's head node: the driver joins the cluster it runs on and places every role there.

* Code: ``--working-dir`` (default: this repository, without .venv, runs, .git and caches) is
  uploaded with the job, so the job runs the code you have, not just what the image has. Packages
  are never installed by the job: the cluster's Python (the image, or the head's venv locally)
  must already have them. ``--no-working-dir`` uses only the code baked into the image.
* Environment: the platform's variables for the config's backend (rlhf_ray.platform), extras
  from ``--env KEY=VALUE``, and secrets passed through *by name* from this shell (``--pass-env``,
  default HF_TOKEN, WANDB_API_KEY and MLflow's MLFLOW_TRACKING_* credentials when set). Secret
  values are never printed. Note that a job's runtime env is visible to anyone who can read the
  cluster's dashboard: on Kubernetes, prefer the Secret mounted into the pods
  (k8s/base/secret.example.yaml).
* Results: the config's ``run_dir``. A relative one would land in the job's temporary working
  directory, so on a local head it is made absolute against the working directory (the same
  layout as a direct run from the repository root); on a remote cluster pass ``--run-dir`` on the
  shared volume (e.g. /mnt/rlhf/runs/NAME) or use a config whose run_dir is absolute.
* ``--wait`` follows the job's logs and exits with 0 when it succeeds, 1 with the job's own error
  when it fails, 3 when it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the config layer is needed for the local check, nothing heavier
    sys.path.insert(0, str(REPO))

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
WORKING_DIR_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache",
                        ".hypothesis", ".ruff_cache", "benchmarks/results", "k8s/rendered"]
DEFAULT_PASS_ENV = ["HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN"]
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIALS?)(_|$)", re.IGNORECASE)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# Needed because the driver's ray.init also sets runtime_env env_vars (rlhf_ray.stages.common
# init_ray); without it Ray refuses to merge the job's env with the driver's on any shared key.
ALWAYS_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "PYTHONUNBUFFERED": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                   help=f"Ray dashboard address (default $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--stage", default="ppo",
                   help="rlhf-ray command to run: a stage (ppo) or 'config check' / 'config show'")
    p.add_argument("--config", required=True, help="config file, relative to the working directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.iterations=2")
    p.add_argument("--working-dir", default=str(REPO), help="uploaded with the job (default: this repository)")
    p.add_argument("--no-working-dir", action="store_true", help="run the code baked into the cluster's image")
    p.add_argument("--exclude", action="append", default=[], help="extra working-dir exclude pattern")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env var")
    p.add_argument("--pass-env", action="append", default=None, metavar="NAME",
                   help=f"pass this variable from the current shell, value hidden (default: "
                        f"{', '.join(DEFAULT_PASS_ENV)} when set)")
    p.add_argument("--run-dir", help="override the config's run_dir (a path on the cluster)")
    p.add_argument("--python", default="python", help="Python on the cluster (default: python on its PATH)")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--skip-local-check", action="store_true",
                   help="submit without validating the config here first (the job reports errors)")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit code = job outcome")
    p.add_argument("--timeout", type=float, default=0, help="with --wait: stop the job after this many seconds")
    return p.parse_args(argv)


def stage_words(stage: str) -> list[str]:
    from rlhf_ray.cli import STAGES

    words = stage.split()
    if words[:1] == ["config"] and len(words) == 2 and words[1] in ("check", "show"):
        return words
    if len(words) == 1 and words[0] in STAGES:
        return words
    raise SystemExit(f"submit.py: unknown --stage {stage!r}; use one of {', '.join(STAGES)}, "
                     f"'config check', 'config show'")


def is_local(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in LOCAL_HOSTS


def job_overrides(args: argparse.Namespace, config_run_dir: str | None) -> list[str]:
    """The user's overrides plus what makes the job a cluster job (ray_address, run_dir)."""
    overrides = list(args.overrides)
    keys = {o.partition("=")[0].strip() for o in overrides}
    if "ray_address" not in keys:
        overrides.append("ray_address=auto")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    elif "run_dir" not in keys and config_run_dir and not os.path.isabs(config_run_dir):
        if is_local(args.address) and not args.no_working_dir:
            overrides.append(f"run_dir={Path(args.working_dir).resolve() / config_run_dir}")
        else:
            print(f"submit.py: warning: run_dir {config_run_dir!r} is relative; on a remote cluster the "
                  f"results land in the job's temporary working directory. Pass --run-dir on a shared "
                  f"volume.", file=sys.stderr)
    return overrides


def build_entrypoint(python: str, stage: list[str], config: str, overrides: list[str]) -> str:
    words = [python, "-m", "rlhf_ray.cli", *stage, "--config", config, *overrides]
    return " ".join(shlex.quote(w) for w in words)


def platform_env(backend: str) -> dict[str, str]:
    if backend not in ("cpu", "cuda"):
        return {}  # "auto": the driver decides on the cluster
    from rlhf_ray.platform import detect

    return detect(backend).process_env()


def build_env(args: argparse.Namespace, backend: str, environ: dict[str, str]) -> tuple[dict, dict]:
    """(env_vars for the job, the same with secret values masked for printing)."""
    env = {**ALWAYS_ENV, **platform_env(backend)}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"submit.py: --env {item!r} must look like KEY=VALUE")
        env[key] = value
    secret_keys = {k for k in env if SECRET_NAME.search(k)}
    names = DEFAULT_PASS_ENV if args.pass_env is None else args.pass_env
    for name in names:
        if name in environ:
            env[name] = environ[name]
            secret_keys.add(name)
        elif args.pass_env is not None:  # asked for explicitly: say it is missing
            print(f"submit.py: warning: --pass-env {name} is not set in this shell", file=sys.stderr)
    shown = {k: ("***" if k in secret_keys else v) for k, v in env.items()}
    return env, shown


def build_runtime_env(args: argparse.Namespace, env: dict[str, str]) -> dict:
    runtime_env: dict = {"env_vars": env}
    if not args.no_working_dir:
        runtime_env["working_dir"] = str(Path(args.working_dir).resolve())
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES + list(args.exclude)
    return runtime_env


def local_config(args: argparse.Namespace):
    """Validates the config here (milliseconds) so a typo fails before anything is uploaded."""
    from rlhf_ray.config import ConfigError, load_config

    path = Path(args.config)
    if not path.is_absolute() and not args.no_working_dir:
        path = Path(args.working_dir) / path
    try:
        return load_config(path, list(args.overrides))
    except ConfigError as e:
        raise SystemExit(f"submit.py: {e}") from None


def raw_run_dir_and_backend(args: argparse.Namespace) -> tuple[str | None, str]:
    """run_dir and backend as the file (plus overrides) give them, without validating."""
    import yaml

    path = Path(args.config)
    if not path.is_absolute() and not args.no_working_dir:
        path = Path(args.working_dir) / path
    raw = {}
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    raw = raw if isinstance(raw, dict) else {}
    run_dir, backend = raw.get("run_dir", "runs/default"), raw.get("backend", "auto")
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key.strip() == "run_dir":
            run_dir = value.strip()
        elif key.strip() == "backend":
            backend = value.strip()
    return (str(run_dir) if run_dir else None), str(backend)


def submit_with_retry(client, kwargs: dict, patience: float = 90.0) -> str:
    """A freshly started head answers HTTP before its job agent is up; wait for the agent."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, job_id: str, timeout: float) -> str:
    """Prints the job's logs as they come; returns the final status name."""
    from ray.job_submission import JobStatus

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + timeout if timeout > 0 else None

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        if deadline is None:
            asyncio.run(tail())
        else:
            asyncio.run(asyncio.wait_for(tail(), max(1.0, deadline - time.monotonic())))
    except TimeoutError:
        print(f"\nsubmit.py: --timeout {timeout:g}s reached; stopping job {job_id}", file=sys.stderr)
        client.stop_job(job_id)
    except Exception as e:  # noqa: BLE001 - log streaming is best effort; status decides
        print(f"submit.py: log stream ended ({type(e).__name__}: {e}); polling status", file=sys.stderr)
    while True:
        status = client.get_job_status(job_id)
        if status in terminal:
            return status.value
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
        time.sleep(1.0)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    stage = stage_words(args.stage)
    if not args.skip_local_check:
        local_config(args)
    run_dir, backend = raw_run_dir_and_backend(args)
    overrides = job_overrides(args, run_dir)
    entrypoint = build_entrypoint(args.python, stage, args.config, overrides)
    env, shown = build_env(args, backend, environ)
    runtime_env = build_runtime_env(args, env)

    from ray.job_submission import JobSubmissionClient

    print(f"submit.py: address     {args.address}")
    print(f"submit.py: entrypoint  {entrypoint}")
    print(f"submit.py: working dir {runtime_env.get('working_dir', '(image)')}")
    print("submit.py: env         " + " ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    client = JobSubmissionClient(args.address)
    job_id = submit_with_retry(client, {
        "entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": args.job_id,
        "entrypoint_num_cpus": args.entrypoint_num_cpus,
        "metadata": {"rlhf_ray_stage": " ".join(stage), "rlhf_ray_config": args.config}})
    print(f"submit.py: submitted job {job_id}")
    if not args.wait:
        print(f"submit.py: follow with: ray job logs --address {args.address} --follow {job_id}")
        return 0
    try:
        status = follow(client, job_id, args.timeout)
    except KeyboardInterrupt:
        print(f"\nsubmit.py: stopped following; the job keeps running. Stop it with: "
              f"ray job stop --address {args.address} {job_id}", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"submit.py: job {job_id} succeeded")
        return 0
    info = client.get_job_info(job_id)
    print(f"submit.py: job {job_id} {status.lower()}: {info.message or '(no message)'}", file=sys.stderr)
    return 1 if status == "FAILED" else 3


if __name__ == "__main__":
    sys.exit(main())
