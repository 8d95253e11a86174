"""Advantage estimators: GAE for PPO with a critic, group/batch baselines for critic-free RL."""

from __future__ import annotations

import torch

from .masked import zero_padding

GROUP_ADVANTAGE_KINDS = ("grpo", "rloo", "reinforce_pp", "dr_grpo")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2015), returns ``(advantages, returns)``.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with the
    value after the last real token taken as 0 (the response ends the episode). Tokens outside
    ``mask`` are not steps: in a multi-turn row the tokens the policy observed (tool results)
    sit between its own, and t+1 is the policy's next token after them, as if they were part of
    the environment's transition. returns = advantages + values on real tokens (the critic's
    targets); the rest gets 0 in both.
    """
    real = mask.bool()
    rewards = zero_padding(rewards, real)
    values = zero_padding(values, real)
    next_value = torch.zeros_like(values[:, 0])
    last_gae = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A token outside the mask carries the later step's value and advantage over itself.
        last_gae = torch.where(real[:, t], delta + gamma * lam * last_gae, last_gae)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages_reversed.append(zero_padding(last_gae, real[:, t]))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = zero_padding(advantages + values, real)
    return advantages, returns


def group_advantages(
    scores: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sequence advantages [B] from scores [B] without a critic.

    Consecutive runs of ``group_size`` scores are responses to the same prompt.
      - "grpo": (s - group mean) / (group std + eps), GRPO (Shao et al. 2024, DeepSeekMath).
      - "rloo": s - mean of the other group members, the leave-one-out baseline
        (Ahmadian et al. 2024, "Back to Basics"); unbiased because it excludes s itself.
      - "reinforce_pp": (s - batch mean) / (batch std + eps), REINFORCE++ (Hu 2025), which
        normalises over the whole batch instead of per prompt.
      - "dr_grpo": s - group mean, Dr. GRPO (Liu et al. 2025): no division by the group's std,
        which would weigh prompts by how (un)evenly they were answered.
    Standard deviations are unbiased (n - 1), as in torch.std.
    """
    if kind not in GROUP_ADVANTAGE_KINDS:
        valid = ", ".join(GROUP_ADVANTAGE_KINDS)
        raise ValueError(f"unknown group advantage kind {kind!r}; valid kinds: {valid}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {scores.shape[0]} scores is not a whole number of groups of "
            f"group_size={group_size}"
        )
    if kind == "reinforce_pp":
        return (scores - scores.mean()) / (scores.std() + eps)
    if group_size < 2:
        raise ValueError(f"{kind!r} needs group_size >= 2 to form a baseline, got {group_size}")
    groups = scores.view(-1, group_size)
    if kind == "grpo":
        advantages = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)
    elif kind == "dr_grpo":
        advantages = groups - groups.mean(-1, keepdim=True)
    else:
        others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        advantages = groups - others_mean
    return advantages.reshape(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spread per-sequence advantages [B] over every real token of its row, [B, T]; padding 0."""
    return zero_padding(advantages.unsqueeze(-1), mask)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's overlong reward shaping (Yu et al. 2025): 0 for responses up to ``max_len -
    buffer_len`` tokens, then falling linearly to ``-factor`` at ``max_len``, ``-factor`` beyond.
    A soft signal against running into the length cap, instead of a cliff at it."""
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"buffer_len must be in [1, max_len={max_len}], got {buffer_len}")
    over = (lengths.to(torch.float32) - (max_len - buffer_len)).clamp(min=0.0, max=float(buffer_len))
    return -factor * over / buffer_len


def informative_groups(scores: torch.Tensor, group_size: int, atol: float = 1e-6) -> torch.Tensor:
    """``[G]`` bool: which consecutive groups of ``group_size`` scores are not all equal (within
    ``atol``). Under a per-group baseline (GRPO, Dr. GRPO, RLOO) an all-equal group has zero
    advantage everywhere and teaches nothing: DAPO's dynamic sampling drops those."""
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of "
                         f"group_size={group_size}")
    groups = scores.view(-1, group_size)
    return (groups.max(-1).values - groups.min(-1).values) > atol
