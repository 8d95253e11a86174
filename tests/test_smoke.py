"""The GPU smoke script's checks (``scripts/gpu_smoke.sh``), run here on CPU: they must pass on the
device-free path, and they must run where Ray and vLLM are not installed (the GPU machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Makes ``import ray`` and ``import vllm`` fail, as on a machine without them, then runs the module.
WITHOUT_RAY = ("import runpy, sys; sys.modules.update(ray=None, vllm=None); sys.argv[0] = 'smoke'; "
               "runpy.run_module('rlhf_ray.engines.smoke', run_name='__main__')")


@pytest.mark.slow
def test_the_smoke_checks_pass_on_cpu_without_ray_or_vllm():
    out = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--device", "cpu", "--hidden", "64", "--layers", "2",
                          "--steps", "2"], capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
                         env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = {r["check"]: r for r in lines if "check" in r}
    assert set(checks) == {"learner_zero0", "learner_zero2", "learner_zero3", "scoring", "weight_sync",
                           "ipc_handover", "rng_roundtrip"}
    assert all(r["ok"] for r in checks.values()), checks
    assert checks["learner_zero3"]["held_at_build"] == 0 < checks["learner_zero0"]["held_at_build"]
    assert checks["weight_sync"]["mean_gap_stale"] > 10 * checks["weight_sync"]["tolerance_mean"]
    assert checks["ipc_handover"]["buckets"] > checks["ipc_handover"]["slots"]  # the slots were reused
    assert lines[-1] == {"device": "cpu", "checks": 7, "failed": 0}
