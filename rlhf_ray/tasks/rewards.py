"""Rule rewards: plain functions ``(prompts, responses, **columns) -> scores``, named in config as
``module:function`` (or passed as Python callables), and what resolves, checks and calls them.

A reward function gets the batch's prompts and responses (two lists of text, one entry per
response) and, as keyword arguments, the other columns of the prompts' data rows, each a list
with one value per response, in order (TRL's convention)::

    def correct(prompts, responses, answer, **kwargs):
        return [1.0 if r.strip() == str(a) else 0.0 for r, a in zip(responses, answer)]

A function that takes ``**kwargs`` gets every column; one without gets the columns it names.
A named column must be in every prompt row: the run refuses to start otherwise.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

from rlhf_ray.data.formats import column_values

RewardFn = Callable[..., list[float]]
# A reward in config: "module:function", or (Python API) the function itself.
RewardSpec = str | Callable


def reward_name(spec: RewardSpec) -> str:
    """What a reward's scores are called in the metrics (``reward/<name>``): its function's name."""
    return spec.rpartition(":")[2] if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)


def load_reward_function(spec: RewardSpec) -> RewardFn:
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be loaded: {e}") from None
    if callable(fn):
        return fn
    raise ValueError(f"reward function {spec!r} is not callable")


def _parameters(fn: RewardFn) -> tuple[bool, list[inspect.Parameter], bool]:
    """Whether ``fn`` takes (prompts, responses) positionally, its named parameters after those two
    (the columns it asks for), and whether it takes ``**kwargs`` (every column)."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    named = [p for p in params if p not in positional[:2] and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return takes_two, named, any(p.kind == p.VAR_KEYWORD for p in params)


def signature_problem(spec: RewardSpec, columns: Sequence[str] | None, rows_missing: dict[str, int] | None = None,
                      n_rows: int = 0) -> str | None:
    """Why ``spec`` cannot score this data, or None: it does not load, does not take
    ``(prompts, responses)``, or needs a column the prompt rows lack (``columns``: those in every
    row, None when not known: the columns go unchecked; ``rows_missing``: column -> rows without
    it, of ``n_rows``)."""
    name = reward_name(spec)
    try:
        fn = load_reward_function(spec)
        takes_two, named, _ = _parameters(fn)
    except ValueError as e:
        return str(e)
    except TypeError:
        return f"reward function {name!r} has no signature to inspect"
    if not takes_two:
        params = ", ".join(inspect.signature(fn).parameters)
        return f"reward function {name!r} must take (prompts, responses, **columns); its parameters: ({params})"
    for p in [] if columns is None else named:
        if p.default is not p.empty or p.name in columns:
            continue
        missing = (rows_missing or {}).get(p.name)
        where = f"{missing} of the {n_rows} prompt rows lack it" if missing else "the prompt rows have no such column"
        return (f"reward function {name!r} needs the column {p.name!r}, but {where} (columns in every row: "
                f"{', '.join(columns) or 'none'}; name the parameter after one of them, or give it a default)")
    return None


def call_reward_function(spec: RewardSpec, fn: RewardFn, prompts: list[str], responses: list[str]) -> list[float]:
    """``fn``'s scores of the responses, given the columns it asks for (all with ``**kwargs``);
    one score per response or a ``ValueError`` naming the function."""
    columns = column_values(prompts)
    _, named, takes_all = _parameters(fn)
    wanted = set(columns) if takes_all else {p.name for p in named if p.name in columns}
    values = fn(prompts, responses, **{name: columns[name] for name in wanted})
    if len(values) != len(responses):
        raise ValueError(f"reward function {reward_name(spec)} returned {len(values)} scores for "
                         f"{len(responses)} responses")
    return list(values)


def digit_fraction(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Share of response characters that are digits: a dense toy reward for smoke tests."""
    return [sum(ch.isdigit() for ch in r) / max(1, len(r)) for r in responses]


def brevity(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Prefers responses that end early (1 for empty, 0 at 32 characters or more)."""
    return [max(0.0, 1.0 - len(r) / 32) for r in responses]
