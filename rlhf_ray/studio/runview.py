"""Reading a PPO run directory for the viewer: ``metrics.jsonl`` (one record per iteration) and
``samples.jsonl`` (per iteration a sample of rollouts: iteration, prompt, response, reward,
components, kl, truncated, and maybe ``flags``). Both are read afresh on each request, so a run
still writing shows its newest lines; a half-written last line is ignored."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

from rlhf_ray.studio.pairs import Pair


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if isinstance(value, dict):
                out.append(value)
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    return _jsonl(Path(run_dir) / "metrics.jsonl")


def read_samples(run_dir: str | Path) -> list[dict]:
    """Samples with an ``id`` (their 0-based position in the file) and ``flags`` always present
    (a dict of flag name -> value): a sample's own ``flags``, ``truncated`` when true, and the
    iteration's raised ``flag/<name>`` metrics (mode_collapse, over_optimisation), which PPO
    measures per batch, so a person can read the rollouts of a flagged iteration."""
    raised = {m.get("iteration"): {k.removeprefix("flag/"): True for k, v in m.items()
                                   if k.startswith("flag/") and v}
              for m in read_metrics(run_dir)}
    rows = _jsonl(Path(run_dir) / "samples.jsonl")
    for i, r in enumerate(rows):
        r["id"] = i
        flags = r.get("flags") if isinstance(r.get("flags"), dict) else {}
        flags = {**raised.get(r.get("iteration"), {}), **flags}
        if r.get("truncated"):
            flags["truncated"] = True
        r["flags"] = flags
    return rows


def samples_to_pairs(samples: list[dict], run_dir: str) -> tuple[list[Pair], list[int]]:
    """Chosen samples -> pairs to label: the responses to one prompt, in the order chosen, give
    adjacent pairs. Returns the pairs and the ids of samples left alone (no second distinct
    response to the same prompt among the chosen)."""
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    pairs, alone = [], []
    for prompt, group in by_prompt.items():
        seen: list[dict] = []
        for s in group:
            if s["response"].strip() not in {x["response"].strip() for x in seen}:
                seen.append(s)
        if len(seen) < 2:
            alone += [s["id"] for s in group]
            continue
        for a, b in pairwise(seen):
            pairs.append(Pair(prompt, a["response"], b["response"], source=f"run:{run_dir}",
                              meta={"samples": [a["id"], b["id"]], "iterations": [a.get("iteration"),
                                                                                  b.get("iteration")]}))
    return pairs, alone
