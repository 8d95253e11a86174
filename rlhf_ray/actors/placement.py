"""Placement groups and actor creation for every role.

Each role asks Ray for exactly what it needs: one placement group per rollout engine (one
bundle, so engines come and go alone: a replacement, or elastic rollout adding engines on new
capacity and retiring those on draining nodes; see ``rollout_pool``), one bundle per learner
rank, one per frozen scorer (or, colocated, a share of the policy's bundles). The driver calls
``launch_roles`` once and gets the role objects back; actors never create or call each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.actors.learner import CriticLearnerActor, LearnerSpec, PolicyLearnerActor
from rlhf_ray.actors.rollout_pool import (
    COLOCATED_GPU_SHARE,
    RolloutPool,
    bundle,
    engine_options,
    rollout_bundle,
)
from rlhf_ray.actors.scorers import ReferenceActor, RewardActor
from rlhf_ray.actors.worker_group import WorkerGroup
from rlhf_ray.engines.http_reward import client_for
from rlhf_ray.models.lora import LoraSettings
from rlhf_ray.ports import free_port


@dataclass
class Roles:
    rollout: RolloutPool  # the engines, by stable id
    policy: WorkerGroup  # PolicyLearnerActor ranks (rank 0 first)
    critic: WorkerGroup  # CriticLearnerActor ranks; empty for critic-free estimators
    reference: WorkerGroup  # ReferenceActor replicas, each scoring a shard of the batch
    reward: object
    placement_groups: list[PlacementGroup] = field(default_factory=list)  # learners' and scorers'


def _in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


@ray.remote(num_cpus=0)
def _free_port() -> tuple[str, int]:
    """A free TCP port on the node this task runs on (the learner rank 0's node)."""
    return ray.util.get_node_ip_address(), free_port()


_HANDED_OUT: set[tuple[str, int]] = set()  # (node address, port) given to a learner group by this driver


def free_port_near(pg: PlacementGroup, bundle_index: int = 0) -> tuple[str, int]:
    """A port free now on the node of ``pg``'s bundle, for a learner group's master. The port is
    only bound later, by rank 0: the OS may hand the same free port to the next group launched
    right after (policy, then critic, on one node), so a port this driver already gave out is
    never given again."""
    strategy = _in_bundle(pg, bundle_index)
    for _ in range(20):
        address, port = ray.get(_free_port.options(scheduling_strategy=strategy).remote())
        if (address, port) not in _HANDED_OUT:
            _HANDED_OUT.add((address, port))
            return address, port
    raise RuntimeError(f"no fresh free port on {address} after 20 tries")


class PlacementTimeoutError(RuntimeError):
    """Ray could not give a role its resources within ``cluster.placement_timeout_s``."""


def wait_for_placement(groups: dict[str, PlacementGroup], timeout_s: float) -> None:
    """Waits until Ray has placed every group (named by role). After ``timeout_s`` (0: forever) it
    removes them all, so nothing stays reserved or pending, and names the groups that did not fit."""
    refs = {name: pg.ready() for name, pg in groups.items()}
    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s or None)
    if not pending:
        return
    unplaced = [f"{name} {groups[name].bundle_specs}" for name, ref in refs.items() if ref in pending]
    for pg in groups.values():
        remove_placement_group(pg)
    free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items()) if "_group_" not in k}
    raise PlacementTimeoutError(
        f"Ray could not place {'; '.join(unplaced)} within cluster.placement_timeout_s={timeout_s:g}; "
        f"free now: {free}. Lower those roles' num_cpus/num_gpus, rollout.num_engines or num_ranks, "
        f"or add nodes (rlhf-ray config check compares a plan with cluster.nodes)")


def learner_placement_group(lc, timeout_s: float) -> PlacementGroup:
    """One bundle per rank of a learner section (``policy`` or ``critic``), ready to use."""
    pg = placement_group([bundle(lc.num_cpus, lc.num_gpus, lc.ray_resources)] * lc.num_ranks, strategy="PACK")
    wait_for_placement({"learners": pg}, timeout_s)
    return pg


def launch_learner_group(actor_cls, spec: LearnerSpec, num_ranks: int, num_cpus: float, num_gpus: float,
                         pg: PlacementGroup) -> list:
    address, port = free_port_near(pg, 0)
    remote_cls = ray.remote(actor_cls)
    return [
        remote_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=_in_bundle(pg, rank))
        .remote(spec, rank, num_ranks, address, port)
        for rank in range(num_ranks)
    ]


def ship_by_value(rewards: list) -> None:
    """Reward functions given as Python callables (the Python API) travel to the reward actor by
    value, with their module's helpers: a function defined in the user's script, a notebook or a
    test module needs no import path on the workers. Named ones (``module:function``) are
    imported there."""
    import inspect

    from ray import cloudpickle

    for fn in rewards:
        module = inspect.getmodule(fn) if callable(fn) else None
        if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("rlhf_ray."):
            cloudpickle.register_pickle_by_value(module)  # __main__ goes by value already


def launch_roles(cfg, policy_path: str, critic_path: str, reward_paths: list[str],
                 reward_functions: list, reward_weights: list[float], pad_id: int, on_replace=None) -> Roles:
    """Every role of a PPO run, placed together: a plan Ray cannot place fails before any actor starts."""
    pol, cri, sc, ro = cfg.policy, cfg.critic, cfg.scorers, cfg.rollout
    colocate = sc.colocate_with_learners
    n_scorers = sc.reference_replicas + 1  # the reference replicas, then the reward actor
    extra_cpu, extra_gpu = (n_scorers * sc.num_cpus, n_scorers * sc.num_gpus) if colocate else (0.0, 0.0)
    # rollout.colocate: engine r rides in policy rank r's bundle, on its GPU (no groups of its own).
    engine_cpu = ro.num_cpus if ro.colocate else 0.0
    policy_bundles = [bundle(pol.num_cpus + engine_cpu + (extra_cpu if r == 0 else 0),
                             pol.num_gpus + (extra_gpu if r == 0 else 0), pol.ray_resources)
                      for r in range(pol.num_ranks)]
    rollout_groups = [] if ro.colocate else [placement_group([rollout_bundle(cfg)]) for _ in range(ro.num_engines)]
    groups = {"policy": placement_group(policy_bundles, strategy="PACK")}
    if cfg.uses_critic:
        groups["critic"] = placement_group([bundle(cri.num_cpus, cri.num_gpus, cri.ray_resources)] * cri.num_ranks, strategy="PACK")
    if not colocate:
        groups["scorers"] = placement_group([bundle(sc.num_cpus, sc.num_gpus, sc.ray_resources)] * n_scorers,
                                            strategy="PACK")
    wait_for_placement({**{f"rollout engine {i}": pg for i, pg in enumerate(rollout_groups)}, **groups},
                       cfg.cluster.placement_timeout_s)

    scorer_pg = groups["policy"] if colocate else groups["scorers"]
    scorer_bundle = (lambda i: 0) if colocate else (lambda i: i)
    scorer_opts = {"num_cpus": sc.num_cpus, "num_gpus": sc.num_gpus}
    reference = WorkerGroup([ray.remote(ReferenceActor).options(
        **scorer_opts, scheduling_strategy=_in_bundle(scorer_pg, scorer_bundle(i))
    ).remote(policy_path, cfg.model.dtype, cfg.backend, sc.micro_batch_size, cfg.model.trust_remote_code)
        for i in range(sc.reference_replicas)])
    ship_by_value([*reward_functions, *sc.criteria.values()])
    reward = ray.remote(RewardActor).options(
        **scorer_opts, scheduling_strategy=_in_bundle(scorer_pg, scorer_bundle(sc.reference_replicas))
    ).remote(reward_paths, cfg.model.reward_combine, reward_functions, reward_weights, cfg.backend,
             sc.micro_batch_size, sc.criteria, sc.criteria_weights, sc.criteria_combine,
             http=client_for(sc.http), http_weight=sc.http.weight, dtype=cfg.model.dtype,
             trust_remote_code=cfg.model.trust_remote_code, batch_tokenizer=policy_path)

    rollout = RolloutPool(cfg, engine_options(cfg, policy_path), rollout_groups, pad_id, on_replace,
                          colocated_with=groups["policy"] if ro.colocate else None)
    policy = WorkerGroup.launch(PolicyLearnerActor, learner_spec(cfg, pol, policy_path), pol, groups["policy"],
                                owns_group=False, num_gpus=pol.num_gpus * (COLOCATED_GPU_SHARE if ro.colocate else 1))
    critic = WorkerGroup([])
    if cfg.uses_critic:
        critic = WorkerGroup.launch(CriticLearnerActor, learner_spec(cfg, cri, critic_path), cri, groups["critic"],
                                    owns_group=False)
    return Roles(rollout, policy, critic, reference, reward, list(groups.values()))


def learner_spec(cfg, lc, model_path: str, rows_per_step: int | None = None, lr: float | None = None,
                 seed_offset: int = 0) -> LearnerSpec:
    """``rows_per_step``: rows of one optimiser step over all ranks (default: a PPO minibatch)."""
    rows_per_step = rows_per_step or -(-cfg.rollout_batch_size // cfg.ppo.minibatches)
    rows_per_rank = -(-rows_per_step // lc.num_ranks)
    return LearnerSpec(
        model_path=model_path, zero_stage=lc.zero_stage, offload_optimizer=lc.offload_optimizer,
        offload_params=lc.offload_params, lr=lr or lc.lr, weight_decay=lc.weight_decay, grad_clip=lc.grad_clip,
        micro_batch_size=lc.micro_batch_size,
        grad_accum_steps=max(1, -(-rows_per_rank // lc.micro_batch_size)),
        bf16=lc.bf16, backend=cfg.backend, seed=cfg.seed + seed_offset, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, gradient_checkpointing=lc.gradient_checkpointing,
        lora=lora_settings(lc.lora),
    )


def lora_settings(lora) -> LoraSettings | None:
    """The config's LoRA section as plain values for the learners; None when off."""
    if lora.rank == 0:
        return None
    return LoraSettings(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                        target_modules=tuple(lora.target_modules), save_merged=lora.save_merged)


def shutdown_roles(roles: Roles) -> None:
    roles.rollout.shutdown()
    for group in (roles.policy, roles.critic, roles.reference):
        group.shutdown()
    ray.kill(roles.reward)  # a no-op for an actor that already died
    for pg in roles.placement_groups:
        remove_placement_group(pg)
