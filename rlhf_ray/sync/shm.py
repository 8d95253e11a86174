"""Same-node weight hand-over through shared memory: the CPU twin of the CUDA IPC path.

The sender packs every bucket of a manifest into one segment (a file on the ``/dev/shm`` tmpfs,
laid out by :func:`bucket_offsets`); receivers on its node map the same file and load weights
from views of it, so each byte is written once and read in place, with no socket in between.
A tiny broadcast per bucket on a gloo group says "bucket k is packed".

Lifetime: the sender creates the file, receivers map it before they join the control group, and
the sender removes the name as soon as the group has formed (see ``WeightSender.open``). The
memory lives while a process maps it; no name is left in ``/dev/shm`` even if a process is
killed later.
"""

from __future__ import annotations

import os
import uuid

import torch

from rlhf_ray.sync.manifest import ALIGN

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "rlhf_ray_sync_"
PAGE = 4096


def bucket_offsets(manifest: dict) -> list[int]:
    """Where each bucket starts in the segment: one after the other, aligned."""
    offsets, end = [], 0
    for bucket in manifest["buckets"]:
        offsets.append(end)
        end += (bucket["nbytes"] + ALIGN - 1) // ALIGN * ALIGN
    return offsets


def segment_bytes(manifest: dict) -> int:
    """The segment size that holds every bucket of ``manifest``."""
    if not manifest["buckets"]:
        return ALIGN
    return bucket_offsets(manifest)[-1] + manifest["buckets"][-1]["nbytes"]


def create_segment(nbytes: int, shm_dir: str = SHM_DIR) -> tuple[str, torch.Tensor]:
    """A new segment of ``nbytes`` (its pages allocated now: a full tmpfs fails here with a clear
    error, not with SIGBUS in the middle of a sync) and its writable mapping."""
    path = os.path.join(shm_dir, f"{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.unlink(path)
        raise OSError(
            f"cannot reserve {nbytes / 2**20:.0f} MiB for the weight-sync segment in {shm_dir} ({e}): "
            "enlarge it or set sync.transport=broadcast"
        ) from None
    finally:
        os.close(fd)
    segment = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    segment[::PAGE].zero_()  # map every page now rather than during the first sync
    return path, segment


def map_segment(path: str) -> torch.Tensor:
    """The receiver's mapping of the sender's segment, with its page tables filled in now (one
    byte read per page) rather than during the first sync."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise FileNotFoundError(
            f"weight-sync segment {path} not found: this engine is not on the learner's node "
            "(sync.transport=shm needs that; auto uses broadcast for such engines)"
        ) from None
    segment = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    segment[::PAGE].sum()
    return segment


def segment_names(pid: int | None = None, shm_dir: str = SHM_DIR) -> set[str]:
    """The segment names that process ``pid`` (default: this one) created and still has in ``shm_dir``."""
    prefix = f"{SEGMENT_PREFIX}{pid or os.getpid()}_"
    return {n for n in os.listdir(shm_dir) if n.startswith(prefix)}


def remove_segment(path: str | None) -> None:
    """Removes the name (mappings stay valid); a name already gone is fine."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
