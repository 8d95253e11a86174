"""PPO policy and value losses, loss aggregation, the alignment-tax terms (language-model loss
for the pretraining mix, KL to the reference), and the Bradley-Terry reward-model loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .masked import masked_mean, masked_sum, zero_padding

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, agg: str, norm_len: float | None = None
                   ) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over real tokens.

    - "token-mean": mean over all real tokens of the batch (long responses weigh more).
    - "seq-mean-token-sum": sum over each sequence's tokens, then mean over sequences.
    - "seq-mean-token-mean": mean over each sequence's tokens, then mean over sequences
      (every sequence weighs the same, as in the original GRPO objective).
    - "seq-mean-token-sum-norm": sum over each sequence's tokens divided by a constant
      ``norm_len`` (e.g. the generation budget), then mean over sequences: Dr. GRPO (Liu et al.
      2025), which removes the length bias of dividing by each sequence's own length.
    """
    if agg == "token-mean":
        return masked_mean(per_token_loss, mask)
    if agg == "seq-mean-token-sum":
        return masked_sum(per_token_loss, mask, dim=-1).mean()
    if agg == "seq-mean-token-mean":
        return masked_mean(per_token_loss, mask, dim=-1).mean()
    if agg == "seq-mean-token-sum-norm":
        if not norm_len or norm_len <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive norm_len (the generation budget)")
        return masked_sum(per_token_loss, mask, dim=-1).mean() / norm_len
    raise ValueError(f"unknown loss aggregation {agg!r}; valid modes: {', '.join(AGG_MODES)}")


def _ratio_inputs(logprobs, old_logprobs, advantages, mask):
    # Zeroed first so padding garbage cannot overflow exp() or turn gradients into NaN.
    return tuple(zero_padding(x, mask) for x in (logprobs, old_logprobs, advantages))


def _approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CleanRL's k3 estimate of KL(old || new) on tokens sampled from the old policy, detached."""
    with torch.no_grad():
        return masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    norm_len: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017): max(-A * ratio, -A * clip(ratio, lo, hi)).

    The ratio is clipped to ``[1 - clip_eps, 1 + clip_eps_high]`` (``clip_eps_high=None``:
    symmetric; DAPO's clip-higher raises only the upper bound, Yu et al. 2025). ``dual_clip=c``
    (> 1) bounds the loss of a negative-advantage token by ``c * |A|`` (Ye et al. 2020), so one
    token whose ratio exploded cannot dominate the update.

    All tensors are [B, T] (spread per-sequence advantages with ``broadcast_to_tokens``).
    ``clip_fraction`` is the share of real tokens where the clipped term is the active (strictly
    larger) one, i.e. the clip binds and the token gets no gradient; CleanRL's looser
    |ratio - 1| > eps also counts tokens where the clip does not bind. ``approx_kl`` is the
    masked mean of k3 = (ratio - 1) - log(ratio), CleanRL's estimate of KL(old || new) on
    tokens sampled from the old policy. Both diagnostics are detached. ``token_weights`` [B, T]
    (e.g. ``truncated_is_weights``) scale each token's term before aggregation.
    """
    logprobs, old_logprobs, advantages = _ratio_inputs(logprobs, old_logprobs, advantages, mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    if token_weights is not None:
        per_token = per_token * zero_padding(token_weights, mask)
    loss = aggregate_loss(per_token, mask, agg, norm_len)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
    return PolicyLossOutput(loss, clip_fraction, _approx_kl(logprobs, old_logprobs, mask))


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025): the ratio of a whole sequence, ``exp(mean over its tokens of
    (logprob - old_logprob))`` (a length-normalised sequence likelihood ratio), clipped per
    sequence to ``[1 - clip_eps, 1 + clip_eps_high]``, times the sequence's advantage; the loss is
    the mean over sequences. ``advantages`` is ``[B]`` or ``[B, T]`` (then its mean over each
    row's real tokens: broadcast sequence advantages give back the sequence's own).
    ``clip_fraction`` is the share of sequences where the clip binds."""
    logprobs, old_logprobs = (zero_padding(x, mask) for x in (logprobs, old_logprobs))
    high = clip_eps if clip_eps_high is None else clip_eps_high
    seq_adv = advantages if advantages.dim() == 1 else masked_mean(zero_padding(advantages, mask), mask, dim=-1)
    seq_ratio = torch.exp(masked_mean(logprobs - old_logprobs, mask, dim=-1))
    unclipped = -seq_adv * seq_ratio
    clipped = -seq_adv * torch.clamp(seq_ratio, 1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = (clipped > unclipped).to(seq_ratio.dtype).mean()
    return PolicyLossOutput(loss, clip_fraction, _approx_kl(logprobs, old_logprobs, mask))


def cispo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_high: float,
    agg: str,
    clip_eps_low: float | None = None,
    token_weights: torch.Tensor | None = None,
    norm_len: float | None = None,
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, 2025): ``-stopgrad(clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high)) *
    A * logprob`` per token. The clipped ratio only weighs a REINFORCE term, so, unlike PPO's
    clip, no token's gradient is dropped (rare tokens that matter for reasoning keep learning).
    ``clip_eps_low=None``: no lower bound. ``clip_fraction`` is the share of real tokens whose
    weight the clip changed."""
    logprobs, old_logprobs, advantages = _ratio_inputs(logprobs, old_logprobs, advantages, mask)
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)
        weight = ratio.clamp(max=1.0 + clip_eps_high)
        if clip_eps_low is not None:
            weight = weight.clamp(min=1.0 - clip_eps_low)
        clip_fraction = masked_mean((weight != ratio).to(ratio.dtype), mask)
    per_token = -weight * advantages * logprobs
    if token_weights is not None:
        per_token = per_token * zero_padding(token_weights, mask)
    loss = aggregate_loss(per_token, mask, agg, norm_len)
    return PolicyLossOutput(loss, clip_fraction, _approx_kl(logprobs, old_logprobs, mask))


POLICY_LOSS_KINDS = ("ppo", "gspo", "cispo")


@dataclass(frozen=True)
class PolicyLossSpec:
    """Which policy loss and its settings (plain values: it travels to the learners)."""

    kind: str = "ppo"  # ppo (clipped surrogate, optionally clip-higher and dual clip) | gspo | cispo
    clip_eps: float = 0.2  # lower clip range (ppo, gspo; cispo's when clip_eps_low is unset there)
    clip_eps_high: float | None = None  # upper clip range; None = clip_eps
    dual_clip: float | None = None  # ppo: bound of negative-advantage tokens' loss, c * |A|
    agg: str = "token-mean"  # token aggregation (gspo always averages sequences)
    norm_len: float | None = None  # seq-mean-token-sum-norm's constant length


def policy_loss(spec: PolicyLossSpec, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor,
                token_weights: torch.Tensor | None = None) -> PolicyLossOutput:
    """The loss ``spec`` names. ``token_weights`` (importance weights) apply per token, so not to
    GSPO's sequence-level ratio."""
    if spec.kind == "ppo":
        return ppo_policy_loss(logprobs, old_logprobs, advantages, mask, spec.clip_eps, spec.agg,
                               spec.clip_eps_high, spec.dual_clip, token_weights, spec.norm_len)
    if spec.kind == "gspo":
        return gspo_policy_loss(logprobs, old_logprobs, advantages, mask, spec.clip_eps, spec.clip_eps_high)
    if spec.kind == "cispo":
        high = spec.clip_eps if spec.clip_eps_high is None else spec.clip_eps_high
        return cispo_policy_loss(logprobs, old_logprobs, advantages, mask, high, spec.agg, None, token_weights,
                                 spec.norm_len)
    raise ValueError(f"unknown policy loss {spec.kind!r}; valid: {', '.join(POLICY_LOSS_KINDS)}")


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str,
    norm_len: float | None = None,
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
    loss = aggregate_loss(0.5 * torch.maximum(unclipped_loss, clipped_loss), mask, agg, norm_len)
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
    norm_len: float | None = None,
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
    return aggregate_loss(kl_estimate(logprobs, ref_logprobs, kind), mask, agg, norm_len)


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


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor,
                        tolerance: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Share of pairs where the chosen response scores higher by more than ``tolerance`` (a float
    or one per pair); ties, and gaps within the tolerance, count as wrong. The tolerance is the
    scores' float noise: a gap that two batchings of the same pair can open is no preference."""
    return (chosen - rejected > tolerance).float().mean()


IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


class ISCorrection(NamedTuple):
    weights: torch.Tensor  # [B, T], detached; padding 0
    affected_fraction: torch.Tensor  # share of real tokens (or of sequences) whose weight the cap changed


def is_correction(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    level: str = "token",
    mode: str = "truncate",
) -> ISCorrection:
    """Importance weights pi_train / pi_sampling for samples drawn by another policy than the one
    the update starts from: an older weight version (overlapped generation) or the rollout
    engine's own numerics (bf16/FP8 kernels). ``train_logprobs`` are the learner's old log-probs,
    ``sampling_logprobs`` those the sampler returned.

    ``level``: "token" (a ratio per token) or "sequence" (the product over the sequence's tokens,
    the same weight on each). ``mode``: "truncate" caps the weights at ``cap`` (TIS: Ionides 2008;
    Yao et al. 2025); "mask" keeps the weights up to ``cap`` and drops tokens or sequences beyond
    it from the loss (weight 0: MIS). Detached."""
    if level not in IS_LEVELS or mode not in IS_MODES:
        raise ValueError(f"level must be one of {IS_LEVELS} and mode one of {IS_MODES}, got {level!r}, {mode!r}")
    log_ratio = zero_padding(train_logprobs.detach() - sampling_logprobs.detach(), mask)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    over = ratio > cap
    weights = ratio.clamp(max=cap) if mode == "truncate" else torch.where(over, 0.0, ratio)
    real = mask.bool()
    affected = over[real].float().mean() if level == "token" else over[:, 0][real.any(-1)].float().mean()
    return ISCorrection(zero_padding(weights, mask), affected)


def truncated_is_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Token-level TIS weights [B, T]: min(pi_train / pi_sampling, cap) per token (``is_correction``
    with its defaults)."""
    return is_correction(train_logprobs, sampling_logprobs, mask, cap).weights



DPO_KINDS = ("sigmoid", "ipo")


class DPOOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # [B] beta * (policy - reference) log-prob of the chosen response, detached
    rejected_rewards: torch.Tensor  # [B] the same for the rejected one
    # [B] the float noise of a reward gap: how far apart two batchings (padding, packing, kernels)
    # can put the implicit rewards of one pair whose policy equals its reference
    reward_noise: torch.Tensor

# Relative float error of a summed response log-prob between two batchings of the same rows: fp32
# kernels differ by ~1e-6 relative (measured 4e-6 between packed and padded passes); 2e-5 leaves
# room for other CPUs' kernels, far below any gap a step of training opens.
LOGP_RTOL = 2e-5


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimisation (Rafailov et al. 2023) from summed response log-probs [B].

    With h = (pi_c - ref_c) - (pi_r - ref_r), "sigmoid" is -log sigmoid(beta * h) (with
    ``label_smoothing`` e: the conservative DPO mix (1 - e) * that + e * -log sigmoid(-beta * h));
    "ipo" is IPO's (h - 1 / (2 beta))^2 (Azar et al. 2023). The implicit rewards are
    beta * (pi - ref) of each response."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; valid: {', '.join(DPO_KINDS)}")
    chosen = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    noise = beta * LOGP_RTOL * (ref_chosen_logps.abs() + ref_rejected_logps.abs()).detach()
    return DPOOutput(losses.mean(), chosen, rejected, noise)
