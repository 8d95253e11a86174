"""Resumable PPO checkpoints: complete or absent, never half-written.

Layout, in ``<run_dir>/checkpoints/``::

    iter-000004/
        policy/         DeepSpeed checkpoint of every policy rank (weights, optimizer, RNG)
        critic/         the same for the critic (GAE runs only)
        trainer.pt      the driver's state: iteration, data position, KL controller, guards, RNG
        config.yaml     the config that wrote it
        COMPLETE        a manifest (iteration, files, sizes), written last

A checkpoint is written under ``.tmp-iter-000004`` and renamed into place once ``COMPLETE`` is in
it, so a crash at any moment leaves either the whole checkpoint or none. A folder without
``COMPLETE`` (from a crash of an older writer, or a copy cut short) is skipped with a warning.
Every learner rank writes its own shard files: on several nodes ``run_dir`` must be shared storage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_ray.config import flatten_config
from rlhf_ray.engines.deepspeed_strategy import rng_state, set_rng_state
from rlhf_ray.errors import BadInputError

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.pt"
_NAME = re.compile(r"^iter-(\d+)$")


# Config keys a resumed run must share with its checkpoint: the learners' shapes and shards, the
# data order. Other keys (iterations, logging, fault limits, ...) may change between runs.
RESUME_MUST_MATCH = ("seed", "model.", "data.", "policy.num_ranks", "policy.zero_stage", "critic.num_ranks",
                     "critic.zero_stage", "ppo.advantage_estimator", "ppo.prompts_per_iteration",
                     "rollout.samples_per_prompt")


class IncompleteCheckpointWarning(RuntimeWarning):
    pass


class CheckpointError(BadInputError):
    """A checkpoint cannot be resumed; the message names the checkpoint and what is wrong."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, iteration: int, trainer_state: dict, config_text: str,
                    write_learners: Callable[[Path], None], keep_last: int = 2) -> Path:
    """Writes ``checkpoints/iter-<iteration>`` atomically; ``write_learners(tmp)`` fills in the
    learner subfolders (it must return only once every rank has written). Returns the path."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_learners(tmp)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / TRAINER_STATE)
    (tmp / "config.yaml").write_text(config_text)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_synced(tmp / COMPLETE, json.dumps({"iteration": iteration, "time": time.time(), "files": files}))
    if final.exists():  # the same iteration saved again (a restarted run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: str | os.PathLike, warn: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first. With ``warn``, incomplete ones are reported."""
    root = checkpoint_root(run_dir)
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = _NAME.match(path.name)
        if path.name.startswith(".tmp-"):
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint {path} (interrupted while writing)",
                              IncompleteCheckpointWarning, stacklevel=2)
            continue
        if not match:
            continue
        problem = _problem(path)
        if problem:
            if warn:
                warnings.warn(f"ignoring incomplete checkpoint {path}: {problem}", IncompleteCheckpointWarning,
                              stacklevel=2)
            continue
        found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def damaged_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """``"<folder>: <what is wrong>"`` for every checkpoint folder that cannot be resumed."""
    root = checkpoint_root(run_dir)
    damaged = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".tmp-"):
            damaged.append(f"{path.name}: interrupted while writing")
        elif _NAME.match(path.name) and (problem := _problem(path)):
            damaged.append(f"{path.name}: {problem}")
    return damaged


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; incomplete ones are skipped with a warning."""
    found = complete_checkpoints(run_dir, warn=True)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    """The driver's state saved in a checkpoint (tensors and plain values only: never unpickles code)."""
    try:
        return torch.load(path / TRAINER_STATE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CheckpointError(f"checkpoint {path}: {TRAINER_STATE} is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); delete the checkpoint folder "
                              f"to resume from an older one") from None


def load_trainer_state(path: Path) -> dict:
    """The driver's state of a checkpoint; also restores the driver's RNG states."""
    state = read_trainer_state(path)
    set_rng_state(state.pop("rng"))
    return state


def check_resumable(path: Path, config: dict) -> None:
    """Raises ``CheckpointError`` unless a run with ``config`` (a nested dict) can resume from the
    checkpoint at ``path``: its trainer state loads and the keys of ``RESUME_MUST_MATCH`` agree.
    Cheap: run before any actor starts."""
    import yaml

    read_trainer_state(path)
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        saved = e
    if not isinstance(saved, dict):
        why = f"{type(saved).__name__}" if isinstance(saved, Exception) else "not a mapping of sections"
        raise CheckpointError(f"checkpoint {path}: config.yaml is unreadable ({why}); delete the checkpoint "
                              f"folder to resume from an older one")
    saved = flatten_config(saved)
    now = flatten_config(config)
    differ = [k for k in sorted(set(saved) | set(now))
              if k.startswith(RESUME_MUST_MATCH) and saved.get(k) != now.get(k)]
    if differ:
        lines = "\n".join(f"  {k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
        how = "restore them, or start a new run_dir"
        if any(k.endswith((".num_ranks", ".zero_stage")) for k in differ):
            how += (" (each rank saved its own shard of the optimizer state, so a learner resumes with its "
                    "checkpoint's num_ranks and zero_stage; the ranks may be placed on other nodes or GPUs)")
        raise CheckpointError(f"cannot resume from {path}: the config differs in keys a resumed run must "
                              f"keep:\n{lines}\n{how}")


def _problem(path: Path) -> str:
    marker = path / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker"
    try:
        manifest = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"unreadable {COMPLETE} marker"
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return ""


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
