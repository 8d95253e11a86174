"""The bucket plan of a weight sync: which tensors travel together in one flat broadcast.

A manifest is plain data (dicts, lists, str, int) so it passes unchanged through Ray and through
vLLM's ``collective_rpc``. Both sides derive every byte offset from it, so they cannot disagree:

    {"bucket_bytes": int, "total_bytes": int,
     "buckets": [{"nbytes": int,
                  "tensors": [{"name": str, "dtype": "float32", "shape": [..], "offset": int}]}]}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

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
    return math.prod(spec["shape"]) * to_dtype(spec["dtype"]).itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def build_manifest(
    specs: Iterable[tuple[str, str | torch.dtype, Sequence[int]]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    wire_dtype: str | torch.dtype | None = None,
) -> dict:
    """Groups ``(name, dtype, shape)`` in the given order into buckets of at most
    ``bucket_bytes``; a tensor larger than that gets a bucket of its own. Order is kept because
    vLLM's loaders finish a layer as soon as all of its tensors arrived. With ``wire_dtype`` (the
    engines' dtype), floating-point tensors travel in it: the sender casts as it packs, so a bf16
    engine gets bf16 bytes from fp32 weights (half the traffic) and loads what it computes with."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    wire = to_dtype(wire_dtype) if isinstance(wire_dtype, str) else wire_dtype
    buckets: list[dict] = []
    current: dict | None = None
    for name, dtype, shape in specs:
        dtype = to_dtype(dtype) if isinstance(dtype, str) else dtype
        if wire is not None and dtype.is_floating_point:
            dtype = wire
        dtype = dtype_name(dtype)
        entry = {"name": name, "dtype": dtype, "shape": [int(s) for s in shape], "offset": 0}
        size = tensor_nbytes(entry)
        if current is not None and current["tensors"] and _aligned(current["nbytes"]) + size > bucket_bytes:
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


def names(manifest: dict) -> list[str]:
    return [t["name"] for b in manifest["buckets"] for t in b["tensors"]]


def view(buffer: torch.Tensor, entry: dict) -> torch.Tensor:
    """The tensor ``entry`` of a bucket as a view (no copy) into the bucket's flat uint8 buffer."""
    raw = buffer[entry["offset"] : entry["offset"] + tensor_nbytes(entry)]
    return raw.view(to_dtype(entry["dtype"])).view(entry["shape"])


def unpack(buffer: torch.Tensor, bucket: dict) -> list[tuple[str, torch.Tensor]]:
    return [(t["name"], view(buffer, t)) for t in bucket["tensors"]]
