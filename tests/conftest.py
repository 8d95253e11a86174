"""Shared fixtures: one local Ray instance per test session, one tiny model per session."""

from __future__ import annotations

import os

import pytest

# Tests run on CPU with the real stack; keep every process lean on a 2-core machine.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rlhf_ray.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,  # logical slots; actors are light and mostly wait on each other
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {k: os.environ[k] for k in (
                "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                "TOKENIZERS_PARALLELISM")}},
        )
    yield ray
    ray.shutdown()
