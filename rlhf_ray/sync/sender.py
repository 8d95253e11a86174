"""The learner side of a weight sync (learner rank 0, one plain process, no Ray in here).

Usage, with the engines' ``join_weight_sync``/``receive_weights`` called at the same time:

    sender = WeightSender()
    manifest = sender.manifest_for(model.state_dict().items())      # pass it to the engines
    path = sender.create_segment(manifest)                          # only with same-node engines
    sender.open(master_addr, master_port, world_size, backend,      # engines join concurrently
                shm_world_size=...)                                 # (shm engines map `path` first)
    sender.send(model.state_dict().items(), manifest)                # engines receive concurrently

Two transports, one packing loop: engines on other nodes get each bucket by broadcast; engines on
this node read it in place from a shared-memory segment and are told "bucket k is packed" by a
tiny broadcast. With a segment, the buckets are packed straight into it and the broadcast sends
from there too, so a mixed setup packs once.

Gathering sharded (ZeRO-3) parameters is the learner's job: ``send`` takes full tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync import shm
from rlhf_ray.sync.group import SyncGroup, open_group, open_store


class WeightSender:
    def __init__(self) -> None:
        self.group: SyncGroup | None = None  # broadcast group: engines on other nodes
        self.shm_group: SyncGroup | None = None  # control group: engines reading the segment
        self.segment: torch.Tensor | None = None
        self.segment_path: str | None = None
        # Without a segment: two pack buffers, reused across buckets and syncs: one is packed
        # while the other is on the wire; fresh allocations would pay page faults (CPU) or
        # allocator churn (GPU).
        self._buffers: list[torch.Tensor] = []

    def create_segment(self, manifest: dict) -> str:
        """A shared-memory segment that holds all of ``manifest``; returns its path for the
        same-node engines to map before they join (``open`` removes the name afterwards)."""
        self.close_segment()
        self.segment_path, self.segment = shm.create_segment(shm.segment_bytes(manifest))
        return self.segment_path

    def open(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        backend: str,
        timeout: float = 300.0,
        shm_world_size: int = 1,
    ) -> None:
        """Hosts the store as rank 0 and forms the broadcast group of ``world_size`` ranks and the
        shared-memory group of ``shm_world_size`` (a world of 1 is no group); blocks until every
        worker joined."""
        if shm_world_size > 1 and self.segment is None:
            raise RuntimeError("create_segment() must come before open() with shared-memory engines")
        store = open_store(master_addr, master_port, True, timeout)
        if world_size > 1 or shm_world_size <= 1:
            self.group = open_group(master_addr, master_port, 0, world_size, backend, timeout, store=store)
        if shm_world_size > 1:
            self.shm_group = open_group(
                master_addr, master_port, 0, shm_world_size, "gloo", timeout, name="shm", store=store
            )
        # Every same-node engine mapped the segment before joining: its name can go now.
        shm.remove_segment(self.segment_path)
        self.segment_path = None

    def manifest_for(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int = mf.DEFAULT_BUCKET_BYTES,
        dtype: torch.dtype | None = None,
    ) -> dict:
        return mf.manifest_for(named_tensors, bucket_bytes, dtype)

    @torch.no_grad()
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: dict) -> int:
        """Packs every bucket of ``manifest`` from ``named_tensors`` (same names, same order) and
        hands it to both groups; returns the bytes sent. Packing bucket k+1 overlaps the transfer
        of bucket k (the broadcasts run on gloo's threads)."""
        if self.group is None and self.shm_group is None:
            raise RuntimeError("WeightSender.open() must be called before send()")
        tensors = mf.per_entry(named_tensors, manifest)
        buckets = manifest["buckets"]
        if self.shm_group is not None:
            if shm.segment_bytes(manifest) > self.segment.numel():
                raise ValueError("the manifest outgrew the shared-memory segment: open the sync again")
            offsets = shm.bucket_offsets(manifest)
        else:
            self._ensure_buffers(max((b["nbytes"] for b in buckets), default=0))
        works: list = []
        in_flight: list = [None, None]  # per pack buffer, without a segment
        for i, bucket in enumerate(buckets):
            if self.shm_group is not None:
                buffer = self.segment[offsets[i] : offsets[i] + bucket["nbytes"]]
            else:
                if in_flight[i % 2] is not None:  # the buffer is free once its last broadcast finished
                    self.group.wait(in_flight[i % 2], f"bucket {i - 2} of {len(buckets)}")
                buffer = self._buffers[i % 2][: bucket["nbytes"]]
            pack_bucket(buffer, bucket, tensors)
            if self.group is not None:
                work = self.group.broadcast(buffer)
                works.append((self.group, work, f"bucket {i} of {len(buckets)}"))
                in_flight[i % 2] = work
            if self.shm_group is not None:
                works.append((self.shm_group, self.shm_group.broadcast(torch.tensor([i], dtype=torch.int64)),
                              f"the notice that bucket {i} of {len(buckets)} is packed"))
        for group, work, what in works:
            group.wait(work, what)
        if next(tensors, None) is not None:
            raise ValueError("more tensors than the manifest lists")
        return manifest["total_bytes"]

    def close_segment(self) -> None:
        shm.remove_segment(self.segment_path)
        self.segment = self.segment_path = None

    def close(self) -> None:
        self.close_segment()
        for group in (self.group, self.shm_group):
            if group is not None:
                group.close()
        self.group = self.shm_group = None
        self._buffers = []

    def _ensure_buffers(self, nbytes: int) -> None:
        if self._buffers and self._buffers[0].numel() >= nbytes:
            return
        device = self.group.device
        self._buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for b in self._buffers:
            b.zero_()  # touch every page now rather than during the first sync


def pack_bucket(buffer: torch.Tensor, bucket: dict, tensors) -> None:
    """Copies the next tensors of ``tensors`` (``manifest.per_entry``'s iterator: one ``(name,
    tensor)`` per entry) into ``buffer`` as ``bucket`` lays them out, cast to the manifest's dtype."""
    for entry in bucket["tensors"]:
        name, tensor = next(tensors)
        if name != entry["name"]:
            raise ValueError(f"tensor order differs from the manifest: got {name!r}, expected {entry['name']!r}")
        view = mf.view(buffer, entry)
        if "part" in entry:
            view.copy_(tensor.detach().reshape(-1)[entry["part"][0] : entry["part"][1]])
        else:
            view.copy_(tensor.detach().reshape(view.shape))
