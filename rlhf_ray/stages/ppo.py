"""The PPO driver: generate, score, compute advantages, update, sync weights, log.

A single controller: this loop owns every decision; the actors it drives only run their engines.
Read ``PPOTrainer.iteration`` top to bottom for one step of RLHF.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlhf_ray import algo
from rlhf_ray.actors.placement import (
    Roles,
    add_rollout_engines,
    launch_roles,
    retire_rollout_engines,
    rollout_capacity,
    shutdown_roles,
    start_rollout_engine,
)
from rlhf_ray.config import RunConfig, config_to_dict, dump_config
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.tokenize import encode_pairs, encode_prompts
from rlhf_ray.platform import detect
from rlhf_ray.stages import checkpoint as ckpt
from rlhf_ray.stages.common import (
    check_inputs,
    check_model_fits,
    init_ray,
    prepare_run,
    resolve_policy_path,
    reward_sources,
)
from rlhf_ray.stages.guards import RolloutGuards
from rlhf_ray.stages.prepare import FaultCounter, Scored, iteration_record, nonfinite_phase, prepare_batch
from rlhf_ray.stages.sft import load_lm_examples
from rlhf_ray.sync.group import SyncLayout, plan_sync
from rlhf_ray.sync.parity import WeightSyncParityError, check_greedy_parity, check_parity
from rlhf_ray.tasks import GOLD_COMPONENT
from rlhf_ray.tracking import MetricsWriter, PhaseTimer, plot_metrics


class ActorFailureError(RuntimeError):
    """An actor died and the run may not (or may no longer) restart or replace it."""


@dataclass
class PendingGeneration:
    """A batch of prompts the rollout engines are sampling, started before it is needed."""

    prompts: list[str]
    policy_version: int  # the iteration whose weights the engines sample with
    ids: list[list[int]]
    spec: object  # SamplingSpec
    calls: list  # ((engine, first row, end row), ObjectRef) in flight
    position: int = -1  # the prompt stream's position at prompts[0], when drawn by the driver

    def wait(self) -> None:
        """Until every engine call has finished (results stay in Ray's object store)."""
        refs = [ref for _, ref in self.calls]
        ray.wait(refs, num_returns=len(refs))


class PPOTrainer:
    def __init__(self, cfg: RunConfig):
        from rlhf_ray.data.prompts import PromptStream, load_prompts
        from rlhf_ray.models.loading import load_tokenizer

        self.cfg = cfg
        self.platform = detect(cfg.backend)
        check_inputs(cfg)
        self.run_dir = prepare_run(cfg)
        self.policy_path = resolve_policy_path(cfg, self.run_dir)
        check_model_fits(cfg, self.policy_path)
        self.tokenizer = load_tokenizer(self.policy_path, trust_remote_code=cfg.model.trust_remote_code)
        self.prompts = PromptStream(load_prompts(cfg.data, cfg.seed, self.tokenizer), cfg.seed, cfg.data.shuffle)
        # Pretraining-mix text for the ptx loss (alignment-tax mitigation), read before any actor starts.
        self.ptx_examples = (load_lm_examples(cfg, cfg.ppo.ptx_data, self.tokenizer, held_out=False)
                             if cfg.ppo.ptx_coef else [])
        self.metrics = MetricsWriter(self.run_dir, tensorboard_step="iteration" if cfg.logging.tensorboard else None)
        self.samples = MetricsWriter(self.run_dir, "samples.jsonl")
        self.prompt_log = MetricsWriter(self.run_dir, "prompts.jsonl")  # which prompts each iteration used
        self.engine_kwargs = {"model": self.policy_path, "engine": cfg.rollout.engine,
                              "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
                              "dtype": cfg.model.dtype, "max_model_len": cfg.rollout.max_model_len,
                              "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
                              "enable_prefix_caching": cfg.rollout.enable_prefix_caching, "backend": cfg.backend,
                              "trust_remote_code": cfg.model.trust_remote_code,
                              # Log-probs of the distribution actually sampled (after temperature),
                              # comparable with the learner's logits / temperature.
                              "logprobs_mode": "processed_logprobs"}
        self._reset_state()
        self._parity_probe: RolloutBatch | None = None  # a few rollouts of the last generate phase
        resume = cfg.checkpoint.resume == "auto"
        resume_from = self._resume_point() if resume else None  # a bad checkpoint fails before actors start
        init_ray(cfg)  # only once every input is known good
        self._launch()
        if resume:
            self.resume(resume_from)

    def _reset_state(self) -> None:
        """The driver's state at iteration 0 (a checkpoint replaces all of it)."""
        cfg = self.cfg
        self.iteration = 0
        self.prompts.position = 0
        self.kl_ctl = algo.make_kl_controller(cfg.ppo.kl_controller, cfg.ppo.kl_coef, cfg.ppo.kl_target,
                                              cfg.ppo.kl_horizon)
        self.guards = RolloutGuards(cfg.safeguards)
        # Engine replacements and restarts survive a rollback to a checkpoint: their limits are on
        # what happened, not on iterations.
        survived = getattr(self, "faults", None)
        self.faults = FaultCounter(cfg.faults.max_consecutive_nonfinite, cfg.faults.max_engine_replacements)
        if survived is not None:
            self.faults.engine_replacements, self.faults.restarts = survived.engine_replacements, survived.restarts
        self._pending: PendingGeneration | None = None  # ppo.overlap: the next batch, being sampled

    def _launch(self) -> None:
        functions, weights = reward_sources(self.cfg)
        self.roles: Roles = launch_roles(self.cfg, self.policy_path, self.cfg.model.critic or self.policy_path,
                                         self.cfg.model.reward, functions, weights, self.engine_kwargs)
        self._open_weight_sync()

    # --- one iteration ------------------------------------------------------------------------
    def step(self) -> dict:
        cfg, ppo, roles = self.cfg, self.cfg.ppo, self.roles
        timer = PhaseTimer()
        temperature = cfg.rollout.temperature
        n_engines = self._follow_cluster()

        with timer("generate"):
            if self._pending is None:  # sampled now, with the weights of the last update
                position, version = self.prompts.position, self.iteration
                prompts = self.prompts.next_batch(ppo.prompts_per_iteration)
                generations = self._generate(prompts)
            else:  # ppo.overlap: started during the last iteration's training, one update behind
                position, version, prompts = self._pending.position, self._pending.policy_version, self._pending.prompts
                generations = self._finish_generation(self._pending)
            # ppo.overlap: the engines sample the next batch while this one is scored and trained.
            last = self.iteration + 1 >= ppo.iterations
            self._pending = self._start_generation(self.iteration + 1) if ppo.overlap and not last else None
            batch = RolloutBatch.from_token_lists([g.prompt_ids for g in generations],
                                                  [g.response_ids for g in generations],
                                                  self.tokenizer.pad_token_id)
            rollout_logprobs = _pad_rows([g.logprobs for g in generations], batch.response_mask.shape[1])
            prompt_texts = [prompts[g.prompt_index] for g in generations]
            response_texts = self.tokenizer.batch_decode(batch.response_token_lists(), skip_special_tokens=True)
            truncated = torch.tensor([g.finish_reason == "length" for g in generations])

        with timer("score"):
            # ppo.old_logprobs=rollout: the engines' sampling log-probs stand in for the policy's.
            recompute = ppo.old_logprobs == "learner"
            policy_refs = ([a.logprobs.remote(s, temperature) for a, s in zip(roles.policy, batch.chunk(len(roles.policy)))]
                           if recompute else [])
            critic_refs = [a.values.remote(s) for a, s in zip(roles.critic, batch.chunk(len(roles.critic or [0])))]
            ref_refs = [a.logprobs.remote(s, temperature) for a, s in zip(roles.reference, batch.chunk(len(roles.reference)))]
            reward_ref = roles.reward.score.remote(batch, prompt_texts, response_texts)
            old_logprobs = torch.cat([lp for lp, _ in get_all(policy_refs)]) if recompute else rollout_logprobs
            values = torch.cat(get_all(critic_refs)) if critic_refs else None
            ref_logprobs = torch.cat(get_all(ref_refs))
            rewards = get_all([reward_ref])[0]

        scored = Scored(old_logprobs, ref_logprobs, rollout_logprobs, values, rewards["score"], truncated)
        bad = nonfinite_phase(batch.response_mask, score=[old_logprobs, ref_logprobs, values], reward=[rewards["score"]])
        if bad:
            return self._skip_batch(bad, position, prompts, timer)
        lengths = batch.response_mask.sum(-1)
        scored.scores = self.guards.regularise(rewards["score"], prompt_texts, response_texts, lengths)
        kl_coef = self.kl_ctl.value
        # The samples came from older weights (ppo.overlap): reweight tokens by pi_learner / pi_sampler.
        prepared = prepare_batch(batch, scored, cfg, kl_coef, importance_correction=ppo.overlap and recompute)
        guard_metrics = self.guards.inspect(prompt_texts, response_texts, lengths, prepared.scores,
                                            rewards.get(f"reward/{GOLD_COMPONENT}"))
        bad = nonfinite_phase(batch.response_mask, advantages=[prepared.advantages, prepared.returns])
        if bad:
            return self._skip_batch(bad, position, prompts, timer)

        with timer("train"):
            train_stats = self._train(prepared.batch, temperature)
        # DeepSpeed refused the optimiser steps whose gradients were not finite: weights unchanged.
        self.faults.batch_done("loss" if train_stats.get("skipped_steps", 0) > 0
                               or not all(math.isfinite(v) for v in train_stats.values()) else None,
                               self.iteration + 1)

        if self._pending is not None:
            with timer("overlap_wait"):  # the engines take new weights only once the next batch is sampled
                self._pending.wait()
        with timer("sync"):
            self._sync_weights()
            if cfg.sync.parity_every and (self.iteration + 1) % cfg.sync.parity_every == 0:
                self.check_sync_parity(prepared.batch)

        self.kl_ctl.update(prepared.kl_per_seq.mean().item(), n_steps=batch.size)
        self.iteration += 1
        record = iteration_record(
            self.iteration, position, prepared, scored, rewards, kl_coef, train_stats, guard_metrics, timer.seconds,
            recompute, {"policy_version": version, "policy_lag": self.iteration - 1 - version,
                        "rollout/engines": n_engines, **self.faults.metrics()})
        self.metrics.write(record)
        self.prompt_log.write({"iteration": self.iteration, "position": position, "prompts": prompts})
        self._write_samples(prompt_texts, response_texts, prepared.scores, rewards, prepared.kl_per_seq, truncated,
                            version)
        return record

    # --- non-finite batches -----------------------------------------------------------------
    def _skip_batch(self, phase: str, position: int, prompts: list[str], timer: PhaseTimer) -> dict:
        """A batch with non-finite values in ``phase`` trains nothing; its prompts are used up and
        the iteration counts, so the data order and the metrics stay those of a clean run."""
        self.faults.batch_done(phase, self.iteration + 1)
        self.iteration += 1
        print(f"ppo: iteration {self.iteration}: non-finite {phase} values, batch skipped "
              f"({self.faults.consecutive_nonfinite} in a row)")
        record = {"iteration": self.iteration, "prompts_position": position, "skipped_nonfinite": phase,
                  "reward_mean": float("nan"), "kl_to_ref": float("nan"),
                  **{f"time/{k}_s": v for k, v in timer.seconds.items()}, **self.faults.metrics()}
        self.metrics.write(record)
        self.prompt_log.write({"iteration": self.iteration, "position": position, "prompts": prompts})
        return record

    def _write_samples(self, prompts, responses, scores, rewards, kl_per_seq, truncated, version) -> None:
        """A fixed-size sample of this iteration's rollouts, for people to read (``rlhf-ray view``)."""
        n = min(self.cfg.logging.samples_per_iteration, len(responses))
        components = {k.removeprefix("reward/"): v for k, v in rewards.items() if k.startswith("reward/")}
        rows = [{"iteration": self.iteration, "prompt": prompts[i], "response": responses[i],
                 "reward": scores[i].item(), "components": {k: v[i].item() for k, v in components.items()},
                 "kl": kl_per_seq[i].item(), "truncated": bool(truncated[i]), "policy_version": version}
                for i in range(n)]
        self.samples.write_many(rows)

    # --- the steps, each a few remote calls -------------------------------------------------
    def _generate(self, prompts: list[str]):
        """Spreads the prompts over all engines and returns generations in prompt order."""
        return self._finish_generation(self._submit_prompts(prompts, self.iteration))

    def _start_generation(self, iteration: int) -> PendingGeneration:
        """Draws the prompts of ``iteration`` and starts sampling them without waiting."""
        position = self.prompts.position
        pending = self._submit_prompts(self.prompts.next_batch(self.cfg.ppo.prompts_per_iteration), iteration)
        pending.position = position
        return pending

    def _submit_prompts(self, prompts: list[str], iteration: int) -> PendingGeneration:
        ids = encode_prompts(self.tokenizer, prompts, self.cfg.data.max_prompt_tokens)
        n_engines = len(self.roles.rollout)
        bounds = [round(i * len(ids) / n_engines) for i in range(n_engines + 1)]
        pending = PendingGeneration(prompts, self.iteration, ids, self._sampling_spec(iteration), [])
        pending.calls = self._call_engines(pending, [(a, b) for a, b in itertools.pairwise(bounds) if b > a],
                                           list(range(n_engines)))
        return pending

    def _call_engines(self, pending: PendingGeneration, ranges: list[tuple[int, int]], engines: list[int]) -> list:
        calls = [(engines[k % len(engines)], a, b) for k, (a, b) in enumerate(ranges)]
        return [((i, a, b), self.roles.rollout[i].generate.remote(pending.ids[a:b], pending.spec))
                for i, a, b in calls]

    def _finish_generation(self, pending: PendingGeneration):
        """The started batch's generations in prompt order. An engine that dies hands its
        unfinished prompts to the others and is replaced before the next phase."""
        done, dead, calls = {}, set(), pending.calls
        while calls:
            retry = []
            for (i, a, b), ref in calls:
                try:
                    done[a] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    print(f"ppo: rollout engine {i} died during iteration {self.iteration + 1} "
                          f"({type(e).__name__}); its {b - a} prompts go to the other engines")
                    dead.add(i)
                    retry.append((a, b))
            live = [i for i in range(len(self.roles.rollout)) if i not in dead]
            if retry and not live:
                raise ActorFailureError(f"every rollout engine died during iteration {self.iteration + 1}")
            calls = self._call_engines(pending, retry, live)
        out = []
        for offset in sorted(done):
            for g in done[offset]:
                g.prompt_index += offset
                out.append(g)
        self._parity_probe = RolloutBatch.from_token_lists([g.prompt_ids for g in out[:4]],
                                                           [g.response_ids for g in out[:4]],
                                                           self.tokenizer.pad_token_id)
        dead = self._retire_dead_engines(sorted(dead))
        if dead:
            self._replace_engines(dead)
        return out

    def _dead_engines(self, timeout_s: float = 30.0) -> list[int]:
        """Rollout engines whose actor has died (a ping answered by Ray with ``RayActorError``)."""
        pings = [e.ready.remote() for e in self.roles.rollout]
        ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        dead = []
        for i, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(i)
            except ray.exceptions.GetTimeoutError:  # busy, not dead
                pass
        return dead

    def _replace_engines(self, dead: list[int]) -> None:
        """New engines in the dead ones' bundles; every engine joins a fresh sync group (the old one
        lost members), gets the current weights, and the new ones must pass the parity check."""
        if not self.faults.replacements_left(len(dead)):
            raise ActorFailureError(f"rollout engine(s) {dead} died at iteration {self.iteration + 1} and "
                                    f"faults.max_engine_replacements={self.faults.max_engine_replacements} "
                                    f"is used up")
        for i in dead:
            self.roles.rollout[i] = start_rollout_engine(self.cfg, self.roles.rollout_groups[i], i, self.engine_kwargs)
        self.faults.engine_replacements += len(dead)
        self._admit_engines(dead)
        print(f"ppo: replaced rollout engine(s) {dead}; weights synced and parity checked")

    def _admit_engines(self, new: list[int]) -> None:
        """Started engines join a fresh sync group with all others (its membership changed), get
        the current weights and must pass the parity check before they serve a prompt. The probe is
        a few rollouts of the last generate phase; before the first, the first new engine's greedy
        answers to a few dataset prompts."""
        ray.get([self.roles.rollout[i].ready.remote() for i in new])
        self._open_weight_sync()
        self._broadcast_weights()
        probe = self._parity_probe
        if probe is None:
            prompts = encode_prompts(self.tokenizer, self.prompts.prompts[:4], self.cfg.data.max_prompt_tokens)
            responses = ray.get(self.roles.rollout[new[0]].greedy.remote(prompts, self.cfg.rollout.max_new_tokens))
            probe = RolloutBatch.from_token_lists(prompts, responses, self.tokenizer.pad_token_id)
        self.check_sync_parity(probe, engines=new)

    # --- elastic rollout (rollout.elastic) ----------------------------------------------------
    def _follow_cluster(self) -> int:
        """At an iteration boundary: engines whose node is gone or draining retire (a draining one
        only while more than ``rollout.min_engines`` remain), and engines start on free rollout
        capacity up to ``rollout.max_engines``, admitted as replacements are. Returns the count."""
        ro, roles = self.cfg.rollout, self.roles
        if not ro.elastic:
            return len(roles.rollout)
        cap = rollout_capacity(self.cfg)
        gone = [i for i, node in enumerate(roles.rollout_nodes) if node not in cap.alive]
        draining = [i for i, node in enumerate(roles.rollout_nodes) if node in cap.draining and i not in gone]
        healthy = len(roles.rollout) - len(gone) - len(draining)
        n_add = max(0, min(cap.free_slots, ro.max_engines - healthy))
        keep = max(0, ro.min_engines - healthy - n_add)  # draining engines that serve until replaced
        self._retire_engines(gone + draining[keep:], f"node gone {gone}, draining {draining[keep:]}")
        new = add_rollout_engines(self.cfg, roles, n_add, self.engine_kwargs) if n_add else []
        if new:
            self._admit_engines(new)
            print(f"ppo: iteration {self.iteration + 1}: started rollout engine(s) {new} on new capacity; "
                  f"weights synced and parity checked ({len(roles.rollout)} engines)")
        if not roles.rollout:
            raise ActorFailureError(f"no rollout engine left at iteration {self.iteration + 1} and no free "
                                    f"rollout capacity (rollout.ray_resources={ro.ray_resources})")
        return len(roles.rollout)

    def _retire_dead_engines(self, dead: list[int]) -> list[int]:
        """Engines that died mid-iteration and are to be replaced in place. With elastic rollout none
        are: they retire, and the next boundary starts engines wherever there is capacity (their node
        may be gone, which Ray may not know yet: an unreachable actor is reported before its node is
        declared dead)."""
        if not self.cfg.rollout.elastic:
            return dead
        self._retire_engines(dead, "died")
        return []

    def _retire_engines(self, indices: list[int], why: str) -> None:
        if not indices:
            return
        retire_rollout_engines(self.roles, indices)
        print(f"ppo: iteration {self.iteration + 1}: retired rollout engine(s) {indices} ({why}); "
              f"{len(self.roles.rollout)} left")
        if self.roles.rollout:
            self._open_weight_sync()  # the old group lost members

    def _sampling_spec(self, iteration: int):
        from rlhf_ray.engines.vllm_engine import SamplingSpec

        r = self.cfg.rollout
        return SamplingSpec(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                            n=r.samples_per_prompt, stop_token_ids=(self.tokenizer.eos_token_id,),
                            seed=self.cfg.seed * 1_000_003 + iteration * 10_007)

    def _train(self, batch: RolloutBatch, temperature: float) -> dict:
        """``ppo.epochs`` passes, each over ``ppo.minibatches`` shuffled minibatches; policy and
        critic learners step in parallel, each rank on its shard."""
        ppo, roles = self.cfg.ppo, self.roles
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.iteration)
        stats: list[dict] = []
        for _ in range(ppo.epochs):
            order = torch.randperm(batch.size, generator=generator)
            for mb_index in order.tensor_split(ppo.minibatches):
                minibatch = batch.select(mb_index)
                shards = minibatch.chunk(len(roles.policy))
                ptx_shards = (self._ptx_minibatch(minibatch.size, generator).chunk(len(shards))
                              if self.ptx_examples else [None] * len(shards))
                refs = [a.train_step.remote(s, ppo.clip_eps, ppo.entropy_coef, ppo.loss_agg, temperature, ptx,
                                            ppo.ptx_coef, ppo.distill_coef, ppo.distill_kl_estimator)
                        for a, s, ptx in zip(roles.policy, shards, ptx_shards)]
                if roles.critic:
                    refs += [a.train_step.remote(s, ppo.value_clip_eps, ppo.loss_agg)
                             for a, s in zip(roles.critic, minibatch.chunk(len(roles.critic)))]
                results = get_all(refs)
                # Learner ranks already all-reduced their stats; take rank 0 of each group.
                merged = dict(results[0])
                if roles.critic:
                    merged.update(results[len(roles.policy)])
                stats.append(merged)
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    def _ptx_minibatch(self, rows: int, generator: torch.Generator) -> RolloutBatch:
        """``rows`` pretraining-mix examples drawn at random (reproducible from the iteration's seed)."""
        picks = [self.ptx_examples[i]
                 for i in torch.randint(len(self.ptx_examples), (rows,), generator=generator).tolist()]
        return encode_pairs(self.tokenizer, [e.prompt for e in picks], [e.response for e in picks],
                            self.cfg.data.max_prompt_tokens, self.cfg.data.max_seq_len)

    def _open_weight_sync(self) -> None:
        """Policy rank 0 and every worker of every engine, over the transport that ``sync.transport`` picks."""
        self.weight_manifest = ray.get(self.roles.policy[0].weight_manifest.remote(self.cfg.sync.bucket_mb << 20))
        self.weight_layout = weight_sync_layout(self.roles.policy[0], self.roles.rollout, self.cfg.sync.transport,
                                                self.cfg.rollout.tensor_parallel_size, self.platform)
        open_weight_sync(self.roles.policy[0], self.roles.rollout, self.weight_manifest, self.weight_layout,
                         self.platform.dist_backend)

    def _sync_weights(self) -> None:
        """The learner's weights to every engine. An engine that died since its last call (while
        the learners trained, say) is replaced first, which syncs all engines itself. One that dies
        during the broadcast leaves the learner inside a collective: that is a restart."""
        dead = self._retire_dead_engines(self._dead_engines())
        if dead:
            print(f"ppo: rollout engine(s) {dead} died before the sync of iteration {self.iteration + 1}")
            self._replace_engines(dead)
        else:
            self._broadcast_weights()

    def _broadcast_weights(self) -> None:
        # Senders (every rank joins the ZeRO-3 gather) and receivers run at the same time.
        refs = [a.send_weights.remote(self.weight_manifest) for a in self.roles.policy]
        refs += [e.receive_weights.remote(self.weight_manifest) for e in self.roles.rollout]
        get_all(refs)

    def check_sync_parity(self, batch: RolloutBatch, engines: list[int] | None = None) -> None:
        """After a sync, every engine (or those listed) must agree with the learner: log-probs of the
        same responses within ``sync.parity_atol``, and greedy decoding token for token."""
        probe = batch.select(slice(0, min(4, batch.size)))
        shards = probe.chunk(len(self.roles.policy))
        learner_lp = torch.cat([lp for lp, _ in ray.get([a.logprobs.remote(s, 1.0)
                                                         for a, s in zip(self.roles.policy, shards)])])
        prompts, responses = probe.prompt_token_lists(), probe.response_token_lists()
        for i, engine in enumerate(self.roles.rollout):
            if engines is not None and i not in engines:
                continue
            what = f"rollout engine {i} after the sync of iteration {self.iteration}"
            try:
                engine_lp = _pad_rows(ray.get(engine.score.remote(prompts, responses)), probe.response_mask.shape[1])
                greedy = ray.get(engine.greedy.remote(prompts, self.cfg.rollout.max_new_tokens))
            except ray.exceptions.RayActorError:
                print(f"ppo: rollout engine {i} died during the parity check of iteration {self.iteration}")
                self._replace_engines([i])  # the new engine is synced and parity-checked
                continue
            greedy_batch = RolloutBatch.from_token_lists(prompts, greedy, self.tokenizer.pad_token_id)
            learner_greedy = torch.cat(ray.get([a.greedy_tokens.remote(s) for a, s in zip(
                self.roles.policy, greedy_batch.chunk(len(self.roles.policy)))]))
            try:
                check_parity(learner_lp, engine_lp, probe.response_mask, self.cfg.sync.parity_atol)
                check_greedy_parity(
                    [row[m.bool()].tolist() for row, m in zip(learner_greedy, greedy_batch.response_mask)],
                    greedy_batch.response_token_lists())
            except WeightSyncParityError as e:
                raise WeightSyncParityError(f"{what}: {e}") from None

    # --- the whole run ------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        history = []
        bar = tqdm(total=cfg.ppo.iterations, initial=self.iteration, desc="ppo", unit="it")
        while self.iteration < cfg.ppo.iterations:
            try:
                record = self.step()
                every = cfg.checkpoint.every
                if every and self.iteration % every == 0 and self.iteration < cfg.ppo.iterations:
                    self.save_checkpoint()
            except ray.exceptions.RayActorError as e:  # a learner or scorer died (engines are replaced)
                self.restart_after_failure(e)
                history = [r for r in history if r["iteration"] <= self.iteration]
                bar.n = self.iteration
                bar.refresh()
                continue
            history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl_to_ref']:.3f}")
            stop = self.guards.stop_reason(record)
            if stop:
                print(f"ppo: early stop at iteration {self.iteration}: {stop}")
                break
        if cfg.checkpoint.every:
            self.save_checkpoint()
        if cfg.checkpoint.save_final:
            self.save(Path(self.run_dir) / "policy")
        plot_metrics(self.run_dir)
        return history

    def save(self, out_dir: Path) -> None:
        """The policy as an HF folder (for serving, eval, the next stage)."""
        get_all([a.save.remote(str(out_dir)) for a in self.roles.policy])

    # --- checkpoints and recovery (mechanics in stages/checkpoint.py) ---------------------------
    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs, as one atomic ``checkpoints/iter-N`` folder."""
        def write_learners(tmp: Path) -> None:
            refs = [a.save_checkpoint.remote(str(tmp / "policy")) for a in self.roles.policy]
            refs += [a.save_checkpoint.remote(str(tmp / "critic")) for a in self.roles.critic]
            get_all(refs)

        # A batch sampled ahead (ppo.overlap) is not trained yet: a resumed run samples it again.
        position = self._pending.position if self._pending else self.prompts.position
        state = {"iteration": self.iteration, "prompts_position": position,
                 "kl_controller": self.kl_ctl.state_dict(), "guards": self.guards.state_dict(),
                 "faults": self.faults.state_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.iteration, state, dump_config(self.cfg), write_learners,
                                    self.cfg.checkpoint.keep_last)

    def _resume_point(self) -> Path | None:
        """The newest complete checkpoint (incomplete ones are skipped with a warning), checked to
        be resumable by this config; None when there is none."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is not None:
            ckpt.check_resumable(path, config_to_dict(self.cfg))
        return path

    def resume(self, path: Path | None) -> bool:
        """Continues from the checkpoint at ``path`` (from ``_resume_point``), or from iteration 0.
        Logs written after it by a run that died are cut back to it."""
        if path is None:
            print(f"ppo: no complete checkpoint in {self.run_dir}, starting at iteration 0")
            self._restore(None)
            return False
        self._restore(path)
        print(f"ppo: resumed from {path} at iteration {self.iteration}")
        return True

    def _restore(self, path: Path | None) -> None:
        self._reset_state()
        if path is not None:
            refs = [a.load_checkpoint.remote(str(path / "policy")) for a in self.roles.policy]
            refs += [a.load_checkpoint.remote(str(path / "critic")) for a in self.roles.critic]
            get_all(refs)
            state = ckpt.load_trainer_state(path)
            self.iteration = state["iteration"]
            self.prompts.position = state["prompts_position"]
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.guards.load_state_dict(state["guards"])
            self.faults.load_state_dict(state["faults"])
            self._sync_weights()  # the engines started from the initial policy
        for log in (self.metrics, self.samples, self.prompt_log):
            log.rewind(self.iteration)

    def restart_after_failure(self, error: Exception) -> None:
        """A learner or scorer died: every actor is replaced and the run goes on from the newest
        complete checkpoint, at most ``faults.max_restarts`` times."""
        limit = self.cfg.faults.max_restarts
        if self.faults.restarts >= limit:
            raise ActorFailureError(f"an actor died during iteration {self.iteration + 1} and "
                                    f"faults.max_restarts={limit} restarts are used up: {error}") from error
        self.faults.restarts += 1
        print(f"ppo: an actor died during iteration {self.iteration + 1} ({type(error).__name__}); "
              f"restart {self.faults.restarts} of {limit} from the last checkpoint")
        shutdown_roles(self.roles)
        path = self._resume_point()
        self._launch()
        self.resume(path)

    def close(self) -> None:
        shutdown_roles(self.roles)


def weight_sync_layout(sender, engines: list, transport: str, workers_per_engine: int, platform) -> SyncLayout:
    """Engines on the sender's (policy rank 0's) node take the weights through shared memory when
    ``transport`` (``sync.transport``) and the platform allow; the rest join one broadcast group."""
    sender_node, *engine_nodes = ray.get([a.__ray_call__.remote(_node_id) for a in [sender, *engines]])
    return plan_sync(transport, [n == sender_node for n in engine_nodes], workers_per_engine,
                     platform.shm_weight_sync)


def open_weight_sync(sender, engines: list, manifest: dict, layout: SyncLayout, backend: str) -> None:
    """Connects the sender (the policy learner's sync verbs) with every engine, as ``layout`` says."""
    shm_path = ray.get(sender.create_weight_segment.remote(manifest)) if layout.shm_world > 1 else None
    port, address = ray.get([sender.free_port.remote(), sender.node_ip.remote()])
    refs = [sender.open_weight_sync.remote(port, layout.broadcast_world, layout.shm_world)]
    for i, engine in enumerate(engines):
        group = layout.engine_group(i)
        refs.append(engine.join_weight_sync.remote(address, port, group["world_size"], group["rank_offset"],
                                                   backend, shm_path=shm_path if group["shm"] else None))
    ray.get(refs)


def _node_id(_actor) -> str:
    """Run inside an actor (``__ray_call__``): the Ray node it lives on."""
    return ray.get_runtime_context().get_node_id()


def _pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out


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


def run_ppo(cfg: RunConfig) -> list[dict]:
    trainer = PPOTrainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    done = [r for r in history if "skipped_nonfinite" not in r]
    if done:
        print(f"ppo done: {len(history)} iterations, reward {done[0]['reward_mean']:.3f} -> "
              f"{done[-1]['reward_mean']:.3f}, run dir {trainer.run_dir}")
    else:
        print(f"ppo done: {len(history)} iterations in this process, run dir {trainer.run_dir}")
    return history
