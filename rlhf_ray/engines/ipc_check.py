"""The colocated weight hand-over (``rlhf_ray.sync.ipc``) between two real processes on one device,
the smoke script's check (``rlhf_ray.engines.smoke``) and a CPU test's (``tests/test_colocate.py``).
Its own module so that the receiving child process can import its function by name."""

from __future__ import annotations

import hashlib
import multiprocessing
import time

import torch

from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.ports import free_port
from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync.group import open_store
from rlhf_ray.sync.ipc import SLOTS, IpcReceiver, IpcSender
from rlhf_ray.sync.sender import pack_bucket


def _bucket_digests(buckets) -> list[str]:
    return [hashlib.sha256(buf.cpu().numpy().tobytes()).hexdigest() for _, buf in buckets]


def _ipc_receiver(address: str, port: int, manifest: dict, syncs: int, results) -> None:
    """The engine's side of :func:`ipc_handover`, in its own process: each sync's bucket digests."""
    try:
        receiver = IpcReceiver(open_store(address, port, False, 60), "the smoke's learner", timeout_s=60)
        for _ in range(syncs):
            results.put(_bucket_digests(receiver.buckets(manifest)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the check
        results.put(f"{type(e).__name__}: {e}")


def ipc_handover(model_dir: str, device: str, dtype: str, syncs: int = 2) -> dict:
    """The colocated hand-over (``rlhf_ray.sync.ipc``) between two processes on one device: a
    learner's weights, packed bucket by bucket into two slots (CUDA IPC on a GPU, shared memory on
    CPU), reach another process byte for byte, sync after sync, with more buckets than slots."""
    learner = load_causal_lm(model_dir).to(device)
    wire = getattr(torch, dtype)
    total = sum(t.numel() for t in learner.state_dict().values()) * wire.itemsize
    # About 8 buckets whatever the model's size, so the two slots are reused several times.
    manifest = mf.manifest_for(learner.state_dict().items(), bucket_bytes=max(1 << 12, total // 8), dtype=wire)
    expected = []
    tensors = mf.per_entry(learner.state_dict().items(), manifest)
    for bucket in manifest["buckets"]:
        packed = torch.empty(bucket["nbytes"], dtype=torch.uint8)
        pack_bucket(packed, bucket, tensors)
        expected.append(packed)
    expected = _bucket_digests(enumerate(expected))
    port = free_port()
    store = open_store("127.0.0.1", port, True, 60)
    sender = IpcSender(store, max(b["nbytes"] for b in manifest["buckets"]), torch.device(device),
                       "the smoke's engine process", timeout_s=60)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    results = context.Queue()
    child = context.Process(target=_ipc_receiver, args=("127.0.0.1", port, manifest, syncs, results), daemon=True)
    child.start()
    try:
        sender.wait_joined()
        seconds = []
        for _ in range(syncs):
            start = time.perf_counter()
            sender.send(iter(learner.state_dict().items()), manifest)
            seconds.append(time.perf_counter() - start)
        received = [results.get(timeout=60) for _ in range(syncs)]
    finally:
        sender.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    errors = [r for r in received if isinstance(r, str)]
    return {"check": "ipc_handover", "ok": not errors and all(r == expected for r in received),
            "buckets": len(manifest["buckets"]), "slots": SLOTS, "syncs": syncs, "bytes": manifest["total_bytes"],
            "gb_per_s": manifest["total_bytes"] / min(seconds) / 1e9, **({"error": errors[0]} if errors else {})}
