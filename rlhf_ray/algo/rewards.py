"""Combining several judges' scores of the same responses into one reward.

Used for reward-model ensembles (mean or min) and for multi-criteria safety rewards
(helpfulness, harmlessness, honesty, ...), where the minimum is the constitutional-style rule:
a response is only as good as its worst criterion, so no criterion can be traded for another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COMBINE_MODES = ("weighted", "min")


def combine_scores(scores: torch.Tensor, weights: Sequence[float], mode: str) -> torch.Tensor:
    """One score per response from ``scores`` [K judges, B responses].

    - "weighted": sum_k weights[k] * scores[k] (weights 1/K give the mean).
    - "min": the lowest judge's score per response; weights are not used.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [judges, responses] with at least one judge, got {tuple(scores.shape)}")
    if mode == "weighted":
        if len(weights) != scores.shape[0]:
            raise ValueError(f"{len(weights)} weights for {scores.shape[0]} judges")
        return (torch.tensor(list(weights), dtype=scores.dtype).unsqueeze(-1) * scores).sum(0)
    if mode == "min":
        return scores.min(0).values
    raise ValueError(f"unknown combine mode {mode!r}; valid modes: {', '.join(COMBINE_MODES)}")
