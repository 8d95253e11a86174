"""Reward-hacking detectors: one statistic per rollout batch, logged next to the reward.

Each targets a pattern from the chapter: verbosity (length buys reward), keyword stuffing
(phrases the reward model favours), format gaming (lists everywhere) and over-optimisation
of the proxy reward against a gold score. Rates over an empty batch are 0.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

# A list item: a line that, after indentation, starts with a bullet (-, *, •) or a number
# followed by "." or ")", then whitespace and some text. "-5", "1.5" and "**bold**" are not items.
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])[ \t]+\S", re.MULTILINE)


def verbosity_correlation(
    lengths: Sequence[float] | torch.Tensor, rewards: Sequence[float] | torch.Tensor
) -> float:
    """Pearson correlation between response length and reward over the batch.

    Pearson, not Spearman: it measures the linear reward-per-length trend that a length penalty
    counts against (outliers weigh in). Positive means longer responses score higher. 0.0 when undefined: fewer than two responses, or
    constant lengths or rewards.
    """
    x = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    y = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"{x.numel()} lengths but {y.numel()} rewards")
    if x.numel() < 2 or x.min() == x.max() or y.min() == y.max():
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc * yc).sum() / torch.sqrt(xc.square().sum() * yc.square().sum())
    return float(r.clamp(-1.0, 1.0))


def _phrase_counts(response: str, phrases: Sequence[str]) -> list[int]:
    """Non-overlapping, case-insensitive occurrences of each phrase in ``response``."""
    if any(not p for p in phrases):
        raise ValueError("phrases must be non-empty strings")
    text = response.casefold()
    return [text.count(p.casefold()) for p in phrases]


def keyword_stuffing_rate(responses: Sequence[str], phrases: Sequence[str], min_count: int = 2) -> float:
    """Share of responses in which some single phrase occurs at least ``min_count`` times."""
    if not responses:
        return 0.0
    stuffed = sum(max(_phrase_counts(r, phrases), default=0) >= min_count for r in responses)
    return stuffed / len(responses)


def mean_phrase_count(responses: Sequence[str], phrases: Sequence[str]) -> float:
    """Mean over responses of the occurrences of all phrases together; tracks stuffing growing."""
    if not responses:
        return 0.0
    return sum(sum(_phrase_counts(r, phrases)) for r in responses) / len(responses)


def format_gaming_rate(responses: Sequence[str], min_items: int = 1) -> float:
    """Share of responses with at least ``min_items`` list-item lines.

    A list-item line starts (after spaces or tabs) with "-", "*" or "•", or with digits and
    "." or ")", followed by whitespace and text: "- a", "• b", "2. c", "10) d".
    """
    if not responses:
        return 0.0
    return sum(len(_LIST_ITEM.findall(r)) >= min_items for r in responses) / len(responses)


def _window_gain(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0..n-1, times n-1: the fitted rise across them."""
    n = len(values)
    centre = (n - 1) / 2
    sxx = sum((i - centre) ** 2 for i in range(n))
    slope = sum((i - centre) * v for i, v in enumerate(values)) / sxx
    return slope * (n - 1)


class OverOptimisationMonitor:
    """Flags Goodhart over-optimisation: the proxy reward climbs while the gold score does not.

    Fed the batch means of the proxy (reward model) and gold score once per iteration. Over the
    last ``window`` iterations each series gets a least-squares line; its gain is the fitted rise
    from the first to the last iteration, in that score's units. ``update`` returns True when
    proxy gain >= ``min_proxy_gain`` and gold gain <= ``max_gold_gain`` (default 0: gold flat
    or falling; raise it a little to count a noisy flat gold as flat). False until the window
    is full.
    """

    def __init__(self, window: int = 5, min_proxy_gain: float = 0.1, max_gold_gain: float = 0.0) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2 to fit a slope, got {window}")
        self.window = window
        self.min_proxy_gain = float(min_proxy_gain)
        self.max_gold_gain = float(max_gold_gain)
        self._proxy: deque[float] = deque(maxlen=window)
        self._gold: deque[float] = deque(maxlen=window)

    @property
    def gains(self) -> tuple[float, float] | None:
        """(proxy gain, gold gain) over the current window, or None before it is full."""
        if len(self._proxy) < self.window:
            return None
        return _window_gain(self._proxy), _window_gain(self._gold)

    def update(self, proxy: float, gold: float) -> bool:
        self._proxy.append(float(proxy))
        self._gold.append(float(gold))
        gains = self.gains
        return gains is not None and gains[0] >= self.min_proxy_gain and gains[1] <= self.max_gold_gain

    def state_dict(self) -> dict[str, Any]:
        return {"proxy": list(self._proxy), "gold": list(self._gold)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history; with a smaller window only its most recent entries are kept."""
        if len(state["proxy"]) != len(state["gold"]):
            raise ValueError("proxy and gold histories differ in length")
        self._proxy = deque(map(float, state["proxy"]), maxlen=self.window)
        self._gold = deque(map(float, state["gold"]), maxlen=self.window)
