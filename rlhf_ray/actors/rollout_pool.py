"""The rollout engines as one pool: each engine under a stable id with its placement group and
node. The pool spreads prompts over the live engines, hands a dead engine's prompts to the others
and replaces it (or, with ``rollout.elastic``, follows the cluster: retires engines whose node is
gone or draining and starts engines on new capacity), connects the engines to the policy learner
for weight syncs, broadcasts, and checks that they agree with the learner.

Ids, not list positions: a generation in flight (``ppo.overlap``) remembers which engine holds
which prompts while engines come and go.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Self

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.actors.rollout import RolloutActor
from rlhf_ray.actors.worker_group import WorkerGroup, get_all
from rlhf_ray.data.batch import RolloutBatch, pad_rows
from rlhf_ray.engines.sampling import Generation, SamplingSpec
from rlhf_ray.faults import ActorFailureError, FaultCounter
from rlhf_ray.platform import detect
from rlhf_ray.sync.group import SyncLayout, engines_on_sender_gpu, plan_sync
from rlhf_ray.sync.parity import WeightSyncParityError, check_greedy_parity, check_parity, parity_tolerance

# A colocated learner rank and engine (``rollout.colocate``) each ask Ray for this share of their
# bundle's GPUs: Ray only counts, and both processes see the bundle's device. They share its memory
# by taking turns (the engine sleeps while the learner trains), not by this number.
COLOCATED_GPU_SHARE = 0.5


def engine_options(cfg, model_path: str) -> dict:
    """What every engine of a run is built with, from the config: the one place."""
    ro = cfg.rollout
    return {"model": model_path, "engine": ro.engine, "tensor_parallel_size": ro.tensor_parallel_size,
            "dtype": cfg.model.dtype, "max_model_len": ro.max_model_len,
            "gpu_memory_utilization": ro.gpu_memory_utilization, "enable_prefix_caching": ro.enable_prefix_caching,
            "backend": cfg.backend, "trust_remote_code": cfg.model.trust_remote_code,
            # Log-probs of the distribution actually sampled (after temperature), comparable with
            # the learner's logits / temperature.
            "logprobs_mode": "processed_logprobs", "sleep_mode": ro.colocate}


def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict:
    """One placement-group bundle (no GPU key when none is asked for: CPU clusters have none)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


def rollout_bundle(cfg) -> dict:
    """What one engine asks for: CPUs, its tensor-parallel workers' GPUs, the rollout group's resources."""
    ro = cfg.rollout
    return bundle(ro.num_cpus, ro.num_gpus * ro.tensor_parallel_size, ro.ray_resources)


def group_node(pg: PlacementGroup, bundle_index: int = 0) -> str | None:
    """The node id (hex) Ray placed a ready group's bundle on."""
    return ray.util.placement_group_table(pg)["bundles_to_node_id"].get(bundle_index)


@dataclass
class Engine:
    id: int
    actor: object  # RolloutActor handle
    group: PlacementGroup  # its own one-bundle group, or colocated the policy's (a replacement reuses it)
    bundle: int  # its bundle in ``group``: 0, or colocated its learner rank's
    node: str | None  # the Ray node id the group was placed on


@dataclass
class PendingGeneration:
    """A batch of prompts the engines are sampling, started before it is needed."""

    prompts: list[str]
    policy_version: int  # the iteration whose weights the engines sample with
    ids: list[list[int]]
    spec: SamplingSpec
    calls: list = field(default_factory=list)  # ((engine id, first row, end row), ObjectRef) in flight
    position: int = -1  # the prompt stream's position at prompts[0], when drawn by the driver

    def wait(self) -> None:
        """Until every engine call has finished (results stay in Ray's object store)."""
        refs = [ref for _, ref in self.calls]
        ray.wait(refs, num_returns=len(refs))


@dataclass
class RolloutCapacity:
    """Ray's view of the cluster for rollout engines, at one moment."""

    alive: set[str]  # node ids
    draining: set[str]  # node ids the GCS has a drain request for (autoscaler or preemption)
    free_slots: int  # engines that fit in the free resources of alive, non-draining nodes


def rollout_capacity(cfg) -> RolloutCapacity:
    """Alive and draining nodes from the GCS (the table Ray Serve and the autoscaler read) and how
    many more engine bundles the free resources hold, node by node."""
    from ray._private import state

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    draining = set(state.state.get_draining_nodes()) & alive
    bundle = {k: v for k, v in rollout_bundle(cfg).items() if v > 0}
    free = 0
    for node, available in state.available_resources_per_node().items():
        if node in alive and node not in draining:
            free += int(min(available.get(k, 0.0) / v for k, v in bundle.items()) + 1e-9)
    return RolloutCapacity(alive, draining, free)


class RolloutPool:
    def __init__(self, cfg, options: dict, groups: list[PlacementGroup], pad_id: int,
                 on_replace=None, colocated_with: PlacementGroup | None = None) -> None:
        """Engines in ``groups`` (placed, one bundle each), built with ``options``
        (:func:`engine_options`); or with ``colocated_with`` (``rollout.colocate``), engine i in
        bundle i of that group, the policy learners' (which the pool does not own).
        ``on_replace(n)`` is asked before n engines are replaced and raises to refuse (the run's
        fault limit; by default ``faults.max_engine_replacements`` counted by the pool itself)."""
        self.cfg, self.options, self.pad_id = cfg, options, pad_id
        self.on_replace = on_replace or FaultCounter(0, cfg.faults.max_engine_replacements).take_replacements
        self.engines: dict[int, Engine] = {}
        self._ids = itertools.count()
        self.colocated = colocated_with is not None
        for pg, index in ([(colocated_with, i) for i in range(cfg.rollout.num_engines)] if self.colocated
                          else [(pg, 0) for pg in groups]):
            self._start(pg, index)
        self.asleep: set[int] = set()  # colocated on CUDA: engines released between generate phase and sync
        self.policy: WorkerGroup | None = None  # the weight source, once connected
        self.manifest: dict = {}
        self.layout: SyncLayout | None = None
        self.probe: RolloutBatch | None = None  # a few rollouts of the last generate phase
        self.probe_prompts: list[list[int]] = []  # before the first: prompts to answer greedily

    @classmethod
    def launch(cls, cfg, model_path: str, count: int, pad_id: int, wait: bool = True) -> RolloutPool:
        """``count`` engines of ``model_path`` for stages outside PPO (eval, collect), each in its
        own group on rollout capacity (``rollout.ray_resources``); ``wait``: until they are up."""
        from rlhf_ray.actors.placement import wait_for_placement

        groups = [placement_group([rollout_bundle(cfg)]) for _ in range(count)]
        wait_for_placement({f"rollout engine {i}": pg for i, pg in enumerate(groups)}, cfg.cluster.placement_timeout_s)
        pool = cls(cfg, engine_options(cfg, model_path), groups, pad_id)
        if wait:
            pool.wait_ready()
        return pool

    def wait_ready(self) -> None:
        """Until every engine is up; an engine that cannot start raises its error here."""
        get_all([e.actor.ready.remote() for e in self.engines.values()])

    # --- the engines --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.engines)

    def __iter__(self):
        return (e.actor for e in self.engines.values())

    def __getitem__(self, position: int):
        """The actor of the ``position``-th live engine (in id order)."""
        return list(self.engines.values())[position].actor

    def _start(self, pg: PlacementGroup, bundle_index: int = 0, engine_id: int | None = None) -> Engine:
        engine_id = next(self._ids) if engine_id is None else engine_id
        ro = self.cfg.rollout
        num_gpus = (self.cfg.policy.num_gpus * COLOCATED_GPU_SHARE if self.colocated
                    else ro.num_gpus * ro.tensor_parallel_size)
        actor = ray.remote(RolloutActor).options(
            num_cpus=ro.num_cpus, num_gpus=num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                 placement_group_bundle_index=bundle_index),
        ).remote(**self.options, seed=self.cfg.seed + engine_id)
        self.engines[engine_id] = Engine(engine_id, actor, pg, bundle_index, group_node(pg, bundle_index))
        return self.engines[engine_id]

    def add(self, count: int, timeout_s: float = 60.0) -> list[int]:
        """Up to ``count`` new engines, each in its own group; groups Ray cannot place within
        ``timeout_s`` (the capacity seen was taken meanwhile) are given up. Returns the new ids;
        the engines are starting (``admit`` them)."""
        groups = [placement_group([rollout_bundle(self.cfg)]) for _ in range(count)]
        refs = [pg.ready() for pg in groups]
        ready, _ = ray.wait(refs, num_returns=count, timeout=timeout_s)
        new = []
        for pg, ref in zip(groups, refs):
            if ref in ready:
                new.append(self._start(pg).id)
            else:
                remove_placement_group(pg)
        return new

    def retire(self, ids: list[int], why: str, iteration: int) -> None:
        """Stops the engines (a no-op for dead ones) and frees their groups; the rest form a new
        sync group (the old one lost members)."""
        if not ids:
            return
        for i in ids:
            engine = self.engines.pop(i)
            ray.kill(engine.actor)
            remove_placement_group(engine.group)
        print(f"rollout: iteration {iteration}: retired rollout engine(s) {ids} ({why}); {len(self.engines)} left")
        if self.engines and self.policy is not None:
            self._connect()

    def replace(self, ids: list[int], iteration: int) -> None:
        """New engines in the dead ones' groups, under the same ids; every engine joins a fresh sync
        group, gets the current weights, and the new ones must pass the parity check."""
        self.on_replace(len(ids))
        for i in ids:
            self._start(self.engines[i].group, self.engines[i].bundle, i)
        self.admit(ids, iteration)
        print(f"rollout: replaced engine(s) {ids}; weights synced and parity checked")

    def lost(self, ids: list[int], iteration: int) -> None:
        """Engines found dead: replaced in place, or with elastic rollout retired (the next
        boundary starts engines wherever there is capacity; their node may be gone, which Ray may
        not know yet: an unreachable actor is reported before its node is declared dead)."""
        if not ids:
            return
        if self.cfg.rollout.elastic:
            self.retire(ids, "died", iteration)
        else:
            self.replace(ids, iteration)

    def dead(self, timeout_s: float = 30.0) -> list[int]:
        """Engines whose actor has died (a ping answered by Ray with ``RayActorError``)."""
        pings = {i: e.actor.ready.remote() for i, e in self.engines.items()}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout_s)
        dead = []
        for i, ping in pings.items():
            try:
                ray.get(ping, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(i)
            except ray.exceptions.GetTimeoutError:  # busy, not dead
                pass
        return dead

    def follow_cluster(self, iteration: int) -> int:
        """At an iteration boundary, with ``rollout.elastic``: engines whose node is gone or
        draining retire (a draining one only while more than ``rollout.min_engines`` remain), and
        engines start on free rollout capacity up to ``rollout.max_engines``, admitted as
        replacements are. Returns the count."""
        ro = self.cfg.rollout
        if not ro.elastic:
            return len(self.engines)
        cap = rollout_capacity(self.cfg)
        gone = [i for i, e in self.engines.items() if e.node not in cap.alive]
        draining = [i for i, e in self.engines.items() if e.node in cap.draining and i not in gone]
        healthy = len(self.engines) - len(gone) - len(draining)
        n_add = max(0, min(cap.free_slots, ro.max_engines - healthy))
        keep = max(0, ro.min_engines - healthy - n_add)  # draining engines that serve until replaced
        self.retire(gone + draining[keep:], f"node gone {gone}, draining {draining[keep:]}", iteration)
        new = self.add(n_add) if n_add else []
        if new:
            self.admit(new, iteration)
            print(f"rollout: iteration {iteration}: started rollout engine(s) {new} on new capacity; "
                  f"weights synced and parity checked ({len(self.engines)} engines)")
        if not self.engines:
            raise ActorFailureError(f"no rollout engine left at iteration {iteration} and no free "
                                    f"rollout capacity (rollout.ray_resources={ro.ray_resources})")
        return len(self.engines)

    def shutdown(self) -> None:
        for engine in self.engines.values():
            ray.kill(engine.actor)
            if not self.colocated:  # the policy's group is the placement's to remove
                remove_placement_group(engine.group)
        self.engines.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- generation ---------------------------------------------------------------------------
    def submit(self, prompts: list[str], ids: list[list[int]], spec: SamplingSpec, version: int) -> PendingGeneration:
        """Starts sampling: the prompts split evenly over the live engines, without waiting."""
        pending = PendingGeneration(prompts, version, ids, spec)
        n = len(self.engines)
        bounds = [round(i * len(ids) / n) for i in range(n + 1)]
        pending.calls = self._call(pending, [(a, b) for a, b in itertools.pairwise(bounds) if b > a],
                                   list(self.engines))
        return pending

    def _call(self, pending: PendingGeneration, ranges: list[tuple[int, int]], engine_ids: list[int]) -> list:
        calls = [(engine_ids[k % len(engine_ids)], a, b) for k, (a, b) in enumerate(ranges)]
        return [((i, a, b), self.engines[i].actor.generate.remote(pending.ids[a:b], pending.spec))
                for i, a, b in calls]

    def finish(self, pending: PendingGeneration, iteration: int) -> list[Generation]:
        """The started batch's generations in prompt order. An engine that dies hands its
        unfinished prompts to the others and is replaced (or retired) before the next phase; the
        prompts of an engine retired since the batch started go to the others too."""
        done, dead, calls = {}, [], pending.calls
        while calls:
            retry = []
            for (i, a, b), ref in calls:
                try:
                    done[a] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if i in self.engines and i not in dead:
                        print(f"rollout engine {i} died during iteration {iteration} "
                              f"({type(e).__name__}); its {b - a} prompts go to the other engines")
                        dead.append(i)
                    retry.append((a, b))
            live = [i for i in self.engines if i not in dead]
            if retry and not live:
                raise ActorFailureError(f"every rollout engine died during iteration {iteration}")
            calls = self._call(pending, retry, live)
        out = []
        for offset in sorted(done):
            for g in done[offset]:
                g.prompt_index += offset
                out.append(g)
        self.probe = RolloutBatch.from_token_lists([g.prompt_ids for g in out[:4]], [g.response_ids for g in out[:4]],
                                                   self.pad_id)
        self.lost(dead, iteration)
        return out

    def generate(self, prompts: list[str], ids: list[list[int]], spec: SamplingSpec, iteration: int) -> list[Generation]:
        return self.finish(self.submit(prompts, ids, spec, iteration), iteration)

    def sampler(self) -> PoolSampler:
        """The engines as a multi-turn rollout's sampler (``rlhf_ray.agents.loop``)."""
        return PoolSampler(self)

    # --- weights ------------------------------------------------------------------------------
    def connect(self, policy: WorkerGroup, bucket_bytes: int, transport: str) -> None:
        """Every worker of every engine joins policy rank 0's sync group, over the transport that
        ``sync.transport`` picks; later replacements and new engines join again by themselves.
        The group's backend is the platform rank 0 found (``backend: auto`` resolved where the
        GPUs are: the driver may sit on a GPU-free head node, where it would pick gloo)."""
        platform = detect(ray.get(policy[0].platform_name.remote()))
        self.policy, self.bucket_bytes, self.transport, self.platform = policy, bucket_bytes, transport, platform
        if self.colocated and not self.sleeps:
            print(f"rollout.colocate on {platform.name} with the {self.cfg.rollout.engine} engine: engines cannot "
                  "sleep here, so engines and learners both stay resident; the weights still go from each "
                  "learner rank to the engine beside it through shared memory, as CUDA IPC does on GPUs")
        self._connect()

    @property
    def sleeps(self) -> bool:
        """Whether the engines release their memory while the learners train: colocated vLLM on
        CUDA (vLLM's sleep mode exists there only)."""
        return self.colocated and not self.platform.is_cpu and self.cfg.rollout.engine == "vllm"

    def _connect(self) -> None:
        sender, engines = self.policy[0], list(self)
        self.manifest = ray.get(sender.weight_manifest.remote(self.bucket_bytes, self.cfg.model.dtype))
        if self.colocated:
            by_rank = sorted(self.engines.values(), key=lambda e: e.bundle)
            open_colocated_sync(list(self.policy), [(e.id, e.actor) for e in by_rank], self.manifest)
            return
        self.layout = weight_sync_layout(sender, engines, self.transport, self.cfg.rollout.tensor_parallel_size,
                                         self.platform)
        open_weight_sync(sender, engines, self.manifest, self.layout, self.platform.dist_backend)

    def sleep(self) -> None:
        """After the generate phase, colocated on CUDA: the engines release their GPU memory for
        the learners (``sync`` wakes them). Elsewhere nothing happens."""
        if self.sleeps:
            get_all([e.actor.sleep.remote() for e in self.engines.values()])
            self.asleep = set(self.engines)

    def _wake(self, tags: list[str]) -> None:
        """Engines still asleep (not a replacement, which starts awake) take back ``tags``' memory."""
        get_all([self.engines[i].actor.wake_up.remote(tags) for i in self.asleep])

    def broadcast(self) -> None:
        """The learner's weights into every engine. Senders (every rank joins the ZeRO-3 gather)
        and receivers run at the same time."""
        refs = self.policy.submit("send_weights", self.manifest).refs
        refs += [e.receive_weights.remote(self.manifest) for e in self]
        get_all(refs)

    def sync(self, iteration: int) -> None:
        """A broadcast. An engine that died since its last call (while the learners trained, say)
        is replaced first, which syncs every engine itself. One that dies during the broadcast
        leaves the learner inside a collective: that is a restart."""
        dead = self.dead()
        # Colocated engines asleep: the weights' memory back first (the KV cache stays released
        # while the buckets arrive), then the cache. A replacement (same id) starts awake.
        self.asleep -= set(dead)
        self._wake(["weights"])
        if dead:
            print(f"rollout engine(s) {dead} died before the sync of iteration {iteration}")
            self.lost(dead, iteration)
            if self.cfg.rollout.elastic:  # retired, not replaced: the others still need the weights
                self.broadcast()
        else:
            self.broadcast()
        self._wake(["kv_cache"])
        self.asleep.clear()

    def admit(self, new: list[int], iteration: int) -> None:
        """Started engines join a fresh sync group with all others (its membership changed), get
        the current weights and must pass the parity check before they serve a prompt. The probe is
        a few rollouts of the last generate phase; before the first, the first new engine's greedy
        answers to a few dataset prompts."""
        ray.get([self.engines[i].actor.ready.remote() for i in new])
        if self.policy is None:  # serving a fixed checkpoint (eval, collect): nothing to sync
            return
        self._connect()
        self.broadcast()
        probe = self.probe
        if probe is None:
            responses = ray.get(self.engines[new[0]].actor.greedy.remote(self.probe_prompts,
                                                                          self.cfg.rollout.max_new_tokens))
            probe = RolloutBatch.from_token_lists(self.probe_prompts, responses, self.pad_id)
        self.check_parity(probe, iteration, new)

    def check_parity(self, batch: RolloutBatch, iteration: int, engine_ids: list[int] | None = None) -> None:
        """After a sync, every engine (or those listed) must agree with the learner: log-probs of the
        same responses and greedy decoding, within the tolerance of ``model.dtype`` (or the
        ``sync.parity_*`` keys)."""
        sc = self.cfg.sync
        tol = parity_tolerance(self.cfg.model.dtype, sc.parity_atol, sc.parity_mean_atol, sc.parity_greedy_agreement)
        probe = batch.select(slice(0, min(4, batch.size)))
        learner_lp, _ = self.policy.gather("logprobs", probe, 1.0)
        prompts, responses = probe.prompt_token_lists(), probe.response_token_lists()
        for i in list(self.engines if engine_ids is None else engine_ids):
            engine = self.engines[i].actor
            try:
                engine_lp = pad_rows(ray.get(engine.score.remote(prompts, responses)), probe.response_mask.shape[1])
                greedy = ray.get(engine.greedy.remote(prompts, self.cfg.rollout.max_new_tokens))
            except ray.exceptions.RayActorError:
                print(f"rollout engine {i} died during the parity check of iteration {iteration}")
                self.lost([i], iteration)  # a replacement is synced and parity-checked
                continue
            greedy_batch = RolloutBatch.from_token_lists(prompts, greedy, self.pad_id)
            learner_greedy = self.policy.gather("greedy_tokens", greedy_batch, tol.greedy_tie_atol)
            try:
                check_parity(learner_lp, engine_lp, probe.response_mask, tol.max_abs, mean_atol=tol.mean_abs)
                check_greedy_parity(
                    [row[m.bool()].tolist() for row, m in zip(learner_greedy, greedy_batch.response_mask)],
                    greedy_batch.response_token_lists(), tol.greedy_agreement)
            except WeightSyncParityError as e:
                raise WeightSyncParityError(f"rollout engine {i} after the sync of iteration {iteration}: {e}") from None


class PoolSampler:
    """The pool's engines for a multi-turn rollout: each call of a turn goes to the engine with the
    fewest calls in flight. A call whose engine died is sent to another one: the trajectories'
    tokens so far are the driver's, so only that turn is sampled again (``retried_calls``). The
    dead engines are ``dead``; the driver hands them to ``RolloutPool.lost`` after the rollout."""

    def __init__(self, pool: RolloutPool) -> None:
        self.pool = pool
        self.in_flight = dict.fromkeys(pool.engines, 0)
        self.dead: list[int] = []
        self.retried_calls = 0

    @property
    def engines(self) -> int:
        return max(1, len(self.in_flight) - len(self.dead))

    def submit(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Future:
        result: Future = Future()
        self._attempt(prompt_ids, spec, result)
        return result

    def _attempt(self, prompt_ids: list[list[int]], spec: SamplingSpec, result: Future) -> None:
        live = [i for i in self.in_flight if i not in self.dead]
        if not live:
            result.set_exception(ActorFailureError("every rollout engine died during a multi-turn rollout"))
            return
        engine = min(live, key=self.in_flight.__getitem__)
        self.in_flight[engine] += 1
        call = self.pool.engines[engine].actor.generate.remote(prompt_ids, spec).future()

        def done(call: Future) -> None:  # on a Ray thread
            self.in_flight[engine] -= 1
            error = call.exception()
            if isinstance(error, ray.exceptions.RayActorError):
                if engine not in self.dead:
                    print(f"rollout engine {engine} died during a multi-turn rollout ({type(error).__name__}); "
                          f"its turns go to the other engines")
                    self.dead.append(engine)
                self.retried_calls += 1
                self._attempt(prompt_ids, spec, result)
            elif error is not None:
                result.set_exception(error)
            else:
                result.set_result(call.result())

        call.add_done_callback(done)


def weight_sync_layout(sender, engines: list, transport: str, workers_per_engine: int, platform) -> SyncLayout:
    """Engines on the sender's (policy rank 0's) node take the weights through shared memory when
    ``transport`` (``sync.transport``) and the platform allow; the rest join one broadcast group."""
    sender_node, *engine_nodes = ray.get([a.__ray_call__.remote(_node_id) for a in [sender, *engines]])
    return plan_sync(transport, [n == sender_node for n in engine_nodes], workers_per_engine,
                     platform.shm_weight_sync)


def open_weight_sync(sender, engines: list, manifest: dict, layout: SyncLayout, backend: str) -> None:
    """Connects the sender (the policy learner's sync verbs) with every engine, as ``layout`` says.
    Refuses, before NCCL would, an engine worker on learner rank 0's GPU."""
    if backend == "nccl":
        sender_uuid, *engine_uuids = ray.get([sender.device_uuid.remote(), *(e.device_uuids.remote() for e in engines)])
        if shared := engines_on_sender_gpu(sender_uuid, engine_uuids):
            raise ValueError(f"rollout engine(s) {shared} have a worker on learner rank 0's GPU ({sender_uuid}): "
                             f"NCCL cannot join two ranks on one GPU; give the rollout and learner roles separate "
                             f"GPUs (rollout.ray_resources, policy.ray_resources)")
    shm_path = ray.get(sender.create_weight_segment.remote(manifest)) if layout.shm_world > 1 else None
    port, address = ray.get([sender.free_port.remote(), sender.node_ip.remote()])
    refs = [sender.open_weight_sync.remote(port, layout.broadcast_world, layout.shm_world)]
    for i, engine in enumerate(engines):
        group = layout.engine_group(i)
        refs.append(engine.join_weight_sync.remote(address, port, group["world_size"], group["rank_offset"],
                                                   backend, shm_path=shm_path if group["shm"] else None))
    ray.get(refs)


def open_colocated_sync(ranks: list, engines: list[tuple[int, object]], manifest: dict) -> None:
    """Learner rank r and engine r share a device (``rollout.colocate``): each pair opens its own
    hand-over (``rlhf_ray.sync.ipc``), rank r hosting it on its node."""
    slot_bytes = max((b["nbytes"] for b in manifest["buckets"]), default=0)
    ports = ray.get([rank.free_port.remote() for rank in ranks])
    addresses = ray.get([rank.open_colocated_sync.remote(port, slot_bytes, f"rollout engine {engine_id}")
                         for rank, port, (engine_id, _) in zip(ranks, ports, engines)])
    get_all([engine.join_colocated_sync.remote(address, port, f"policy rank {r}")
             for r, (address, port, (_, engine)) in enumerate(zip(addresses, ports, engines))]
            + [rank.wait_colocated_joined.remote() for rank in ranks])


def _node_id(_actor) -> str:
    """Run inside an actor (``__ray_call__``): the Ray node it lives on."""
    return ray.get_runtime_context().get_node_id()

