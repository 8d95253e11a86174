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
class ParityTolerance:
    """What a healthy sync leaves between learner and engine. A stale, shuffled or misplaced
    bucket moves log-probs by nats and greedy tokens at once, far outside any of these."""

    max_abs: float  # largest per-token log-prob gap (loose: one near-tie may move a lot)
    mean_abs: float  # mean per-token gap
    greedy_agreement: float  # mean share of each greedy row before its first differing token
    # an engine's greedy token that the learner scores within this of its own top logit is a tie,
    # not a disagreement (``tie_tolerant_argmax``)
    greedy_tie_atol: float = 0.0


# vLLM's kernels against HF/DeepSpeed's: in float32 they agree to ~1e-6 per token; in bf16 and fp16
# they differ by 1e-2 to 1e-1, and greedy decoding parts ways at near-ties. float32 asks for every
# greedy token, so a near-tie (two top logits within the kernels' last bits, which one CPU's or one
# engine's summation order breaks one way and another's the other) is let through up to 1e-4, the
# mean log-prob tolerance: 100 times the kernels' gap, and a stale or shuffled bucket moves logits by
# nats. bf16 and fp16 already let ties part half of the greedy tokens.
TOLERANCE_BY_DTYPE = {
    "float32": ParityTolerance(max_abs=1e-3, mean_abs=1e-4, greedy_agreement=1.0, greedy_tie_atol=1e-4),
    "bfloat16": ParityTolerance(max_abs=1.0, mean_abs=0.05, greedy_agreement=0.5),
    "float16": ParityTolerance(max_abs=0.5, mean_abs=0.02, greedy_agreement=0.5),
}


def parity_tolerance(dtype: str, max_abs: float = 0.0, mean_abs: float = 0.0,
                     greedy_agreement: float = 0.0) -> ParityTolerance:
    """The tolerance of ``dtype`` (``model.dtype``), with each non-zero argument (the
    ``sync.parity_*`` keys) in place of its default."""
    base = TOLERANCE_BY_DTYPE[dtype]
    return ParityTolerance(max_abs or base.max_abs, mean_abs or base.mean_abs,
                           greedy_agreement or base.greedy_agreement, base.greedy_tie_atol)


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
    learner_logprobs, engine_logprobs, mask=None, atol: float = 1e-3, raise_on_fail: bool = True,
    mean_atol: float | None = None,
) -> ParityReport:
    """Compares per-token log-probs, given as ``[B, R]`` tensors or as ragged lists of rows of
    equal lengths; ``mask`` (same layout, optional) marks the tokens that count.
    Raises ``WeightSyncParityError`` when the largest difference exceeds ``atol`` or the mean one
    exceeds ``mean_atol``."""
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
    ok = max_diff <= atol and (mean_atol is None or mean_diff <= mean_atol)
    report = ParityReport(max_diff, mean_diff, n, atol, ok)
    if raise_on_fail and not report.ok:
        mean_tol = "" if mean_atol is None else f", mean tolerance {mean_atol:g}"
        raise WeightSyncParityError(
            f"rollout engine log-probs differ from the learner's by up to {max_diff:.3g} "
            f"(mean {mean_diff:.3g} over {n} tokens, tolerance {atol:g}{mean_tol}): the weight sync did not "
            "reach this engine, or it loaded other weights"
        )
    return report


def tie_tolerant_argmax(logits: torch.Tensor, tokens: torch.Tensor, tie_atol: float = 0.0) -> torch.Tensor:
    """The learner's greedy choice at every position of ``logits`` ``[B, R, V]``, teacher-forced on
    an engine's greedy ``tokens`` ``[B, R]``: its argmax, or the engine's token wherever the learner
    scores that within ``tie_atol`` of its top logit. Such a near-tie is no disagreement: kernels
    that differ in the last bits (vLLM's and the learner's, one CPU's and another's) may break it
    either way. ``tie_atol=0`` still counts exact ties as the engine's token."""
    tokens = tokens.to(logits.device, torch.long)
    top, best = logits.max(-1)
    engine = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(engine >= top - tie_atol, tokens, best)


def check_greedy_parity(
    learner_tokens: Sequence[Sequence[int]], engine_tokens: Sequence[Sequence[int]], min_agreement: float = 1.0
) -> float:
    """Greedy continuations of the same prompts: the mean share of each row before its first
    differing token, which must be at least ``min_agreement`` (1.0: equal token for token).
    Returns that share."""
    if len(learner_tokens) != len(engine_tokens):
        raise ValueError(f"{len(learner_tokens)} learner rows, {len(engine_tokens)} engine rows")
    shares, first_split = [], None
    for i, (a, b) in enumerate(zip(learner_tokens, engine_tokens)):
        a, b = list(a), list(b)
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        longest = max(len(a), len(b))
        shares.append(at / longest if longest else 1.0)
        if a != b and first_split is None:
            first_split = f"prompt {i} at position {at}: learner {a[at : at + 5]}..., engine {b[at : at + 5]}..."
    agreement = sum(shares) / len(shares) if shares else 1.0
    if agreement < min_agreement:
        raise WeightSyncParityError(
            f"greedy tokens differ from the learner's (first: {first_split}); agreement {agreement:.2f} "
            f"of the tokens before each row's first difference, below {min_agreement:g}"
        )
    return agreement
