"""Did the weights arrive? Compare the learner's and an engine's view of the same tokens.

Pure functions over numbers: the caller computes learner log-probs (HF forward) and engine
log-probs (``VLLMEngine.score``) of the same (prompt, response) pairs, or greedy continuations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class WeightSyncParityError(RuntimeError):
    """The rollout engine's weights do not match the learner's."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    mean_abs_diff: float
    num_tokens: int
    atol: float
    ok: bool


def _flat(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().reshape(-1)
    return torch.tensor([float(v) for row in values for v in row], dtype=torch.float64)


def _shape(values) -> list:
    return list(values.shape) if isinstance(values, torch.Tensor) else [len(row) for row in values]


def check_parity(
    learner_logprobs, engine_logprobs, mask=None, atol: float = 1e-3, raise_on_fail: bool = True
) -> ParityReport:
    """Compares per-token log-probs, given as ``[B, R]`` tensors or as ragged lists of rows of
    equal lengths; ``mask`` (same layout, optional) marks the tokens that count.
    Raises ``WeightSyncParityError`` when the largest difference exceeds ``atol``."""
    if _shape(learner_logprobs) != _shape(engine_logprobs):
        raise ValueError(
            f"log-prob layouts differ: learner {_shape(learner_logprobs)}, engine {_shape(engine_logprobs)}"
        )
    a, b = _flat(learner_logprobs), _flat(engine_logprobs)
    m = torch.ones_like(a) if mask is None else _flat(mask)
    diff = (a - b).abs() * m
    n = int(m.sum().item())
    max_diff = float(diff.max().item()) if n else 0.0
    mean_diff = float(diff.sum().item() / n) if n else 0.0
    report = ParityReport(max_diff, mean_diff, n, atol, max_diff <= atol)
    if raise_on_fail and not report.ok:
        raise WeightSyncParityError(
            f"rollout engine log-probs differ from the learner's by up to {max_diff:.3g} "
            f"(mean {mean_diff:.3g} over {n} tokens, tolerance {atol:g}): the weight sync did not "
            "reach this engine, or it loaded other weights"
        )
    return report


def check_greedy_parity(
    learner_tokens: Sequence[Sequence[int]], engine_tokens: Sequence[Sequence[int]]
) -> None:
    """Greedy continuations of the same prompts must be equal token for token."""
    if len(learner_tokens) != len(engine_tokens):
        raise ValueError(f"{len(learner_tokens)} learner rows, {len(engine_tokens)} engine rows")
    for i, (a, b) in enumerate(zip(learner_tokens, engine_tokens)):
        if list(a) != list(b):
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise WeightSyncParityError(
                f"greedy tokens of prompt {i} differ from the learner's at position {at}: "
                f"learner {list(a)[at : at + 5]}..., engine {list(b)[at : at + 5]}..."
            )
