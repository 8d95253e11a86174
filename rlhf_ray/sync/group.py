"""The learner <-> rollout sync groups: one TCPStore rendezvous, up to two process groups.

Outside ``torch.distributed``'s default group on purpose: the learner already has its own
(DeepSpeed) default group and vLLM workers have theirs; these only join learner rank 0 and the
rollout workers. The broadcast group carries the weights to engines on other nodes (backend from
``rlhf_ray.platform``: gloo or nccl); the shared-memory group (gloo) only tells engines on the
learner's node that a bucket of the shared segment is ready. ``plan_sync`` decides who joins which.
"""

from __future__ import annotations

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
    peers: str  # who the other side is, for errors: the learner, or the engine workers

    def broadcast(self, tensor: torch.Tensor):
        """Starts a broadcast from rank 0; returns the work handle (``wait`` for it)."""
        return self.pg.broadcast(tensor, 0)

    def wait(self, work, what: str) -> None:
        """Waits for ``work`` (its timeout is the group's); a failure or timeout says what was
        being sent and to or from whom, instead of gloo's or NCCL's bare message."""
        try:
            work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"weight sync: {what} between {self.peers} failed or timed out "
                               f"(a peer died or hangs): {e}") from None

    def close(self) -> None:
        """Tears the communicators down (before joining a new group after an engine was replaced or
        the engines changed): abort, not a graceful shutdown, since a peer may be dead."""
        self.pg.abort()


def device_for(backend: str) -> torch.device:
    """Where broadcast buffers live for a backend: NCCL moves device memory, gloo host memory."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def open_store(master_addr: str, master_port: int, is_master: bool, timeout_s: float = 300.0) -> dist.Store:
    """The rendezvous store of the sync groups; the learner (rank 0 everywhere) hosts it."""
    return dist.TCPStore(
        master_addr,
        int(master_port),
        is_master=is_master,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def open_group(
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float = 300.0,
    *,
    name: str = "weights",
    store: dist.Store | None = None,
) -> SyncGroup:
    """Rank 0 hosts the store; it returns once every rank has joined (all ranks call this at once).
    Groups of different ``name`` can share one ``store`` (the learner's broadcast and
    shared-memory groups do: one port)."""
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = open_store(master_addr, master_port, rank == 0, timeout_s)
    store = dist.PrefixStore(name, store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        # This process's device, named now: NCCL would otherwise bind the communicator to whatever
        # device the first tensor is on, or guess from the rank.
        pg.eager_connect_single_device(device_for(backend))
    else:
        raise ValueError(f"weight sync supports the gloo and nccl backends, got {backend!r}")
    peers = (f"learner rank 0 and engine workers 1-{world_size - 1}" if rank == 0
             else f"engine worker {rank} and learner rank 0 ({master_addr}:{master_port})")
    group = SyncGroup(store, pg, rank, world_size, device_for(backend), f"{peers} of group {name!r}")
    # A first tiny collective: fails fast on a wrong world size or port instead of at the first sync.
    group.wait(group.broadcast(torch.zeros(1, device=group.device)), "the first broadcast")
    return group


def engines_on_sender_gpu(sender_uuid: str | None, engine_uuids: list[list[str | None]]) -> list[int]:
    """Engines with a worker on the sender's (learner rank 0's) GPU. NCCL cannot put two ranks of
    one group on one device ("Duplicate GPU detected"); UUIDs are compared, as TRL does, because
    device indices differ between processes that see different CUDA_VISIBLE_DEVICES."""
    if sender_uuid is None:
        return []
    return [i for i, uuids in enumerate(engine_uuids) if sender_uuid in uuids]


def rank_layout(num_engines: int, workers_per_engine: int) -> tuple[int, list[int]]:
    """(world_size, rank_offset of each engine): the learner is rank 0, engine i's workers follow
    at 1 + i * workers_per_engine (its tensor-parallel size)."""
    return 1 + num_engines * workers_per_engine, [1 + i * workers_per_engine for i in range(num_engines)]


TRANSPORTS = ("broadcast", "shm", "auto")


@dataclass(frozen=True)
class SyncLayout:
    """Which group each engine joins: the shared-memory group (engines on the learner's node) or
    the broadcast group (the rest). The learner is rank 0 of both; a world of 1 means no group."""

    uses_shm: list[bool]  # per engine
    rank_offsets: list[int]  # per engine, inside the group it joins
    broadcast_world: int
    shm_world: int

    def engine_group(self, i: int) -> dict:
        """The group keywords of engine i's ``join_weight_sync``: world size, rank offset, and
        whether it reads the shared-memory segment."""
        shm = self.uses_shm[i]
        world = self.shm_world if shm else self.broadcast_world
        return {"world_size": world, "rank_offset": self.rank_offsets[i], "shm": shm}


def plan_sync(
    transport: str, same_node: list[bool], workers_per_engine: int, shm_supported: bool
) -> SyncLayout:
    """``transport`` is ``sync.transport``; ``same_node[i]`` says whether engine i runs on the
    learner rank 0's node; ``shm_supported`` is the platform's say (CPU memory only)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"sync.transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "shm":
        if not shm_supported:
            raise ValueError("sync.transport=shm hands over host memory: not on this platform (use broadcast or auto)")
        if not all(same_node):
            far = [i for i, s in enumerate(same_node) if not s]
            raise ValueError(
                f"sync.transport=shm needs every engine on the learner's node; engines {far} are not "
                "(use auto: shared memory where it can, broadcast for the rest)"
            )
    uses_shm = [transport != "broadcast" and shm_supported and s for s in same_node]
    shm_world, shm_offsets = rank_layout(sum(uses_shm), workers_per_engine)
    bcast_world, bcast_offsets = rank_layout(len(uses_shm) - sum(uses_shm), workers_per_engine)
    shm_iter, bcast_iter = iter(shm_offsets), iter(bcast_offsets)
    offsets = [next(shm_iter) if s else next(bcast_iter) for s in uses_shm]
    return SyncLayout(uses_shm, offsets, bcast_world, shm_world)
