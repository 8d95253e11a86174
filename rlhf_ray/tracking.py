"""Run directory bookkeeping: metrics as JSON lines, phase timers, and plots of the metrics."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per iteration to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PhaseTimer:
    """Wall-clock seconds of each named phase of one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def plot_metrics(run_dir: str | Path, keys: list[str] | None = None, x: str = "iteration") -> Path:
    """Writes ``metrics.png``: one panel per metric against ``x`` (rows without a metric are
    left out of its panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = keys or [k for k in rows[0] if k != x and isinstance(rows[0][k], (int, float))]
    cols = 3
    n_rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
