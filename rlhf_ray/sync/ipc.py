"""Same-device weight hand-over for colocated engines (``rollout.colocate``): no copy on a wire.

A learner rank and the engine that shares its device talk through two **slots**, buffers of one
bucket each that the learner owns and the engine maps: on CUDA through CUDA IPC handles of the
learner's tensors (what ``torch.multiprocessing`` sends between processes: the engine opens the
same device memory), on CPU through shared-memory files (``rlhf_ray.sync.shm``). The protocol,
over the learner's TCPStore, is the same on both:

    learner (IpcSender)                          engine (IpcReceiver)
    open: make 2 slots, publish their handles    join: map both slots, say "joined"
    send, bucket i: wait "done i-2" (slot free)  receive, bucket i: wait "ready i",
                    pack into slot i % 2,                   copy slot i % 2 out, say "done i",
                    say "ready i"                           load the copy
    end of send: wait the last "done"s

So the learner holds two buckets of extra device memory, the engine one bucket in flight plus the
one it loads (the receive-side headroom), and neither side ever waits without a time limit: a peer
that does not answer ends the sync with an error that names it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync import shm
from rlhf_ray.sync.sender import pack_bucket

SLOTS = 2  # one bucket is packed while the engine copies the other out


def device_index_for_uuid(uuid: str, local_uuids: list[str]) -> int:
    """This process's index of the device with ``uuid``: processes that see different
    CUDA_VISIBLE_DEVICES number one GPU differently, so a handle names its device by UUID."""
    if uuid not in local_uuids:
        raise RuntimeError(f"the learner's GPU {uuid} is not visible here (visible: {local_uuids}): a colocated "
                           "engine must share its learner rank's GPU (one placement-group bundle)")
    return local_uuids.index(uuid)


def share_slot(slot: torch.Tensor, shm_path: str | None = None) -> dict:
    """What another process on this device needs to map ``slot``: a CUDA IPC handle, or for a
    CPU slot the shared-memory file it was made from (``shm_path``)."""
    if slot.device.type == "cpu":
        if shm_path is None:
            raise ValueError("a CPU slot is shared through its shared-memory file: pass shm_path")
        return {"kind": "shm", "path": shm_path}
    from torch.multiprocessing.reductions import reduce_tensor

    from rlhf_ray.platform import gpu_uuid

    _, args = reduce_tensor(slot)
    return {"kind": "cuda", "args": args, "device_uuid": gpu_uuid()}


def map_slot(handle: dict) -> torch.Tensor:
    """The receiving process's view of a slot that :func:`share_slot` described."""
    if handle["kind"] == "shm":
        return shm.map_segment(handle["path"])
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    args = list(handle["args"])
    args[6] = device_index_for_uuid(handle["device_uuid"], uuids)  # reduce_tensor's storage device
    return rebuild_cuda_tensor(*args)


def _ready(sync: int, bucket: int) -> str:
    return f"{sync}/ready/{bucket}"


def _done(sync: int, bucket: int) -> str:
    return f"{sync}/done/{bucket}"


def _wait(store: dist.Store, key: str, timeout_s: float, what: str) -> None:
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except RuntimeError as e:  # DistStoreError, on timeout
        raise TimeoutError(f"weight sync: {what} within {timeout_s:g} s ({type(e).__name__}: {e})") from None


class IpcSender:
    """The learner rank's side. ``peer`` names the engine in errors."""

    def __init__(self, store: dist.Store, slot_bytes: int, device: torch.device, peer: str,
                 timeout_s: float = 300.0) -> None:
        self.store, self.peer, self.timeout_s = store, peer, timeout_s
        self.syncs = 0
        self.slots: list[torch.Tensor] = []
        paths: list[str | None] = []
        for _ in range(SLOTS):
            if device.type == "cpu":
                path, slot = shm.create_segment(max(slot_bytes, mf.ALIGN))
            else:
                path, slot = None, torch.zeros(max(slot_bytes, mf.ALIGN), dtype=torch.uint8, device=device)
            self.slots.append(slot)
            paths.append(path)
        self._paths = paths
        store.set("slots", pickle.dumps([share_slot(s, p) for s, p in zip(self.slots, paths)]))

    def wait_joined(self) -> None:
        """Until the engine mapped both slots; the shared-memory names go then (the mappings stay),
        or when it never does."""
        try:
            _wait(self.store, "joined", self.timeout_s, f"{self.peer} did not map the learner's slots")
        finally:
            self.close()

    def close(self) -> None:
        """Removes the slots' shared-memory names if the engine never joined (mappings stay valid)."""
        for path in self._paths:
            shm.remove_segment(path)
        self._paths = []

    @torch.no_grad()
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: dict) -> int:
        """Packs every bucket of ``manifest`` from ``named_tensors`` (same names, same order) into
        the slots, one bucket ahead of the engine; returns the bytes handed over."""
        sync, tensors, buckets = self.syncs, mf.per_entry(named_tensors, manifest), manifest["buckets"]
        self.syncs += 1
        too_big = [b["nbytes"] for b in buckets if b["nbytes"] > self.slots[0].numel()]
        if too_big:
            raise ValueError(f"a bucket of {max(too_big)} bytes outgrew the {self.slots[0].numel()}-byte slots: "
                             "open the sync again")
        for i, bucket in enumerate(buckets):
            if i >= SLOTS:
                self._take_done(sync, i - SLOTS)
            slot = self.slots[i % SLOTS][: bucket["nbytes"]]
            pack_bucket(slot, bucket, tensors)
            if slot.device.type == "cuda":
                torch.cuda.current_stream(slot.device).synchronize()  # packed before the engine reads
            self.store.set(_ready(sync, i), str(i % SLOTS))
        for i in range(max(0, len(buckets) - SLOTS), len(buckets)):
            self._take_done(sync, i)
        if next(tensors, None) is not None:
            raise ValueError("more tensors than the manifest lists")
        return manifest["total_bytes"]

    def _take_done(self, sync: int, bucket: int) -> None:
        key = _done(sync, bucket)
        _wait(self.store, key, self.timeout_s, f"{self.peer} did not take bucket {bucket} of sync {sync}")
        self.store.delete_key(key)


class IpcReceiver:
    """The engine's side; ``peer`` names the learner rank in errors."""

    def __init__(self, store: dist.Store, peer: str, timeout_s: float = 300.0) -> None:
        self.store, self.peer, self.timeout_s = store, peer, timeout_s
        self.syncs = 0
        _wait(store, "slots", timeout_s, f"{peer} did not publish its slots")
        self.slots = [map_slot(h) for h in pickle.loads(store.get("slots"))]
        store.set("joined", b"1")

    def buckets(self, manifest: dict, out: list[torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields ``(i, bucket i)`` as each arrives, copied out of its slot so the learner can
        pack the next one into it. ``out``: buffers to copy into, one per bucket (reused across
        syncs on CPU, where fresh memory pays a page fault per page); default fresh ones."""
        sync = self.syncs
        self.syncs += 1
        for i, bucket in enumerate(manifest["buckets"]):
            key = _ready(sync, i)
            _wait(self.store, key, self.timeout_s, f"{self.peer} did not pack bucket {i} of sync {sync}")
            slot = self.slots[int(self.store.get(key))][: bucket["nbytes"]]
            self.store.delete_key(key)
            copy = out[i][: bucket["nbytes"]] if out is not None else torch.empty_like(slot)
            copy.copy_(slot)
            if copy.device.type == "cuda":
                torch.cuda.current_stream(copy.device).synchronize()  # copied before the slot is reused
            self.store.set(_done(sync, i), b"1")
            yield i, copy
