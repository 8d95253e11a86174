"""The bucket plan of a weight sync: which tensors travel together in one flat broadcast.

A manifest is plain data (dicts, lists, str, int) so it passes unchanged through Ray and through
vLLM's ``collective_rpc``. Both sides derive every byte offset from it, so they cannot disagree:

    {"bucket_bytes": int, "total_bytes": int,
     "buckets": [{"nbytes": int,
                  "tensors": [{"name": str, "dtype": "float32", "shape": [..], "offset": int,
                               "part": [start, stop]}]}]}

``part`` (only on a tensor larger than a bucket) is the range of the flattened tensor's elements
that this bucket carries: such a tensor is split over consecutive buckets of its own, so no bucket,
and no send or receive buffer, is larger than ``bucket_bytes`` (a 70B model's 2.1 GB embedding
would otherwise need two such buffers on every engine worker, beside vLLM's memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

# Each tensor starts on a 64-byte boundary: a flat uint8 buffer can then be viewed as any dtype,
# and vector loads and stores stay aligned.
ALIGN = 64
DEFAULT_BUCKET_BYTES = 256 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name!r} does not name a torch dtype")
    return dtype


def tensor_nbytes(spec: dict) -> int:
    """The bytes of ``spec`` in its bucket: the whole tensor, or its part."""
    if "part" in spec:
        return (spec["part"][1] - spec["part"][0]) * to_dtype(spec["dtype"]).itemsize
    return math.prod(spec["shape"]) * to_dtype(spec["dtype"]).itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def build_manifest(
    specs: Iterable[tuple[str, str | torch.dtype, Sequence[int]]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    wire_dtype: str | torch.dtype | None = None,
) -> dict:
    """Groups ``(name, dtype, shape)`` in the given order into buckets of at most
    ``bucket_bytes``; a larger tensor is split into parts over buckets of its own. Order is kept
    because vLLM's loaders finish a layer as soon as all of its tensors arrived. With ``wire_dtype``
    (the engines' dtype), floating-point tensors travel in it: the sender casts as it packs, so a
    bf16 engine gets bf16 bytes from fp32 weights (half the traffic) and loads what it computes with."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
    wire = to_dtype(wire_dtype) if isinstance(wire_dtype, str) else wire_dtype
    buckets: list[dict] = []
    current: dict | None = None
    for name, dtype, shape in specs:
        dtype = to_dtype(dtype) if isinstance(dtype, str) else dtype
        if wire is not None and dtype.is_floating_point:
            dtype = wire
        entry = {"name": name, "dtype": dtype_name(dtype), "shape": [int(s) for s in shape], "offset": 0}
        size = tensor_nbytes(entry)
        if size > bucket_bytes:
            numel, per_bucket = math.prod(entry["shape"]), bucket_bytes // dtype.itemsize
            for start in range(0, numel, per_bucket):
                part = {**entry, "part": [start, min(numel, start + per_bucket)]}
                buckets.append({"nbytes": tensor_nbytes(part), "tensors": [part]})
            current = None
            continue
        if current is not None and _aligned(current["nbytes"]) + size > bucket_bytes:
            current = None
        if current is None:
            current = {"nbytes": 0, "tensors": []}
            buckets.append(current)
        entry["offset"] = _aligned(current["nbytes"])
        current["nbytes"] = entry["offset"] + size
        current["tensors"].append(entry)
    return {
        "bucket_bytes": int(bucket_bytes),
        "total_bytes": sum(b["nbytes"] for b in buckets),
        "buckets": buckets,
    }


def manifest_for(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> dict:
    """The bucket plan for these tensors; ``dtype``: see ``build_manifest``'s ``wire_dtype``."""
    return build_manifest(((name, t.dtype, t.shape) for name, t in named_tensors), bucket_bytes, dtype)


def _starts_tensor(entry: dict) -> bool:
    """A whole tensor, or the first part of one."""
    return entry.get("part", [0])[0] == 0


def check_wire_dtype(manifest: dict, engine_dtype: torch.dtype) -> None:
    """Refuses floating-point tensors sent in another dtype than the engine computes in: the loader
    would cast them silently, and the parity check would then blame the kernels (OpenRLHF asserts
    the same)."""
    sent = {t["dtype"] for b in manifest["buckets"] for t in b["tensors"] if to_dtype(t["dtype"]).is_floating_point}
    if sent - {dtype_name(engine_dtype)}:
        raise ValueError(f"weight sync: the manifest sends {', '.join(sorted(sent))} weights to an engine that computes "
                         f"in {dtype_name(engine_dtype)}: build it with wire_dtype={dtype_name(engine_dtype)} "
                         f"(model.dtype)")


def names(manifest: dict) -> list[str]:
    """The tensors' names in sending order, each once."""
    return [t["name"] for b in manifest["buckets"] for t in b["tensors"] if _starts_tensor(t)]


def view(buffer: torch.Tensor, entry: dict) -> torch.Tensor:
    """The tensor ``entry`` of a bucket as a view (no copy) into the bucket's flat uint8 buffer;
    a part is a flat view of its elements."""
    raw = buffer[entry["offset"] : entry["offset"] + tensor_nbytes(entry)]
    return raw.view(to_dtype(entry["dtype"])).view(-1 if "part" in entry else entry["shape"])


def per_entry(named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: dict):
    """The sender's ``(name, tensor)`` pairs once per manifest entry (a tensor split into k parts
    comes k times), then whatever is left beyond the manifest, for the sender to refuse."""
    tensors = iter(named_tensors)
    current = None
    for bucket in manifest["buckets"]:
        for entry in bucket["tensors"]:
            if current is None or _starts_tensor(entry):
                current = next(tensors, None)
                if current is None:
                    raise ValueError(f"fewer tensors than the manifest lists: nothing for {entry['name']!r}")
            yield current
    yield from tensors


def tensors_of(arrived: Iterable[tuple[int, torch.Tensor]], manifest: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the ``(i, bucket i)`` pairs in ``arrived``: views into
    the buckets, and a tensor sent in parts assembled in one buffer and given once its last part came."""
    whole: torch.Tensor | None = None
    for i, buffer in arrived:
        for entry in manifest["buckets"][i]["tensors"]:
            if "part" not in entry:
                yield entry["name"], view(buffer, entry)
                continue
            start, stop = entry["part"]
            if start == 0:
                whole = torch.empty(math.prod(entry["shape"]), dtype=to_dtype(entry["dtype"]), device=buffer.device)
            whole[start:stop].copy_(view(buffer, entry))
            if stop == whole.numel():
                yield entry["name"], whole.view(entry["shape"])
                whole = None
