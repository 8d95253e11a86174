"""PPO policy and value losses, loss aggregation, the alignment-tax terms (language-model loss
for the pretraining mix, KL to the reference), and the Bradley-Terry reward-model loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .masked import masked_mean, masked_sum, zero_padding

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over real tokens.

    - "token-mean": mean over all real tokens of the batch (long responses weigh more).
    - "seq-mean-token-sum": sum over each sequence's tokens, then mean over sequences.
    - "seq-mean-token-mean": mean over each sequence's tokens, then mean over sequences
      (every sequence weighs the same, as in the original GRPO objective).
    """
    if agg == "token-mean":
        return masked_mean(per_token_loss, mask)
    if agg == "seq-mean-token-sum":
        return masked_sum(per_token_loss, mask, dim=-1).mean()
    if agg == "seq-mean-token-mean":
        return masked_mean(per_token_loss, mask, dim=-1).mean()
    raise ValueError(f"unknown loss aggregation {agg!r}; valid modes: {', '.join(AGG_MODES)}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
    token_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017): max(-A * ratio, -A * clip(ratio, 1 +- eps)).

    All tensors are [B, T] (spread per-sequence advantages with ``broadcast_to_tokens``).
    ``clip_fraction`` is the share of real tokens where the clipped term is the active (strictly
    larger) one, i.e. the clip binds and the token gets no gradient; CleanRL's looser
    |ratio - 1| > eps also counts tokens where the clip does not bind. ``approx_kl`` is the
    masked mean of k3 = (ratio - 1) - log(ratio), CleanRL's estimate of KL(old || new) on
    tokens sampled from the old policy. Both diagnostics are detached. ``token_weights`` [B, T]
    (e.g. ``truncated_is_weights``) scale each token's term before aggregation.
    """
    # Zeroed first so padding garbage cannot overflow exp() or turn gradients into NaN.
    logprobs, old_logprobs, advantages = (
        zero_padding(x, mask) for x in (logprobs, old_logprobs, advantages)
    )
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * zero_padding(token_weights, mask)
    loss = aggregate_loss(per_token, mask, agg)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
) -> ValueLossOutput:
    """Clipped value loss of PPO2 / CleanRL: 0.5 * max((v - R)^2, (clip(v, old +- eps) - R)^2).

    All tensors are [B, T]. The clip keeps the critic close to the values used to compute the
    advantages.
    ``clip_fraction`` (detached) is the share of real tokens where the clipped term is larger.
    """
    values, old_values, returns = (zero_padding(x, mask) for x in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss = aggregate_loss(0.5 * torch.maximum(unclipped_loss, clipped_loss), mask, agg)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask)
    return ValueLossOutput(loss, clip_fraction)


def language_model_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss: mean negative log-likelihood over the real tokens of [B, T] log-probs.

    The SFT objective, and the pretraining-mix (ptx) term of PPO-ptx (Ouyang et al. 2022,
    InstructGPT), which keeps the policy a good language model on text outside the reward.
    ``exp`` of it is the perplexity of the tokens.
    """
    return -masked_mean(logprobs, mask)


def kl_penalty_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    agg: str,
) -> torch.Tensor:
    """KL(policy || reference) estimated on sampled tokens [B, T], as a differentiable loss term.

    The distillation-to-base mitigation of the alignment tax (GRPO's KL loss, verl's
    ``use_kl_loss``): unlike the KL penalty folded into the rewards, its gradient flows straight
    into the policy. On tokens sampled from the policy, k2's gradient (log p - log p_ref) * grad
    log p is in expectation the exact gradient of KL(policy || ref); k3's (GRPO's choice) is that
    of the reverse KL(ref || policy), with lower variance; k1's expected gradient is 0, so it is
    no use as a loss. Both k2 and k3 are >= 0 and 0 only where policy and reference agree.
    """
    logprobs, ref_logprobs = (zero_padding(x, mask) for x in (logprobs, ref_logprobs))
    return aggregate_loss(kl_estimate(logprobs, ref_logprobs, kind), mask, agg)


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: float = 0.0,
    margin_weight: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss on preference pairs [B]: mean of -log sigmoid(chosen - rejected).

    Bradley-Terry likelihood as in Ouyang et al. 2022 (InstructGPT). The optional hinge
    ``margin_weight * relu(margin - (chosen - rejected))`` keeps pushing pairs whose reward gap
    is still below ``margin``.
    """
    diff = chosen - rejected
    return -F.logsigmoid(diff).mean() + margin_weight * F.relu(margin - diff).mean()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen response scores strictly higher (ties count as wrong)."""
    return (chosen > rejected).float().mean()


def truncated_is_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Truncated importance-sampling weights [B, T]: min(pi_train / pi_sampling, cap) per token.

    For samples drawn by a policy other than the one PPO's ratio starts from (an older weight
    version in overlapped generation, or the rollout engine's numerics): ``train_logprobs`` are
    the learner's old log-probs, ``sampling_logprobs`` those the sampler returned. Capping at
    ``cap`` bounds the variance (Ionides 2008; Yao et al. 2025). Detached; padding gets weight 0.
    """
    log_ratio = zero_padding(train_logprobs.detach() - sampling_logprobs.detach(), mask)
    return zero_padding(torch.exp(log_ratio).clamp(max=cap), mask)
