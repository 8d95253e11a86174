"""A group of actors driven as one: the ranks of a learner (policy, critic, reward model) or the
replicas of a scorer (reference). The driver calls a verb on the group; the group splits every
batch argument across its members, calls them all at once, and gathers the answers, noticing a
dead member even while the others wait for it inside a collective.

    policy = WorkerGroup.launch(PolicyLearnerActor, spec, cfg.policy, pg)
    stats = policy.call("train_step", minibatch, loss_spec, ...)    # rank 0's (all-reduced) stats
    logprobs, entropy = policy.gather("logprobs", batch, 1.0)        # rows back in batch order
    policy.run("save", out_dir)                                      # every rank, same arguments
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Self

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from rlhf_ray.data.batch import RolloutBatch


def get_all(refs: list) -> list:
    """``ray.get`` of every ref that notices a dead actor even while its peers hang in a collective
    waiting for it: a ``RayActorError`` is raised as soon as any ref reports one."""
    refs = list(refs)
    while True:
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        failure = None
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                raise
            except Exception as e:  # noqa: BLE001 - raised below unless an actor death explains it
                failure = failure or e
        if not waiting:
            if failure is not None:
                raise failure
            return ray.get(refs)


class GroupCall:
    """A verb running on every member; its answers in member order once gathered."""

    def __init__(self, refs: list):
        self.refs = refs

    def results(self) -> list:
        return get_all(self.refs)

    def rank0(self):
        """The first member's answer (learner ranks all-reduce their stats: rank 0 speaks for all)."""
        return self.results()[0]

    def concat(self):
        """The members' tensors (or tuples of tensors) joined along rows, in batch order."""
        parts = self.results()
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)


class WorkerGroup:
    """Members in rank order; ``placement_group`` is freed with them unless someone else owns it."""

    def __init__(self, actors: list, placement_group: PlacementGroup | None = None):
        self.actors = list(actors)
        self.placement_group = placement_group

    @classmethod
    def launch(cls, actor_cls, spec, section, placement_group: PlacementGroup, owns_group: bool = True,
               num_gpus: float | None = None) -> WorkerGroup:
        """``section.num_ranks`` learner ranks of ``actor_cls`` in ``placement_group``, one bundle
        each, asking ``num_gpus`` each (default ``section.num_gpus``; less when sharing the bundle)."""
        from rlhf_ray.actors.placement import launch_learner_group

        actors = launch_learner_group(actor_cls, spec, section.num_ranks, section.num_cpus,
                                      section.num_gpus if num_gpus is None else num_gpus, placement_group)
        return cls(actors, placement_group if owns_group else None)

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self) -> Iterator:
        return iter(self.actors)

    def __getitem__(self, rank: int):
        return self.actors[rank]

    def __bool__(self) -> bool:
        return bool(self.actors)

    def submit(self, verb: str, *args, **kwargs) -> GroupCall:
        """Starts ``verb`` on every member: each ``RolloutBatch`` argument (positional or keyword)
        is split into contiguous shards, one per member, row-aligned with the other batches;
        every other argument goes to all members as is."""
        n = len(self.actors)
        split = [a.chunk(n) if isinstance(a, RolloutBatch) else [a] * n for a in args]
        split_kw = {k: v.chunk(n) if isinstance(v, RolloutBatch) else [v] * n for k, v in kwargs.items()}
        return GroupCall([getattr(actor, verb).remote(*(s[i] for s in split), **{k: v[i] for k, v in split_kw.items()})
                          for i, actor in enumerate(self.actors)])

    def call(self, verb: str, *args, **kwargs):
        """``verb`` on every member over its shard; rank 0's answer."""
        return self.submit(verb, *args, **kwargs).rank0()

    def gather(self, verb: str, *args, **kwargs):
        """``verb`` on every member over its shard; the row-wise answers joined in batch order."""
        return self.submit(verb, *args, **kwargs).concat()

    def submit_all(self, verb: str, *args, **kwargs) -> GroupCall:
        """Starts ``verb`` on every member with the same arguments, batches included."""
        return GroupCall([getattr(actor, verb).remote(*args, **kwargs) for actor in self.actors])

    def run(self, verb: str, *args, **kwargs) -> list:
        """``verb`` on every member with the same arguments (save, load a checkpoint); all answers."""
        return self.submit_all(verb, *args, **kwargs).results()

    def shutdown(self) -> None:
        """Kills every member (a no-op for dead ones) and frees the group's placement group."""
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
