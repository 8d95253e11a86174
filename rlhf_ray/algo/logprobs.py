"""Per-token log-probabilities and entropies from language-model logits.

The logits of a whole batch ([B, T, V] with V ~ 1e5) are the largest tensor in an RLHF step,
so both functions upcast half-precision logits to float32 one sequence at a time instead of
materialising a float32 copy or a ``log_softmax`` of the whole batch.
"""

from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (bf16/fp16 log-softmax loses too much precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``tokens`` [B, T] under ``logits`` [B, T, V], as [B, T].

    ``logits[:, t]`` must already be the distribution over ``tokens[:, t]`` (the caller
    shifts by one for a causal LM). Computed as ``logit[token] - logsumexp(logits)``.
    """
    picked = _upcast(logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    log_normaliser = torch.stack([torch.logsumexp(_upcast(row), dim=-1) for row in logits])
    return picked - log_normaliser


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, [B, T, V] -> [B, T].

    Uses H = logsumexp(z) - sum_v softmax(z)_v * z_v, which needs no log of small probabilities.
    """
    rows = []
    for row in logits:
        row = _upcast(row)
        rows.append(torch.logsumexp(row, dim=-1) - (torch.softmax(row, dim=-1) * row).sum(-1))
    return torch.stack(rows)
