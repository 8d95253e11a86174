"""Run directory bookkeeping: metrics as JSON lines, phase timers, and plots of the metrics."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends JSON lines (one per iteration or step) to ``<run_dir>/<name>``; non-finite floats
    become null so every line stays valid JSON. With ``tensorboard_step`` (the key that counts
    steps), numeric values are mirrored into TensorBoard event files in ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: str | Path, name: str = "metrics.jsonl", tensorboard_step: str | None = None):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = tensorboard_step
        self._tb_dir = str(Path(run_dir) / "tensorboard")
        self._tb = None
        if tensorboard_step:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)

    def rewind(self, step: int) -> int:
        """Forgets what was logged past ``step`` (by a run that died after its last checkpoint):
        the JSON lines are cut, and TensorBoard gets a new event file whose purge step makes
        readers drop the old files' events from ``step + 1`` on. Returns the lines dropped."""
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            # Readers apply event files in name order, which starts with the creation second: the
            # purging file must sort after every older one, so it is not made within their second.
            newest = max((int(p.name.split(".")[3]) for p in Path(self._tb_dir).glob("events.out.tfevents.*")),
                         default=0)
            while int(time.time()) <= newest:
                time.sleep(0.05)
            self._tb = SummaryWriter(self._tb_dir, purge_step=step + 1)
        return truncate_jsonl(self.path, step, self.step_key or "iteration")

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            for record in records:
                for key, value in record.items():
                    if key != self.step_key and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tb.add_scalar(key, value, record[self.step_key])
            self._tb.flush()


def truncate_jsonl(path: Path, step: int, key: str = "iteration") -> int:
    """Drops the lines of a JSON-lines log whose ``key`` exceeds ``step`` (and lines cut short by a
    kill), atomically. Returns the number of lines dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            if json.loads(line).get(key, 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(run_dir: str | Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run_dir) / name
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
