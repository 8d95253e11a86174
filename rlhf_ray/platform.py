"""The one place where the CPU and GPU paths differ.

Everything else asks this module which torch.distributed backend, device and vLLM settings to
use. On a machine without CUDA: gloo, CPU, vLLM's CPU backend. With CUDA: NCCL, GPU, CUDA vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Platform:
    name: str  # "cpu" or "cuda"
    dist_backend: str  # torch.distributed backend for learners and weight sync
    device: str

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    @property
    def shm_weight_sync(self) -> bool:
        """Whether engines on the learner's node can take weights from a shared-memory segment.
        CPU only: on GPUs, engines on other GPUs of the node take the NCCL broadcast, and an engine
        on the learner's own GPU (``rollout.colocate``) takes CUDA IPC slots (``sync.ipc``)."""
        return self.is_cpu

    def vllm_engine_kwargs(self, gpu_memory_utilization: float, tensor_parallel_size: int = 1) -> dict:
        """Keyword arguments for ``vllm.LLM`` that depend on the hardware."""
        if self.is_cpu:
            # On the CPU backend this fraction is of host memory; the KV cache size is set by env.
            kwargs = {"gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": True}
            if tensor_parallel_size == 1:
                # The model runs in the engine's own process: no worker process to spawn (each
                # spawn re-imports vLLM, ~10 s) and no second copy of the runtime in memory.
                kwargs["distributed_executor_backend"] = "uni"
            return kwargs
        if tensor_parallel_size == 1:
            return {"gpu_memory_utilization": gpu_memory_utilization}
        # Inside a Ray placement group vLLM would pick its Ray executor, which places one worker
        # per single-GPU bundle and refuses the engine actor's one bundle of tensor_parallel_size
        # GPUs ("Placement group bundle cannot have more than 1 GPU"). Its multiprocessing
        # executor instead starts the workers in this actor, one on each GPU Ray gave it (verl's
        # design; the bundles stay as config/cluster_fit.py describes them).
        return {"gpu_memory_utilization": gpu_memory_utilization, "distributed_executor_backend": "mp"}

    def process_env(self) -> dict[str, str]:
        """Environment variables every role's process needs on this platform."""
        if self.is_cpu:
            return {
                "DS_ACCELERATOR": "cpu",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "VLLM_TARGET_DEVICE": "cpu",
                # vLLM's "auto" pins every engine's worker to the same core (core 0 here) and keeps one
                # for its scheduler; unpinned, the worker runs OMP_NUM_THREADS threads (what Ray
                # sets from the engine's rollout.num_cpus) wherever the OS finds a free core.
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                # The engine core (scheduler) in the caller's process instead of a spawned one.
                "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            }
        # Nothing forced on CUDA: NCCL_CUMEM_ENABLE=0, once needed beside vLLM's CUDA graphs, is
        # stale with vLLM 0.32 and NCCL 2.27+ (OpenRLHF and SkyRL dropped it), and a value set in
        # some processes of a NCCL group but not in others breaks the group.
        return {}

    def apply_env(self) -> None:
        for key, value in self.process_env().items():
            os.environ.setdefault(key, value)


@cache
def detect(requested: str = "auto") -> Platform:
    """``requested`` is the config's ``backend`` key: auto, cpu or cuda."""
    if requested == "auto":
        import torch

        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return Platform(name="cuda", dist_backend="nccl", device="cuda")
    if requested == "cpu":
        return Platform(name="cpu", dist_backend="gloo", device="cpu")
    raise ValueError(f"backend must be auto, cpu or cuda, got {requested!r}")


def gpu_uuid() -> str | None:
    """The UUID of this process's current CUDA device (what NCCL tells devices apart by); None
    without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
