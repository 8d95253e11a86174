"""Mode-collapse metrics over one rollout batch of response strings, and a diversity bonus.

Responses are split into units: ``unit="word"`` splits on whitespace; ``unit="char"`` takes the
characters of the stripped response (inner spaces kept), for tasks whose answers are short
strings such as the built-in task's digits. N-grams never cross a response boundary.

A metric with nothing to measure (no n-grams, no group of two responses) is NaN rather than 0,
so an empty or very short batch never reads as total collapse; NaN never trips ``collapse_flag``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from statistics import fmean

UNITS = ("word", "char")


def _units(text: str, unit: str) -> list[str]:
    if unit == "word":
        return text.split()
    if unit == "char":
        return list(text.strip())
    raise ValueError(f"unknown unit {unit!r}; valid units: {', '.join(UNITS)}")


def _ngrams(units: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]


def distinct_n(responses: Sequence[str], n: int, unit: str = "word") -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over the whole batch.

    Divides by the n-gram count, not the token count, so it lies in (0, 1]. NaN when no
    response has ``n`` units.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for r in responses for g in _ngrams(_units(r, unit), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def ngram_diversity(responses: Sequence[str], max_n: int = 3, unit: str = "word") -> float:
    """Product of distinct-1 .. distinct-``max_n``.

    The product form of the "diversity" of Su et al. 2022 (SimCTG, prod over n of 1 - rep-n),
    here on batch-level distinct-n: any one collapsing order pulls the whole score down.
    Orders with no n-gram (responses shorter than n) are left out; NaN when none is defined.
    """
    values = [distinct_n(responses, n, unit) for n in range(1, max_n + 1)]
    defined = [v for v in values if not math.isnan(v)]
    return math.prod(defined) if defined else math.nan


def lexical_diversity(responses: Sequence[str], unit: str = "word") -> float:
    """Type-token ratio over the batch, the chapter's lexical diversity (collapse below 0.3).

    Identical to distinct-1; kept under the chapter's name because its thresholds use it.
    """
    return distinct_n(responses, 1, unit)


def _similarity_matrix(group: Sequence[str], unit: str) -> list[list[float]]:
    """Symmetric difflib ratios 2*matches / (len a + len b) between unit sequences, diagonal 1.

    difflib rather than n-gram-set Jaccard because it respects order ("19" vs "91" is 0.5, not
    1.0) and stays defined for one-unit responses. Cost grows with the square of the length.
    """
    units = [_units(r, unit) for r in group]
    sim = [[1.0] * len(group) for _ in group]
    for i in range(len(group)):
        for j in range(i + 1, len(group)):
            sim[i][j] = sim[j][i] = SequenceMatcher(None, units[i], units[j], autojunk=False).ratio()
    return sim


def mean_pairwise_similarity(groups: Sequence[Sequence[str]], unit: str = "word") -> float:
    """Mean difflib similarity over pairs of responses to the same prompt, averaged over groups.

    Each group with at least two responses counts once whatever its size; NaN when none has two.
    """
    means = []
    for group in groups:
        k = len(group)
        if k >= 2:
            sim = _similarity_matrix(group, unit)
            means.append((sum(map(sum, sim)) - k) / (k * (k - 1)))
    return fmean(means) if means else math.nan


def _indices_by_prompt(prompts: Sequence[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return list(groups.values())


def group_by_prompt(prompts: Sequence[str], responses: Sequence[str]) -> list[list[str]]:
    """Responses grouped by identical prompt text, groups in order of first appearance."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [[responses[i] for i in idx] for idx in _indices_by_prompt(prompts)]


def diversity_bonus(
    responses: Sequence[str], prompts: Sequence[str], weight: float, unit: str = "word"
) -> list[float]:
    """Per-response bonus weight * (1 - mean similarity to the other responses to its prompt).

    The chapter's diversity reward, against the response's siblings in the batch instead of a
    history of recent responses, and with the mean instead of the max similarity, so a group's
    mean bonus is weight * (1 - its mean pairwise similarity). Aligned with ``responses``; a
    response alone with its prompt gets 0. It also rewards wrong answers that differ, so keep
    ``weight`` small against the reward range.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    bonus = [0.0] * len(responses)
    for idx in _indices_by_prompt(prompts):
        if len(idx) < 2:
            continue
        sim = _similarity_matrix([responses[i] for i in idx], unit)
        for row, i in zip(sim, idx):
            bonus[i] = weight * (1.0 - (sum(row) - 1.0) / (len(idx) - 1))
    return bonus


def diversity_metrics(
    responses: Sequence[str], groups: Sequence[Sequence[str]], unit: str = "word"
) -> dict[str, float]:
    """All batch metrics under the keys that ``collapse_flag`` and the run's metrics log use."""
    return {
        "distinct_1": distinct_n(responses, 1, unit),
        "distinct_2": distinct_n(responses, 2, unit),
        "distinct_3": distinct_n(responses, 3, unit),
        "ngram_diversity": ngram_diversity(responses, 3, unit),
        "lexical_diversity": lexical_diversity(responses, unit),
        "pairwise_similarity": mean_pairwise_similarity(groups, unit),
    }


@dataclass(frozen=True)
class CollapseThresholds:
    """Where a batch counts as collapsed; None switches a test off.

    Defaults are the chapter's (lexical diversity < 0.3, similarity > 0.9), meant for word
    units. Batch-level distinct-1 falls as the batch grows (with digits there are at most 10
    types), so for ``unit="char"`` set ``min_distinct_1`` far lower or to None.
    """

    min_distinct_1: float | None = 0.3
    max_pairwise_similarity: float | None = 0.9


def collapse_flag(metrics: dict[str, float], thresholds: CollapseThresholds = CollapseThresholds()) -> bool:
    """True when distinct-1 is below its floor or pairwise similarity above its ceiling."""
    low = thresholds.min_distinct_1 is not None and metrics["distinct_1"] < thresholds.min_distinct_1
    high = (
        thresholds.max_pairwise_similarity is not None
        and metrics["pairwise_similarity"] > thresholds.max_pairwise_similarity
    )
    return low or high
