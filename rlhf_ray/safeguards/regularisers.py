"""Reward regularisers against reward hacking, applied to sequence scores before KL shaping.

Each returns new scores and leaves its input alone: a tensor (same dtype and device) for a
tensor, a list of floats for a sequence. Coefficients must be >= 0, so a sign slip in a config
cannot turn a penalty into a bonus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .diversity import distinct_n

Scores = Sequence[float] | torch.Tensor


def _subtract(scores: Scores, penalties: Sequence[float] | torch.Tensor) -> Scores:
    """``scores - penalties`` as the type of ``scores``; lists are computed in float64."""
    s = scores if isinstance(scores, torch.Tensor) else torch.tensor(list(scores), dtype=torch.float64)
    p = torch.as_tensor(penalties, dtype=s.dtype, device=s.device)
    if p.shape != s.shape:
        raise ValueError(f"{s.numel()} scores but {p.numel()} per-response values")
    out = s - p
    return out if isinstance(scores, torch.Tensor) else out.tolist()


def _check_coef(coef: float) -> None:
    if coef < 0:
        raise ValueError(f"coef must be >= 0, got {coef}")


def length_penalty(
    scores: Scores, lengths: Sequence[float] | torch.Tensor, threshold: float, coef: float
) -> Scores:
    """score - coef * max(0, length - threshold): only length beyond ``threshold`` costs.

    ``lengths`` in whatever unit ``threshold`` uses (tokens from the response mask, or words).
    """
    _check_coef(coef)
    over = (torch.as_tensor(lengths, dtype=torch.float64) - threshold).clamp(min=0)
    return _subtract(scores, coef * over)


def repeated_ngram_share(response: str, n: int = 3, unit: str = "word") -> float:
    """1 - distinct-n of one response: the share of its n-grams that repeat an earlier one.

    0 for a response shorter than ``n`` units, which has nothing to repeat.
    """
    share = 1.0 - distinct_n([response], n, unit)
    return 0.0 if math.isnan(share) else share


def repetition_penalty(
    scores: Scores, responses: Sequence[str], coef: float, n: int = 3, unit: str = "word"
) -> Scores:
    """score - coef * repeated_ngram_share(response, n, unit).

    The chapter's repetition penalty (which uses n=1) generalised to n-grams: with n=3 a
    response may reuse words but not loop on phrases.
    """
    _check_coef(coef)
    return _subtract(scores, [coef * repeated_ngram_share(r, n, unit) for r in responses])
