"""Weight transport learner -> rollout engines: bucket plans, the broadcast sender, the vLLM-side
receiver and the parity check. The same code runs over gloo (CPU) and NCCL (GPU)."""

from rlhf_ray.sync.group import free_port, rank_layout
from rlhf_ray.sync.manifest import build_manifest, manifest_for
from rlhf_ray.sync.parity import ParityReport, WeightSyncParityError, check_greedy_parity, check_parity
from rlhf_ray.sync.sender import WeightSender

__all__ = [
    "ParityReport",
    "WeightSender",
    "WeightSyncParityError",
    "build_manifest",
    "check_greedy_parity",
    "check_parity",
    "free_port",
    "manifest_for",
    "rank_layout",
]
