"""From one iteration's rollouts and their scores to the batch the learners train on, and the
iteration's metrics record: pure functions of tensors and the config (no Ray, no actors), so
every branch runs in fast tests.

The order is the paper's: sequence scores are clipped, a missing end of sequence is penalised
(and with ``ppo.overlong_buffer``, DAPO's soft penalty for running into the length cap);
the KL to the reference is estimated per token; with a critic the KL penalty joins the token
rewards and GAE gives advantages and returns, without one the penalty joins the sequence score
and group baselines (GRPO, RLOO, REINFORCE++) give one advantage per sequence; advantages are
whitened if asked; samples whose sampler differs from the learner (older weights with
``ppo.overlap``, other numerics always) are reweighted by importance sampling, truncated or masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from rlhf_ray import algo
from rlhf_ray.config import RunConfig
from rlhf_ray.data.batch import RolloutBatch, pad_rows
from rlhf_ray.data.formats import row_columns
from rlhf_ray.data.tokenize import encode_examples
from rlhf_ray.engines.sampling import Generation


@dataclass
class Scored:
    """What the score phase measured of a batch's responses (``[B, R]`` per token, ``[B]`` per
    sequence)."""

    old_logprobs: torch.Tensor  # the policy's log-probs the update starts from
    ref_logprobs: torch.Tensor  # the frozen reference's
    rollout_logprobs: torch.Tensor  # the engines' sampling log-probs
    values: torch.Tensor | None  # the critic's, when there is one
    scores: torch.Tensor  # sequence scores after the safeguards' penalties
    truncated: torch.Tensor  # bool [B]: the response hit max_new_tokens without an end token


@dataclass
class Prepared:
    batch: RolloutBatch  # with extras: old_logprobs, advantages, ref_logprobs (+ old_values, returns, is_weights)
    scores: torch.Tensor  # [B] the final sequence scores (clipped, penalised)
    kl_per_seq: torch.Tensor  # [B] summed KL estimate to the reference
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor | None  # [B, R] with a critic
    metrics: dict[str, float]  # off-policy measures (importance weights)


def batch_from_generations(generations: list[Generation], pad_id: int) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
    """The rollout batch of the engines' generations, their sampling log-probs ``[B, R]`` and
    which responses ran out of tokens before an end token ``[B]``."""
    batch = RolloutBatch.from_token_lists([g.prompt_ids for g in generations], [g.response_ids for g in generations],
                                          pad_id)
    logprobs = pad_rows([g.logprobs for g in generations], batch.response_mask.shape[1])
    return batch, logprobs, torch.tensor([g.finish_reason == "length" for g in generations])


def batch_from_trajectories(trajectories: list, pad_id: int) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
    """``batch_from_generations`` for multi-turn trajectories (``rlhf_ray.agents.Trajectory``):
    each row's response is its turns' tokens as sampled and observed, ``response_mask`` marks the
    policy's, the log-probs are the engines' (0 on observed tokens); truncated: the last turn ran
    out of tokens before its end token."""
    batch = RolloutBatch.from_token_lists([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories],
                                          pad_id, [t.policy_mask for t in trajectories])
    logprobs = pad_rows([t.logprobs for t in trajectories], batch.response_mask.shape[1])
    return batch, logprobs, torch.tensor([t.truncated for t in trajectories])


@dataclass
class GroupFilter:
    """DAPO's dynamic sampling over rounds of sampled groups: groups whose samples scored alike
    (``algo.informative_groups``) are set aside; ``batch`` gives ``target`` groups, the informative
    ones in sampling order first, then set-aside ones if the rounds ran out (the batch keeps its size)."""

    target: int
    group_size: int
    rounds: int = 0
    kept: list = field(default_factory=list)  # (prompt, its generations, its rows of each reward)
    dropped: list = field(default_factory=list)

    @property
    def missing(self) -> int:
        return max(0, self.target - len(self.kept))

    def add(self, prompts: list[str], generations: list[Generation], rewards: dict[str, torch.Tensor]) -> None:
        self.rounds += 1
        n = self.group_size
        informative = algo.informative_groups(rewards["score"], n)
        for g, prompt in enumerate(prompts):
            rows = slice(g * n, (g + 1) * n)
            group = (prompt, generations[rows], {k: v[rows] for k, v in rewards.items()})
            (self.kept if informative[g] else self.dropped).append(group)

    def batch(self) -> tuple[list[str], list[Generation], dict[str, torch.Tensor]]:
        """(prompts, generations renumbered to them, rewards) of the batch to train on."""
        groups = (self.kept + self.dropped)[: self.target]
        generations = [replace(gen, prompt_index=i) for i, (_, gens, _) in enumerate(groups) for gen in gens]
        rewards = {k: torch.cat([r[k] for _, _, r in groups]) for k in groups[0][2]}
        return [prompt for prompt, _, _ in groups], generations, rewards

    def metrics(self) -> dict[str, int]:
        return {"dynamic/rounds": self.rounds, "dynamic/prompts_drawn": len(self.kept) + len(self.dropped),
                "dynamic/dropped_groups": len(self.dropped), "dynamic/filled_groups": self.missing}


def sample_informative_groups(prompts: list[str], generations: list[Generation], cfg: RunConfig,
                              rewards_of: Callable, draw_prompts: Callable, generate: Callable) -> GroupFilter:
    """Scores each round (``rewards_of(prompts, generations)``), then draws as many prompts as
    groups are still missing and samples them (``generate(prompts)``), at most
    ``ppo.dynamic_sampling_rounds`` more times."""
    groups = GroupFilter(len(prompts), cfg.rollout.samples_per_prompt)
    while True:
        groups.add(prompts, generations, rewards_of(prompts, generations))
        if not groups.missing or groups.rounds > cfg.ppo.dynamic_sampling_rounds:
            return groups
        prompts = draw_prompts(groups.missing)
        generations = generate(prompts)


def final_scores(scores: torch.Tensor, truncated: torch.Tensor, reward_clip: float,
                 missing_eos_penalty: float) -> torch.Tensor:
    """Scores clipped to ``[-reward_clip, reward_clip]``, minus the penalty for each response that
    ran out of tokens before its end token."""
    return scores.clamp(-reward_clip, reward_clip) - missing_eos_penalty * truncated.to(scores.dtype)


def importance_settings(cfg: RunConfig) -> tuple[str, str, float] | None:
    """(mode, level, cap) of the correction for the sampler/learner mismatch, or None:
    ``ppo.is_correction`` on every run, else with ``ppo.overlap`` token-level TIS at ``ppo.tis_cap``."""
    ppo = cfg.ppo
    if ppo.is_correction != "off":
        return {"tis": "truncate", "mis": "mask"}[ppo.is_correction], ppo.is_level, ppo.is_cap
    if ppo.overlap and ppo.tis_cap > 0:
        return "truncate", "token", ppo.tis_cap
    return None


def prepare_batch(batch: RolloutBatch, scored: Scored, cfg: RunConfig, kl_coef: float,
                  recomputed: bool) -> Prepared:
    """The training batch of one iteration. ``recomputed``: the learner recomputed the old
    log-probs, so they may differ from the sampler's (older weights with ``ppo.overlap``, other
    numerics always): tokens are reweighted by ``pi_learner / pi_sampler`` as
    ``importance_settings`` says."""
    ppo, mask = cfg.ppo, batch.response_mask
    scores = final_scores(scored.scores, scored.truncated, ppo.reward_clip, ppo.missing_eos_penalty)
    if ppo.overlong_buffer:
        scores = scores + algo.overlong_penalty(mask.sum(-1), cfg.rollout.max_new_tokens, ppo.overlong_buffer,
                                                ppo.overlong_factor)
    old, ref = scored.old_logprobs, scored.ref_logprobs
    kl_per_seq = (algo.kl_estimate(old, ref, ppo.kl_estimator) * mask).sum(-1)
    returns = None
    if cfg.uses_critic:
        token_rewards = algo.shape_rewards(scores, old, ref, mask, kl_coef, ppo.kl_estimator)
        advantages, returns = algo.gae(token_rewards, scored.values, mask, ppo.gamma, ppo.lam)
    else:
        seq_adv = algo.group_advantages(scores - kl_coef * kl_per_seq, cfg.rollout.samples_per_prompt,
                                        ppo.advantage_estimator)
        advantages = algo.broadcast_to_tokens(seq_adv, mask)
    if ppo.whiten_advantages:
        advantages = algo.whiten(advantages, mask)
    batch = batch.with_extras(old_logprobs=old, advantages=advantages, ref_logprobs=ref)
    if cfg.uses_critic:
        batch = batch.with_extras(old_values=scored.values, returns=returns)
    metrics: dict[str, float] = {}
    settings = importance_settings(cfg) if recomputed else None
    if settings is not None:
        mode, level, cap = settings
        correction = algo.is_correction(old, scored.rollout_logprobs, mask, cap, level, mode)
        batch = batch.with_extras(is_weights=correction.weights)
        metrics = {"is/weight_mean": algo.masked_mean(correction.weights, mask).item(),
                   "is/affected_fraction": correction.affected_fraction.item(),
                   # KL(sampler || learner) on the sampled tokens: how far the engines' numerics drift.
                   "is/sampler_learner_kl": algo.masked_mean(
                       algo.kl_estimate(scored.rollout_logprobs, old, "k3"), mask).item()}
    return Prepared(batch, scores, kl_per_seq, advantages, returns, metrics)


def policy_loss_spec(cfg: RunConfig) -> algo.PolicyLossSpec:
    """The policy loss the config asks for, as the learners take it."""
    ppo = cfg.ppo
    return algo.PolicyLossSpec(kind=ppo.policy_loss, clip_eps=ppo.clip_eps, clip_eps_high=ppo.clip_eps_high or None,
                               dual_clip=ppo.dual_clip or None, agg=ppo.loss_agg,
                               norm_len=ppo.loss_norm_len or cfg.rollout.max_new_tokens)


def nonfinite_phase(mask: torch.Tensor, **phases: list[torch.Tensor | None]) -> str | None:
    """The first phase (in keyword order) with a NaN or inf in a tensor; per-token tensors count
    only where ``mask`` is set (padding may hold anything)."""
    for phase, tensors in phases.items():
        for t in tensors:
            if t is None:
                continue
            if t.shape == mask.shape:
                t = t[mask.bool()]
            if not torch.isfinite(t).all():
                return phase
    return None


def iteration_record(iteration: int, position: int, prepared: Prepared, scored: Scored,
                     rewards: dict[str, torch.Tensor], kl_coef: float, train_stats: dict[str, float],
                     guard_metrics: dict[str, float], seconds: dict[str, float], recomputed: bool,
                     extra: dict[str, float]) -> dict:
    """One line of ``metrics.jsonl``: rewards and their components, KL, the learners' stats,
    lengths, safeguards, phase times and token throughput (``extra``: versions, faults, engines)."""
    mask = prepared.batch.response_mask
    lengths = mask.sum(-1)
    scores = prepared.scores
    n_tokens = int(mask.sum().item())
    total_s = sum(seconds.values())
    return {
        "iteration": iteration,
        "prompts_position": position,
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
        **{f"{k}_mean": v.mean().item() for k, v in rewards.items() if k.startswith("reward/")},
        "kl_to_ref": prepared.kl_per_seq.mean().item(),
        "kl_coef": kl_coef,
        **train_stats,  # entropy among them (mean over the update's minibatches)
        "response_length_min": int(lengths.min().item()),
        "response_length_mean": lengths.float().mean().item(),
        "response_length_max": int(lengths.max().item()),
        "truncated_fraction": scored.truncated.float().mean().item(),
        **guard_metrics,
        **({"logprob_gap_vllm_learner": algo.masked_mean(
            (scored.rollout_logprobs - scored.old_logprobs).abs(), mask).item()} if recomputed else {}),
        **prepared.metrics,
        "generated_tokens": n_tokens,
        # The rollout batch as the driver holds it, [prompt left-padded | response right-padded]:
        # real prompt tokens, and every position a padded forward pass would compute.
        "prompt_tokens": int(prepared.batch.attention_mask[:, : prepared.batch.prompt_len].sum().item()),
        "batch_positions": prepared.batch.sequences.numel(),
        **{f"time/{k}_s": v for k, v in seconds.items()},
        **{f"throughput/{k}_tokens_per_s": n_tokens / v for k, v in seconds.items() if v > 0},
        "time/iteration_s": total_s,
        "throughput/iteration_tokens_per_s": n_tokens / max(1e-9, total_s),
        **extra,
    }


def skipped_record(iteration: int, position: int, phase: str, seconds: dict[str, float],
                   faults: dict[str, int]) -> dict:
    """The metrics line of an iteration whose batch was skipped for non-finite ``phase`` values."""
    return {"iteration": iteration, "prompts_position": position, "skipped_nonfinite": phase,
            "reward_mean": float("nan"), "kl_to_ref": float("nan"),
            **{f"time/{k}_s": v for k, v in seconds.items()}, **faults}


def sample_rows(iteration: int, prompts: list[str], responses: list[str], prepared: Prepared,
                rewards: dict[str, torch.Tensor], truncated: torch.Tensor, version: int) -> list[dict]:
    """``samples.jsonl`` rows for the first ``len(prompts)`` rollouts, for people to read
    (``rlhf-ray view``): text, final reward and its components, KL, truncation, policy version, and
    the other columns of the prompt's data row (an ``answer`` to read the response against)."""
    components = {k.removeprefix("reward/"): v for k, v in rewards.items() if k.startswith("reward/")}
    return [{"iteration": iteration, "prompt": prompts[i], "response": responses[i],
             "reward": prepared.scores[i].item(), "components": {k: v[i].item() for k, v in components.items()},
             "kl": prepared.kl_per_seq[i].item(), "truncated": bool(truncated[i]), "policy_version": version,
             **({"columns": row_columns(prompts[i])} if row_columns(prompts[i]) else {})}
            for i in range(len(prompts))]


def ptx_minibatch(examples: list, rows: int, generator: torch.Generator, tokenizer, data_cfg) -> RolloutBatch:
    """``rows`` pretraining-mix examples (``ppo.ptx_data``) drawn at random with ``generator`` (the
    iteration's seed makes the draw reproducible), encoded as SFT rows."""
    picks = [examples[i] for i in torch.randint(len(examples), (rows,), generator=generator).tolist()]
    return encode_examples(tokenizer, picks, data_cfg.max_prompt_tokens, data_cfg.max_seq_len)
