"""YAML + dotted command-line overrides -> a checked ``RunConfig``.

Unknown keys, wrong types and impossible values all raise ``ConfigError`` with one message that
names the key (and, for a typo, the closest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_ray.config.schema import RunConfig
from rlhf_ray.errors import BadInputError


class ConfigError(BadInputError):
    """A config key or value is unusable; the message names the key."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check: bool = True) -> RunConfig:
    """``check=False`` skips the cross-field checks (types and key names are always checked),
    for tools that inspect a plan's problems themselves."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.MarkedYAMLError as e:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    cfg = _build(RunConfig, raw, prefix="", source=source)
    if check:
        check_config(cfg, source)
    return cfg


def check_config(cfg: RunConfig, source: str = "config built in Python") -> None:
    """``ConfigError`` listing every problem of ``cfg`` (each with its dotted key); a config built or
    changed in Python is checked by the stage that runs it, as a loaded one is on load."""
    problems = cfg.validate()
    if problems:
        lines = "\n".join(f"  {key}: {msg}" for key, msg in problems)
        raise ConfigError(f"invalid config ({source}):\n{lines}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping: plain YAML keeps the last
    one, so a second ``ppo:`` section would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain values; a reward function given as a Python callable (the Python API)
    appears as ``module:name``."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"
    return value


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A config tree (``config_to_dict``) as ``{dotted key: value}``. Mappings whose keys are the
    user's own (``data.fields``) and empty ones stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "fields":
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section")
    node[leaf] = value


# Keys that moved: an old config is told where its key lives now.
MOVED_KEYS = {"eval.prompts": "data.eval_prompts (the held-out prompts of rlhf-ray eval and ppo.eval_every)",
              "ppo.eval_temperature": "eval.temperature, with eval.samples responses per held-out prompt "
                                      "(the greedy evaluation always runs)"}


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        _check_key(key, prefix, names, source)
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _check_key(key: str, prefix: str, names: list[str], source: str) -> None:
    """A key that moved, or is not one of ``names`` (with the closest as a hint), is a ``ConfigError``."""
    full = f"{prefix}{key}"
    if full in MOVED_KEYS:
        raise ConfigError(f"{source}: {full} is now {MOVED_KEYS[full]}")
    if key not in names:
        close = difflib.get_close_matches(full, [f"{prefix}{n}" for n in names], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(names)}"
        raise ConfigError(f"{source}: unknown config key {full}{hint}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` (built in Python, with its callables) changed by dotted overrides as the command
    line gives them (``ppo.iterations=2``), each checked as ``load_config`` checks it; then the
    whole config is checked."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.strip().split(".")
        node, prefix = cfg, ""
        for part in parents:
            _check_key(part, prefix, [f.name for f in dataclasses.fields(node)], "override")
            node, prefix = getattr(node, part), f"{prefix}{part}."
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"override {key}: {prefix.rstrip('.')} is a value, not a section")
        _check_key(leaf, prefix, [f.name for f in dataclasses.fields(node)], "override")
        hints = typing.get_type_hints(type(node))
        setattr(node, leaf, _coerce(hints[leaf], yaml.safe_load(value) if value.strip() else "", key, "override"))
    check_config(cfg, "config built in Python, with overrides")
    return cfg


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", source=source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single override value stands for a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list; got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping; got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number; got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a finite number; got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a schema bug, not user input
