"""Safeguards against the chapter's RLHF failure modes: reward hacking and mode collapse.

Detectors and metrics return one number per rollout batch for the metrics log; regularisers
adjust sequence scores before KL shaping. Everything works on response strings and float
lists or tensors; nothing here depends on Ray, DeepSpeed, vLLM or the config objects.
"""

from .diversity import (
    UNITS,
    CollapseThresholds,
    collapse_flag,
    distinct_n,
    diversity_bonus,
    diversity_metrics,
    group_by_prompt,
    lexical_diversity,
    mean_pairwise_similarity,
    ngram_diversity,
)
from .hacking import (
    OverOptimisationMonitor,
    format_gaming_rate,
    keyword_stuffing_rate,
    mean_phrase_count,
    verbosity_correlation,
)
from .regularisers import length_penalty, repeated_ngram_share, repetition_penalty

__all__ = [
    "UNITS",
    "CollapseThresholds",
    "OverOptimisationMonitor",
    "collapse_flag",
    "distinct_n",
    "diversity_bonus",
    "diversity_metrics",
    "format_gaming_rate",
    "group_by_prompt",
    "keyword_stuffing_rate",
    "length_penalty",
    "lexical_diversity",
    "mean_pairwise_similarity",
    "mean_phrase_count",
    "ngram_diversity",
    "repeated_ngram_share",
    "repetition_penalty",
    "verbosity_correlation",
]
