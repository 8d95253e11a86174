"""The PPO driver: generate, score, compute advantages, update, sync weights, log.

A single controller: this loop owns every decision; the roles it drives (a rollout pool, learner
and scorer groups: ``rlhf_ray.actors``) only run their engines, and the math between the score and
train phases is pure (``rlhf_ray.stages.prepare``). Read ``PPOTrainer.step`` top to bottom for one
iteration of RLHF.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from rlhf_ray import algo
from rlhf_ray.actors.placement import Roles, launch_roles, shutdown_roles
from rlhf_ray.actors.rollout_pool import PendingGeneration
from rlhf_ray.actors.worker_group import get_all
from rlhf_ray.config import RunConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.tokenize import encode_prompts, stop_token_ids
from rlhf_ray.engines.sampling import SamplingSpec
from rlhf_ray.faults import FaultCounter
from rlhf_ray.stages import prepare as prep
from rlhf_ray.stages.agent_rollout import MultiTurnRollouts
from rlhf_ray.stages.common import (
    begin,
    check_model_fits,
    check_reward_functions,
    prepare_run,
    resolve_policy_path,
    reward_sources,
)
from rlhf_ray.stages.eval import held_out_prompts, held_out_rewards, sampled_scores
from rlhf_ray.stages.guards import RolloutGuards
from rlhf_ray.stages.recovery import Recovery
from rlhf_ray.stages.sft import text_examples
from rlhf_ray.tasks import GOLD_COMPONENT
from rlhf_ray.tasks.rewards import call_reward_function
from rlhf_ray.tracking import MetricsWriter, PhaseTimer, open_trackers, plot_metrics

__all__ = ["PPOTrainer", "run_ppo"]


class PPOTrainer(Recovery):
    def __init__(self, cfg: RunConfig):
        from rlhf_ray.data.prompts import PromptStream, run_prompts
        from rlhf_ray.models.loading import load_tokenizer

        self.cfg = cfg
        self.run_dir = prepare_run(cfg, pays_rewards=True)
        self.policy_path = resolve_policy_path(cfg)
        check_model_fits(cfg, self.policy_path)
        self.tokenizer = load_tokenizer(self.policy_path, trust_remote_code=cfg.model.trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.rollout.stop)
        self.prompts = PromptStream(run_prompts(cfg.data, cfg.seed, self.tokenizer), cfg.seed, cfg.data.shuffle)
        # Pretraining-mix text for the ptx loss (alignment-tax mitigation), read before any actor starts.
        self.ptx_examples = (text_examples(cfg, cfg.ppo.ptx_data, self.tokenizer, held_out=False)
                             if cfg.ppo.ptx_coef else [])
        self.agents = MultiTurnRollouts(cfg, self.tokenizer) if cfg.agent.enabled else None  # tool-using turns
        # ppo.eval_every: the held-out prompts and the rule rewards that score the answers to them.
        self.eval_prompts = held_out_prompts(cfg, self.tokenizer) if cfg.ppo.eval_every else []
        check_reward_functions(cfg, self.prompts.prompts + self.eval_prompts)
        self.eval_rewards = held_out_rewards(cfg) if cfg.ppo.eval_every else {}
        self._reset_state()
        resume = cfg.checkpoint.resume == "auto"
        resume_from = self._resume_point(asked=True) if resume else None  # fails before any actor starts
        self.policy_path = begin(cfg, self.run_dir, self.policy_path)  # only once every input is known good
        self.trackers = open_trackers(cfg, self.run_dir, "ppo", "iteration")  # a failed resume check opens none
        self.metrics = MetricsWriter(self.run_dir, mirror=self.trackers.log_metrics)
        self.samples = MetricsWriter(self.run_dir, "samples.jsonl", mirror=self.trackers.log_samples)
        self.prompt_log = MetricsWriter(self.run_dir, "prompts.jsonl")  # which prompts each iteration used
        with self.trackers.closed_on_failure():  # e.g. no room for the actors
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
        cfg = self.cfg
        functions, weights = reward_sources(cfg)
        self.roles: Roles = launch_roles(cfg, self.policy_path, cfg.model.critic or self.policy_path, cfg.model.reward,
                                         functions, weights, self.tokenizer.pad_token_id,
                                         lambda n: self.faults.take_replacements(n, self.iteration + 1))
        # Engines admitted before the first rollout are checked on their greedy answers to these.
        self.roles.rollout.probe_prompts = encode_prompts(self.tokenizer, self.prompts.prompts[:4],
                                                          cfg.data.max_prompt_tokens)
        self.roles.rollout.connect(self.roles.policy, cfg.sync.bucket_mb << 20, cfg.sync.transport)

    # --- one iteration ------------------------------------------------------------------------
    def step(self) -> dict:
        cfg, ppo, roles = self.cfg, self.cfg.ppo, self.roles
        timer, temperature = PhaseTimer(), cfg.rollout.temperature
        n_engines = roles.rollout.follow_cluster(self.iteration + 1)

        with timer("generate"):
            position, version, prompts, generations = self._rollouts()
            rewards, sampling = None, {}
            if ppo.dynamic_sampling:  # rewarded per round, to drop groups that scored alike
                groups = prep.sample_informative_groups(prompts, generations, cfg, self._rewards,
                                                        self.prompts.next_batch, self._generate)
                (prompts, generations, rewards), sampling = groups.batch(), groups.metrics()
            batch, rollout_logprobs, truncated, prompt_texts, response_texts = self._texts(prompts, generations)
            roles.rollout.sleep()  # rollout.colocate on GPUs: the learners get the memory until the sync

        with timer("score"):  # every scorer at once
            # ppo.old_logprobs=rollout: the engines' sampling log-probs stand in for the policy's.
            recompute = ppo.old_logprobs == "learner"
            policy_call = roles.policy.submit("logprobs", batch, temperature) if recompute else None
            critic_call = roles.critic.submit("values", batch) if roles.critic else None
            ref_call = roles.reference.submit("logprobs", batch, temperature)
            reward_ref = None if rewards else roles.reward.score.remote(batch, prompt_texts, response_texts)
            old_logprobs = policy_call.concat()[0] if recompute else rollout_logprobs
            values = critic_call.concat() if critic_call else None
            ref_logprobs = ref_call.concat()
            rewards = rewards or get_all([reward_ref])[0]
            if self.agents:  # the environment's rewards where it gave them
                rewards = self.agents.rewards(rewards, generations)

        mask, lengths = batch.response_mask, batch.response_mask.sum(-1)
        bad = prep.nonfinite_phase(mask, score=[old_logprobs, ref_logprobs, values], reward=[rewards["score"]])
        if bad:
            return self._skip_batch(bad, position, prompts, timer)
        scores = self.guards.regularise(rewards["score"], prompt_texts, response_texts, lengths)
        scored = prep.Scored(old_logprobs, ref_logprobs, rollout_logprobs, values, scores, truncated)
        kl_coef = self.kl_ctl.value
        prepared = prep.prepare_batch(batch, scored, cfg, kl_coef, recomputed=recompute)
        guard_metrics = self.guards.inspect(prompt_texts, response_texts, lengths, prepared.scores,
                                            rewards.get(f"reward/{GOLD_COMPONENT}"))
        bad = prep.nonfinite_phase(mask, advantages=[prepared.advantages, prepared.returns])
        if bad:
            return self._skip_batch(bad, position, prompts, timer)

        with timer("train"):
            train_stats = self._train(prepared.batch, temperature)
        # DeepSpeed refused the optimiser steps whose gradients were not finite: weights unchanged.
        finite = train_stats.get("skipped_steps", 0) == 0 and all(math.isfinite(v) for v in train_stats.values())
        self.faults.batch_done(None if finite else "loss", self.iteration + 1)

        if self._pending is not None:
            with timer("overlap_wait"):  # the engines take new weights only once the next batch is sampled
                self._pending.wait()
        with timer("sync"):
            self._sync_weights()
            if cfg.sync.parity_every and (self.iteration + 1) % cfg.sync.parity_every == 0:
                self.check_sync_parity(prepared.batch)

        self.kl_ctl.update(prepared.kl_per_seq.mean().item(), n_steps=batch.size)
        self.iteration += 1
        every = ppo.eval_every
        due = every and (self.iteration % every == 0 or self.iteration == ppo.iterations)
        record = prep.iteration_record(
            self.iteration, position, prepared, scored, rewards, kl_coef, train_stats, guard_metrics, timer.seconds,
            recompute, {"policy_version": version, "policy_lag": self.iteration - 1 - version,
                        "rollout/engines": n_engines, **sampling, **self.faults.metrics(),
                        **(self.agents.metrics() if self.agents else {}),
                        **(self.held_out_eval() if due else {})})
        self.metrics.write(record)
        self.prompt_log.write({"iteration": self.iteration, "position": position, "prompts": prompts})
        shown = prompt_texts[: cfg.logging.samples_per_iteration]
        rows = prep.sample_rows(self.iteration, shown, response_texts, prepared, rewards, truncated, version)
        self.samples.write_many(self.agents.with_turns(rows, generations) if self.agents else rows)
        return record

    def _rollouts(self) -> tuple[int, int, list[str], list]:
        """(prompt stream position, policy version sampled with, prompts, generations) of this
        iteration. With ``ppo.overlap`` the batch was started during the last iteration's training,
        one update behind, and the next one starts now, to be sampled while this one trains."""
        if self._pending is None:  # sampled now, with the weights of the last update
            position, version = self.prompts.position, self.iteration
            prompts = self.prompts.next_batch(self.cfg.ppo.prompts_per_iteration)
            generations = self._generate(prompts)
        else:
            pending = self._pending
            position, version, prompts = pending.position, pending.policy_version, pending.prompts
            generations = self.roles.rollout.finish(pending, self.iteration + 1)
        last = self.iteration + 1 >= self.cfg.ppo.iterations
        self._pending = self._start_generation(self.iteration + 1) if self.cfg.ppo.overlap and not last else None
        return position, version, prompts, generations

    def held_out_eval(self) -> dict[str, float]:
        """The engines' greedy answers to the held-out prompts (with ``agent.env``: whole
        trajectories, tools and all, whose rollout metrics come along as ``eval/<name>``), scored by
        each held-out reward (``eval/<function>``; the task's gold scorer: ``eval/gold``); with
        ``eval.samples`` = k, also k sampled answers per prompt (``eval/sampled/<name>``: their
        mean, ``eval/pass@k/<name>``: the mean over prompts of the best of the k)."""
        start = time.monotonic()
        greedy = replace(self._spec(self.iteration), temperature=0.0, top_p=1.0, n=1, seed=None)
        responses, tool_use = self._held_out_answers(greedy)
        out = {f"eval/{name}": sum(s) / len(s) for name, s in self._held_out_scores(self.eval_prompts, responses).items()}
        if k := self.cfg.eval.samples:
            # Every sampled evaluation draws with the seed of the iteration after the last, which no
            # training batch uses: the same draws each time, so the curve moves with the policy only.
            sampled = replace(self._spec(self.cfg.ppo.iterations), temperature=self.cfg.eval.temperature, n=k)
            answers, _ = self._held_out_answers(sampled)
            for name, (spec, fn) in self.eval_rewards.items():
                out[f"eval/sampled/{name}"], out[f"eval/pass@{k}/{name}"] = sampled_scores(
                    spec, fn, self.eval_prompts, answers, k)
        shown = ", ".join(f"{key.removeprefix('eval/')} {v:.3f}" for key, v in out.items())
        print(f"ppo: held-out {shown} after iteration {self.iteration}")
        return {**out, **tool_use, "time/eval_s": time.monotonic() - start}

    def _held_out_answers(self, spec: SamplingSpec) -> tuple[list[str], dict[str, float]]:
        """The engines' ``spec.n`` answers to each held-out prompt (prompt-major) as text, and with
        ``agent.env`` the trajectories' tool use."""
        if self.agents:
            trajectories, stats, _ = self.agents.sample(self.roles.rollout, self.eval_prompts, spec, self.iteration + 1)
            response_ids = [t.response_ids for t in trajectories]
            tool_use = {f"eval/{k.removeprefix('agent/')}": v for k, v in stats.metrics().items()}
        else:
            ids = encode_prompts(self.tokenizer, self.eval_prompts, self.cfg.data.max_prompt_tokens)
            pending = self.roles.rollout.submit(self.eval_prompts, ids, spec, self.iteration)
            response_ids = [g.response_ids for g in self.roles.rollout.finish(pending, self.iteration + 1)]
            tool_use = {}
        return self.tokenizer.batch_decode(response_ids, skip_special_tokens=True), tool_use

    def _held_out_scores(self, prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
        """Each held-out reward's scores of the responses (each prompt's row columns passed along)."""
        return {name: call_reward_function(spec, fn, prompts, responses) for name, (spec, fn) in self.eval_rewards.items()}

    # --- the phases' remote work --------------------------------------------------------------
    def _texts(self, prompts: list[str], generations: list):
        """The batch of ``generations``, their sampling log-probs, truncation, prompt and response texts."""
        to_batch = prep.batch_from_trajectories if self.agents else prep.batch_from_generations
        batch, logprobs, truncated = to_batch(generations, self.tokenizer.pad_token_id)
        response_texts = self.tokenizer.batch_decode(batch.response_token_lists(), skip_special_tokens=True)
        return batch, logprobs, truncated, [prompts[g.prompt_index] for g in generations], response_texts

    def _rewards(self, prompts: list[str], generations: list) -> dict:
        batch, _, _, prompt_texts, response_texts = self._texts(prompts, generations)
        return get_all([self.roles.reward.score.remote(batch, prompt_texts, response_texts)])[0]

    def _generate(self, prompts: list[str]):
        """Spreads the prompts over all engines and returns generations (with ``agent.env``:
        trajectories) in prompt order."""
        if self.agents:
            return self.agents.run(self.roles.rollout, prompts, self._spec(self.iteration), self.iteration + 1)
        return self.roles.rollout.finish(self._submit(prompts, self.iteration), self.iteration + 1)

    def _start_generation(self, iteration: int) -> PendingGeneration:
        """Draws the prompts of ``iteration`` and starts sampling them without waiting."""
        position = self.prompts.position
        pending = self._submit(self.prompts.next_batch(self.cfg.ppo.prompts_per_iteration), iteration)
        pending.position = position
        return pending

    def _spec(self, iteration: int) -> SamplingSpec:
        r = self.cfg.rollout
        return SamplingSpec(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                            min_new_tokens=r.min_new_tokens, n=r.samples_per_prompt, stop_token_ids=self.stop_ids,
                            seed=self.cfg.seed * 1_000_003 + iteration * 10_007)

    def _submit(self, prompts: list[str], iteration: int) -> PendingGeneration:
        ids = encode_prompts(self.tokenizer, prompts, self.cfg.data.max_prompt_tokens)
        return self.roles.rollout.submit(prompts, ids, self._spec(iteration), self.iteration)

    def _train(self, batch: RolloutBatch, temperature: float) -> dict:
        """``ppo.epochs`` passes, each over ``ppo.minibatches`` shuffled minibatches; policy and
        critic learners step in parallel, each rank on its shard."""
        ppo, roles = self.cfg.ppo, self.roles
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.iteration)
        stats: list[dict] = []
        loss = prep.policy_loss_spec(self.cfg)
        for _ in range(ppo.epochs):
            order = torch.randperm(batch.size, generator=generator)
            for mb_index in order.tensor_split(ppo.minibatches):
                minibatch = batch.select(mb_index)
                ptx = (prep.ptx_minibatch(self.ptx_examples, minibatch.size, generator, self.tokenizer, self.cfg.data)
                       if self.ptx_examples else None)
                policy = roles.policy.submit("train_step", minibatch, loss, ppo.entropy_coef, temperature, ptx,
                                             ppo.ptx_coef, ppo.distill_coef, ppo.distill_kl_estimator)
                critic = (roles.critic.submit("train_step", minibatch, ppo.value_clip_eps, loss.agg, loss.norm_len)
                          if roles.critic else None)
                # Learner ranks already all-reduced their stats: rank 0 speaks for each group.
                stats.append({**policy.rank0(), **(critic.rank0() if critic else {})})
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    def _sync_weights(self) -> None:
        self.roles.rollout.sync(self.iteration + 1)

    def check_sync_parity(self, batch: RolloutBatch) -> None:
        """Every engine agrees with the learner after the sync (log-probs and greedy tokens)."""
        self.roles.rollout.check_parity(batch, self.iteration + 1)

    # --- the whole run ------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg, history = self.cfg, []
        if cfg.ppo.eval_every and self.iteration == 0:  # the starting point of the held-out curve
            self.metrics.write({"iteration": 0, **self.held_out_eval()})
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
            if stop := self.guards.stop_reason(record):
                print(f"ppo: early stop at iteration {self.iteration}: {stop}")
                break
        if cfg.checkpoint.every:
            self.save_checkpoint()
        if cfg.checkpoint.save_final:
            self.save(Path(self.run_dir) / "policy")
        plot_metrics(self.run_dir)
        self.trackers.close()  # finished; a run that stops before this is closed as failed by close()
        return history

    def save(self, out_dir: Path) -> None:
        """The policy as an HF folder (for serving, eval, the next stage)."""
        self.roles.policy.run("save", str(out_dir))

    def close(self) -> None:
        self.trackers.close(failed=True)
        shutdown_roles(self.roles)
        if self.agents:
            self.agents.close()


def run_ppo(cfg: RunConfig) -> list[dict]:
    trainer = PPOTrainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    done = [r for r in history if "skipped_nonfinite" not in r]
    rewards = f", reward {done[0]['reward_mean']:.3f} -> {done[-1]['reward_mean']:.3f}" if done else " in this process"
    print(f"ppo done: {len(history)} iterations{rewards}, run dir {trainer.run_dir}")
    return history
