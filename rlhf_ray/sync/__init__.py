"""Weight transport learner -> rollout engines: bucket plans, the sender, the vLLM-side receiver
and the parity check. Broadcast runs the same code over gloo (CPU) and NCCL (GPU); engines on the
learner's node can read the weights from a shared-memory segment instead (CPU)."""

from rlhf_ray.sync.group import SyncLayout, plan_sync, rank_layout
from rlhf_ray.sync.manifest import build_manifest, manifest_for
from rlhf_ray.sync.parity import (
    ParityReport,
    ParityTolerance,
    WeightSyncParityError,
    check_greedy_parity,
    check_parity,
    parity_tolerance,
    tie_tolerant_argmax,
)
from rlhf_ray.sync.sender import WeightSender

__all__ = [
    "ParityReport",
    "ParityTolerance",
    "SyncLayout",
    "WeightSender",
    "WeightSyncParityError",
    "build_manifest",
    "check_greedy_parity",
    "check_parity",
    "manifest_for",
    "parity_tolerance",
    "plan_sync",
    "rank_layout",
    "tie_tolerant_argmax",
]
