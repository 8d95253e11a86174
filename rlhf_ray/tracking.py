"""Run directory bookkeeping: metrics as JSON lines, the experiment trackers they are mirrored to
(TensorBoard, Weights & Biases, MLflow: ``logging.trackers``), phase timers, and plots of the metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from rlhf_ray.config import RunConfig


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends JSON lines (one per iteration or step) to ``<run_dir>/<name>``; non-finite floats
    become null so every line stays valid JSON. ``mirror`` gets every batch of records written
    (``Trackers.log_metrics`` or ``Trackers.log_samples``); ``step_key`` is the key that counts steps."""

    def __init__(self, run_dir: str | Path, name: str = "metrics.jsonl", step_key: str = "iteration",
                 mirror: Callable[[list[dict]], None] | None = None):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self.mirror = mirror

    def rewind(self, step: int) -> int:
        """Forgets the lines logged past ``step`` (by a run that died after its last checkpoint);
        returns how many were dropped. The trackers are rewound by ``Trackers.rewind``."""
        return truncate_jsonl(self.path, step, self.step_key)

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        if self.mirror is not None and records:
            self.mirror(records)


# --- experiment trackers ---------------------------------------------------------------------
# Each tracker's client library is imported only when the tracker is chosen: a user without wandb
# or mlflow never needs them, and one who chose them without installing them is told before any
# work starts (``missing_tracker_packages``, checked with the rest of the inputs).

def _mlflow_store_uri(cfg: RunConfig, run_dir: Path) -> str:
    """``logging.mlflow_tracking_uri``, else MLFLOW_TRACKING_URI, else a SQLite store in ``run_dir``
    (MLflow 3's own default kind of store; its file store refuses new runs)."""
    return (cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{run_dir / 'mlflow.db'}")


def _artifact_location(store_uri: str) -> str | None:
    """Where a new MLflow experiment keeps its artifacts: beside a SQLite store's file (MLflow's
    own choice is ./mlruns in whatever folder the run was started from); a server decides itself."""
    if store_uri.startswith("sqlite:///"):
        return (Path(store_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def missing_tracker_packages(cfg: RunConfig) -> list[str]:
    """The packages the trackers of ``logging.trackers`` need that are not installed."""
    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "mlflow": ["mlflow"]}
    if "mlflow" in cfg.logging.trackers and _mlflow_store_uri(cfg, Path(cfg.run_dir)).startswith(
            ("sqlite:", "postgresql", "mysql", "mssql")):
        needed["mlflow"] += ["sqlalchemy", "alembic"]  # MLflow's database stores (mlflow-skinny leaves them out)
    return [package for name in cfg.logging.trackers for package in needed[name]
            if importlib.util.find_spec(package) is None]


@dataclass
class TrackedRun:
    """What a tracker is told about the run it records."""

    run_dir: Path
    stage: str  # sft, rm, dpo or ppo
    step_key: str  # the record key that counts steps: "iteration" (PPO) or "step"
    cfg: RunConfig

    @property
    def name(self) -> str:
        """The run folder and its parent (``runs/default``, ``<pipeline>/ppo``)."""
        return "/".join(self.run_dir.parts[-2:])


class Tracker(Protocol):
    """One tracker's run of one stage: opened with a ``TrackedRun``, fed by ``Trackers``."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, columns: list[str], rows: list[list], step: int) -> None: ...
    def rewind(self, step: int) -> None: ...
    def close(self, failed: bool) -> None: ...


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard``: scalars, the config and the samples as text."""

    def __init__(self, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter

        from rlhf_ray.config import dump_config

        self.dir = str(run.run_dir / "tensorboard")
        self.writer = SummaryWriter(self.dir)
        self.writer.add_text("config", _code_block(dump_config(run.cfg)), 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, columns: list[str], rows: list[list], step: int) -> None:
        def cell(value) -> str:
            return str(value).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        """A new event file whose purge step makes readers drop the old files' events from
        ``step + 1`` on."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        # Readers apply event files in name order, which starts with the creation second: the
        # purging file must sort after every older one, so it is not made within their second.
        newest = max((int(p.name.split(".")[3]) for p in Path(self.dir).glob("events.out.tfevents.*")), default=0)
        while int(time.time()) <= newest:
            time.sleep(0.05)
        self.writer = SummaryWriter(self.dir, purge_step=step + 1)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run with its files in ``<run_dir>/wandb``. Offline (WANDB_MODE=offline)
    it needs no network or account; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later."""

    def __init__(self, run: TrackedRun):
        import wandb

        from rlhf_ray.config import config_to_dict

        self.wandb, self.step_key = wandb, run.step_key
        self.run = wandb.init(project=run.cfg.logging.project, entity=run.cfg.logging.wandb_entity or None,
                              name=run.name, job_type=run.stage, dir=str(run.run_dir), config=config_to_dict(run.cfg))
        # Plotted against the run's own step, not W&B's call counter: a resumed run logs its
        # steps again (W&B drops points logged at a step below its counter).
        self.run.define_metric(run.step_key)
        self.run.define_metric("*", step_metric=run.step_key)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, self.step_key: step})

    def log_samples(self, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({"samples": self.wandb.Table(columns=columns, data=rows), self.step_key: step})

    def rewind(self, step: int) -> None:
        """W&B keeps what it was sent; the steps logged again after a resume are plotted beside
        the dead run's."""

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run in the experiment ``logging.project``: metrics, the config as parameters and
    as ``config.yaml``, and each step's samples as a table artifact (``samples/iteration_000001.json``)."""

    def __init__(self, run: TrackedRun):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from rlhf_ray.config import config_to_dict, flatten_config

        uri = _mlflow_store_uri(run.cfg, run.run_dir)
        self.client, self.step_key = MlflowClient(tracking_uri=uri), run.step_key
        project = run.cfg.logging.project
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            project, artifact_location=_artifact_location(uri))
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags={"stage": run.stage}).info.run_id
        config = config_to_dict(run.cfg)
        params = [Param(key, str(value)) for key, value in flatten_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_samples(self, columns: list[str], rows: list[list], step: int) -> None:
        table = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        self.client.log_table(self.run_id, table, f"samples/{self.step_key}_{step:06d}.json")

    def rewind(self, step: int) -> None:
        """MLflow keeps what it was sent; the steps logged again after a resume sit beside the
        dead run's in each metric's history."""

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKERS: dict[str, Callable[[TrackedRun], Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: shown verbatim


def _table_cell(value):
    """A value a table cell holds: numbers and text as they are, anything else as JSON."""
    value = _finite_or_none(value)
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _flat_row(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": x for sub, x in value.items()})
        else:
            flat[key] = value
    return flat


class Trackers:
    """The trackers of one stage's run (``logging.trackers``), all fed the same records. A
    context manager: leaving it on an exception closes the tracker runs as failed."""

    def __init__(self, trackers: list[Tracker], step_key: str):
        self.trackers, self.step_key = trackers, step_key
        self.closed = False

    def log_metrics(self, records: list[dict]) -> None:
        """The numbers of each record (flags and text left out) at its step."""
        for record in records:
            numbers = {k: v for k, v in record.items()
                       if k != self.step_key and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self.trackers:
                tracker.log_metrics(numbers, record[self.step_key])

    def log_samples(self, rows: list[dict]) -> None:
        """Sample rows as one table per step; a mapping in a row (a reward's components) becomes
        one column per entry (``components.<name>``)."""
        flat_rows = [_flat_row(row) for row in rows]
        columns = list(dict.fromkeys(key for row in flat_rows for key in row if key != self.step_key))
        for step in dict.fromkeys(row[self.step_key] for row in rows):
            table = [[_table_cell(row.get(c)) for c in columns] for row in flat_rows if row[self.step_key] == step]
            for tracker in self.trackers:
                tracker.log_samples(columns, table, step)

    def rewind(self, step: int) -> None:
        for tracker in self.trackers:
            tracker.rewind(step)

    def close(self, failed: bool = False) -> None:
        """Ends every tracker run, once (later calls do nothing)."""
        if not self.closed:
            self.closed = True
            for tracker in self.trackers:
                tracker.close(failed)

    @contextmanager
    def closed_on_failure(self):
        """Closes the tracker runs as failed when the block raises (a stage that could not start
        its actors), and leaves them open otherwise."""
        try:
            yield
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_trackers(cfg: RunConfig, run_dir: Path, stage: str, step_key: str) -> Trackers:
    """Starts a run in each tracker of ``logging.trackers`` and gives it the resolved config. A
    tracker that cannot start (no credentials, an unreachable server) stops the stage here, before
    its actors start, with an error naming ``logging.trackers``."""
    from rlhf_ray.config import ConfigError

    run = TrackedRun(Path(run_dir), stage, step_key, cfg)
    opened: list[Tracker] = []
    for name in cfg.logging.trackers:
        try:
            opened.append(TRACKERS[name](run))
        except Exception as e:  # whatever the client library raises, told as a config problem
            Trackers(opened, step_key).close(failed=True)
            raise ConfigError(f"logging.trackers: {name} could not start a run: {type(e).__name__}: {e}") from e
    return Trackers(opened, step_key)


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
    # Every row's metrics, in order of first appearance: some rows hold only a few (PPO's held-out
    # evaluation before the first iteration).
    keys = keys or list(dict.fromkeys(k for r in rows for k, v in r.items()
                                      if k != x and isinstance(v, (int, float))))
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
