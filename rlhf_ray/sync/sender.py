"""The learner side of a weight sync (learner rank 0, one plain process, no Ray in here).

Usage, with the engines' ``join_weight_sync``/``receive_weights`` called at the same time:

    sender = WeightSender()
    sender.open(master_addr, master_port, world_size, backend)      # engines join concurrently
    manifest = sender.manifest_for(model.state_dict().items())      # pass it to the engines
    sender.send(model.state_dict().items(), manifest)                # engines receive concurrently

Gathering sharded (ZeRO-3) parameters is the learner's job: ``send`` takes full tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync.group import SyncGroup, open_group


class WeightSender:
    def __init__(self) -> None:
        self.group: SyncGroup | None = None
        # Two pack buffers, reused across buckets and syncs: one is packed while the other is on
        # the wire, and fresh allocations would pay page faults (CPU) or allocator churn (GPU).
        self._buffers: list[torch.Tensor] = []

    def open(
        self, master_addr: str, master_port: int, world_size: int, backend: str, timeout: float = 300.0
    ) -> None:
        """Hosts the store as rank 0 and forms the group; blocks until all workers joined."""
        self.group = open_group(master_addr, master_port, 0, world_size, backend, timeout)

    def manifest_for(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int = mf.DEFAULT_BUCKET_BYTES,
        dtype: torch.dtype | None = None,
    ) -> dict:
        return mf.manifest_for(named_tensors, bucket_bytes, dtype)

    @torch.no_grad()
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: dict) -> int:
        """Broadcasts every bucket of ``manifest``, packed from ``named_tensors`` (same names, same
        order). Returns the bytes sent."""
        if self.group is None:
            raise RuntimeError("WeightSender.open() must be called before send()")
        tensors = iter(named_tensors)
        largest = max((b["nbytes"] for b in manifest["buckets"]), default=0)
        self._ensure_buffers(largest)
        pending = [None, None]
        for i, bucket in enumerate(manifest["buckets"]):
            slot = i % 2
            if pending[slot] is not None:
                pending[slot].wait()  # the buffer is free again only once its last broadcast finished
            buffer = self._buffers[slot][: bucket["nbytes"]]
            for entry in bucket["tensors"]:
                name, tensor = next(tensors)
                if name != entry["name"]:
                    raise ValueError(
                        f"tensor order differs from the manifest: got {name!r}, expected {entry['name']!r}"
                    )
                view = mf.view(buffer, entry)
                view.copy_(tensor.detach().reshape(view.shape))
            pending[slot] = self.group.broadcast(buffer)
        for work in pending:
            if work is not None:
                work.wait()
        if next(tensors, None) is not None:
            raise ValueError("more tensors than the manifest lists")
        return manifest["total_bytes"]

    def close(self) -> None:
        self.group = None
        self._buffers = []

    def _ensure_buffers(self, nbytes: int) -> None:
        if self._buffers and self._buffers[0].numel() >= nbytes:
            return
        device = self.group.device
        self._buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for b in self._buffers:
            b.zero_()  # touch every page now rather than during the first sync
