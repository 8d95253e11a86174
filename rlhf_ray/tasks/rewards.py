"""Rule rewards: plain functions ``(prompts, responses) -> scores`` named in config as
``module:function``, and the loader that resolves such names."""

from __future__ import annotations

import importlib
from collections.abc import Callable

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_function(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def digit_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of response characters that are digits: a dense toy reward for smoke tests."""
    return [sum(ch.isdigit() for ch in r) / max(1, len(r)) for r in responses]


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Prefers responses that end early (1 for empty, 0 at 32 characters or more)."""
    return [max(0.0, 1.0 - len(r) / 32) for r in responses]
