"""Per-token KL estimators and KL-penalised reward shaping.

The estimators k1, k2, k3 are from J. Schulman, "Approximating KL Divergence" (2020). With
samples drawn from the policy and r = log p_ref - log p_policy, each estimates
KL(policy || ref): k1 = -r is unbiased but high-variance and can be negative; k2 = r^2 / 2 is
biased but low-variance; k3 = (e^r - 1) - r is unbiased and always >= 0.
"""

from __future__ import annotations

import torch

from .masked import zero_padding

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs, same shape."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        r = -log_ratio
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str,
) -> torch.Tensor:
    """Per-token PPO rewards [B, T]: -kl_coef * KL on each real token, plus the sequence score.

    The reward-model score [B] is added on the last real token of each row (Ziegler et al.
    2019, "Fine-Tuning Language Models from Human Preferences"). Padding gets 0; a row with
    no real token gets no score.
    """
    real = mask.bool()
    rewards = zero_padding(-kl_coef * kl_estimate(logprobs, ref_logprobs, kind), real)
    positions = torch.arange(real.shape[-1], device=real.device)
    last = torch.where(real, positions, -1).amax(dim=-1, keepdim=True)  # -1: no real token
    return torch.where(positions == last, rewards + scores.unsqueeze(-1).to(rewards.dtype), rewards)
