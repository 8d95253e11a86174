#!/usr/bin/env python3
"""Start a local Ray head, submit a job to it through launch/submit.py, stop the head.

    .venv/bin/python launch/local_cluster.py [--num-cpus 8] [--keep] -- \
        --config configs/cpu_smoke_ppo.yaml ppo.iterations=2 --wait

Everything after ``--`` goes to submit.py (its ``--address`` is filled in). The job takes the same
path as on a real cluster (HTTP job submission, working-dir upload, driver joining with
``ray_address=auto``, roles pinned by custom resources) on one machine:

* The head is ``<this Python's bin>/ray start --head --block`` on free ports, bound to 127.0.0.1,
  with its own ``--temp-dir``, so it never meets another Ray on the machine (a test session's
  ``ray.init()`` looks for clusters in the default temp dir only). It advertises the custom
  resources ``rollout`` and ``learner`` that the cluster configs pin roles to, like the KubeRay
  worker groups do. Jobs run in this Python: its bin folder leads the head's PATH.
* Token authentication (Ray 2.60) stays on: a fresh token is written into the temp dir and
  shared with the head, the driver and the submitter through RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH.
  ``RAY_AUTH_MODE=disabled`` in the environment (tests) turns it off.
* The head is stopped on every exit path by signalling the process group this script created
  (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.cluster.local import auth_env
from rlhf_ray.ports import free_ports

HERE = Path(__file__).resolve().parent
CUSTOM_RESOURCES = {"rollout": 100, "learner": 100}  # labels, not capacities: CPUs/GPUs limit


@dataclass
class Head:
    address: str  # http://127.0.0.1:<dashboard port>, for the Job Submission API
    gcs_address: str
    temp_dir: str
    env: dict[str, str]  # what a client of this head needs (auth) on top of os.environ
    process: subprocess.Popen


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path, timeout: float,
                        token: str | None) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log)}")
        try:
            request = urllib.request.Request(f"{address}/api/version", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RuntimeError(f"Ray dashboard at {address} refused the token ({e.code})") from None
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {address} not up after {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)  # ray start --block stops the processes it started
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything left in the process group this script created (a stuck worker)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def local_head(num_cpus: int = 8, ray_bin: str | None = None, auth: str | None = None,
               object_store_mb: int = 256, start_timeout: float = 120.0):
    """Yields a running ``Head``; always stops it and removes its temp dir."""
    ray_bin = ray_bin or str(Path(sys.executable).parent / "ray")
    auth = (auth or os.environ.get("RAY_AUTH_MODE") or "token").lower()
    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-head-", dir="/tmp")  # short: Ray's socket paths
    # Every port Ray would otherwise take at a fixed default (6379, 8265, 10001, 52365, ...) is
    # picked free, so this head starts next to any other Ray on the machine.
    ports = free_ports(9)
    gcs_port, dash_port = ports[0], ports[1]
    extra_ports = dict(zip(("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                            "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
                            "--node-manager-port", "--object-manager-port"), map(str, ports[2:]), strict=True))
    client_env, token = auth_env(auth, temp_dir)
    env = {**os.environ, **client_env}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # the file above is the one token
    env["PATH"] = f"{Path(ray_bin).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run this Python
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
           "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--resources", json.dumps(CUSTOM_RESOURCES), "--temp-dir", temp_dir,
           "--object-store-memory", str(object_store_mb * 1024 * 1024), "--disable-usage-stats",
           *(w for item in extra_ports.items() for w in item)]
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(address, proc, log, start_timeout, token)
        yield Head(address, f"127.0.0.1:{gcs_port}", temp_dir, client_env, proc)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, submit_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="launch/local_cluster.py", description=__doc__.split("\n")[0])
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPU slots of the head (roles mostly wait)")
    p.add_argument("--keep", action="store_true", help="after the job, keep the head up until Ctrl-C")
    args = p.parse_args(ours)
    if not submit_args:
        p.error("give submit.py's arguments after --, e.g. -- --config configs/cpu_smoke_ppo.yaml --wait")
    if any(a == "--address" or a.startswith("--address=") for a in submit_args):
        p.error("--address is set by this script")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs the head's cleanup too
    with local_head(num_cpus=args.num_cpus) as head:
        print(f"local_cluster: head up, dashboard {head.address} (auth {head.env['RAY_AUTH_MODE']})", flush=True)
        cmd = [sys.executable, str(HERE / "submit.py"), "--address", head.address, *submit_args]
        rc = subprocess.call(cmd, env={**os.environ, **head.env})
        if args.keep:
            print(f"local_cluster: keeping the head; RAY_AUTH_TOKEN_PATH={head.env.get('RAY_AUTH_TOKEN_PATH', '')}"
                  f" ray job list --address {head.address}; Ctrl-C stops it", flush=True)
            try:
                while head.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        print("local_cluster: stopping the head", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
