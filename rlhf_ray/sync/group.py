"""The learner <-> rollout broadcast group: a TCPStore rendezvous and one process group.

Outside ``torch.distributed``'s default group on purpose: the learner already has its own
(DeepSpeed) default group and vLLM workers have theirs; this one only joins learner rank 0 and
every rollout worker. The backend string comes from ``rlhf_ray.platform`` (gloo or nccl).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class SyncGroup:
    store: dist.Store
    pg: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor):
        """Starts a broadcast from rank 0; returns the work handle (``.wait()`` it)."""
        return self.pg.broadcast(tensor, 0)


def device_for(backend: str) -> torch.device:
    """Where broadcast buffers live for a backend: NCCL moves device memory, gloo host memory."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def open_group(
    master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0
) -> SyncGroup:
    """Rank 0 hosts the store; it returns once every rank has joined (all ranks call this at once)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_addr,
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        raise ValueError(f"weight sync supports the gloo and nccl backends, got {backend!r}")
    group = SyncGroup(store, pg, rank, world_size, device_for(backend))
    # A first tiny collective: fails fast on a wrong world size or port instead of at the first sync.
    group.broadcast(torch.zeros(1, device=group.device)).wait()
    return group


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free now on this host (held open together while choosing)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port that is free now on this host, for the store of a new group."""
    return free_ports(1)[0]


def rank_layout(num_engines: int, workers_per_engine: int) -> tuple[int, list[int]]:
    """(world_size, rank_offset of each engine): the learner is rank 0, engine i's workers follow
    at 1 + i * workers_per_engine (its tensor-parallel size)."""
    return 1 + num_engines * workers_per_engine, [1 + i * workers_per_engine for i in range(num_engines)]
