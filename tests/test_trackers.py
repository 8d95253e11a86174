"""Experiment trackers (``logging.trackers``): TensorBoard, Weights & Biases offline and MLflow's
local store, each read back with its own client library. The fast tests drive the trackers
directly; the slow one reads back the short PPO run of ``tests/conftest.py``."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.tracking import MetricsWriter, open_trackers, read_metrics

ALL_TRACKERS = "logging.trackers=[tensorboard,wandb,mlflow]"


# --- reading each tracker back with its own library ----------------------------------------------

def wandb_offline_records(run_dir: Path) -> list:
    """Every record of the run's offline log (``wandb/offline-run-*/run-<id>.wandb``), decoded with
    wandb's own protobuf ``Record``. wandb 0.31 ships no Python reader of these files any more (its
    ``wandb.sdk.internal.datastore`` is gone; ``wandb sync`` reads them in wandb-core), so the
    framing is read here: a 7-byte W&B header, then LevelDB log blocks of 32 KiB, each chunk behind
    a 7-byte header (CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zeroed space after the last record
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """The offline run's config, history rows and exit code, as W&B would upload them."""
    config, history, exit_code = {}, [], None
    for record in wandb_offline_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
        elif kind == "history":  # a logged table is a nested item: ("samples", "nrows"), ...
            row: dict = {}
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else item.nested_key
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
            history.append(row)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"config": config, "history": history, "exit_code": exit_code}


def mlflow_run(run_dir: Path, store: str = ""):
    """(client, the run of ``run_dir`` in ``store``; by default the store in ``run_dir``)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store or f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-ray")
    name = "/".join(run_dir.parts[-2:])
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return client, run


def mlflow_samples(client, run, step_key: str, step: int) -> list[dict]:
    table = client.load_table(run.info.experiment_id, f"samples/{step_key}_{step:06d}.json", run_ids=[run.info.run_id])
    return table.to_dict("records")


# --- fast: the config and the adapters ----------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for the fast tests' runs: a new store costs seconds (MLflow builds its
    schema); the slow test covers the default store in the run directory."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_trackers_default_to_tensorboard_and_bad_choices_are_refused_naming_the_key():
    assert load_config(None, []).logging.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"logging.trackers\[1\] must be one of tensorboard, wandb, mlflow"):
        load_config(None, ["logging.trackers=[wandb,comet]"])
    with pytest.raises(ConfigError, match="logging.trackers: names a tracker twice"):
        load_config(None, ["logging.trackers=[mlflow,mlflow]"])
    with pytest.raises(ConfigError, match="did you mean logging.trackers"):  # the key it replaced
        load_config(None, ["logging.tensorboard=false"])
    with pytest.raises(ConfigError, match="logging.mlflow_tracking_uri: holds a password") as refused:
        load_config(None, ["logging.mlflow_tracking_uri=https://me:hunter2@mlflow.example.com"])
    assert "hunter2" not in str(refused.value)


def test_a_tracker_not_installed_is_a_config_error_before_any_work(monkeypatch, tmp_path):
    """A user without wandb is told which key and which package (the CLI prints it as one line);
    nothing is written and nothing starts."""
    import importlib.util

    from rlhf_ray.stages.ppo import PPOTrainer

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}", "data.task=arithmetic", "logging.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError, match=r"^logging.trackers: wandb not installed: pip install 'rlhf-ray\[trackers\]'"):
        PPOTrainer(cfg)
    assert not run_dir.exists()


def test_a_tracker_that_cannot_start_is_a_config_error_naming_the_key(offline_trackers, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.trackers=[tensorboard,mlflow]",
                             "logging.mlflow_tracking_uri=nosuchscheme://nowhere"])
    with pytest.raises(ConfigError, match="logging.trackers: mlflow could not start a run"):
        open_trackers(cfg, tmp_path, "ppo", "iteration")


def test_every_tracker_gets_the_metrics_config_and_samples_and_no_secret(offline_trackers, mlflow_store, monkeypatch,
                                                                        tmp_path):
    """Numbers go to every tracker at their step (flags and text do not), the config as the run's
    config or parameters, the samples as one table per step; the reward endpoint's token, which
    the config names but does not hold, is written nowhere."""
    monkeypatch.setenv("REWARD_TOKEN", "tok-3f9a-never-logged")
    monkeypatch.chdir(tmp_path)  # MLflow's own artifact default would be ./mlruns here
    cfg = load_config(None, [f"run_dir={tmp_path}", ALL_TRACKERS, f"logging.mlflow_tracking_uri={mlflow_store}",
                             "scorers.http.urls=[http://127.0.0.1:9/score]", "scorers.http.token_env=REWARD_TOKEN"])
    with open_trackers(cfg, tmp_path, "ppo", "iteration") as trackers:
        metrics = MetricsWriter(tmp_path, mirror=trackers.log_metrics)
        samples = MetricsWriter(tmp_path, "samples.jsonl", mirror=trackers.log_samples)
        for i in (1, 2):
            metrics.write({"iteration": i, "reward_mean": 0.5 * i, "loss": float("nan"), "flag/collapse": True,
                           "note": "text"})
            samples.write_many([{"iteration": i, "prompt": f"{i}+{n}=", "response": "4|\n2", "reward": 1.0,
                                 "components": {"digits": 0.25}, "truncated": False} for n in range(3)])

    wandb = wandb_run(tmp_path)
    assert wandb["exit_code"] == 0 and wandb["config"]["scorers"]["http"]["token_env"] == "REWARD_TOKEN"
    rows = [row for row in wandb["history"] if "reward_mean" in row]
    assert [(row["iteration"], row["reward_mean"]) for row in rows] == [(1, 0.5), (2, 1.0)]
    assert math.isnan(rows[0]["loss"]) and "flag/collapse" not in rows[0] and "note" not in rows[0]
    tables = [row for row in wandb["history"] if "samples" in row]
    assert [(row["iteration"], row["samples"]["_type"], row["samples"]["nrows"]) for row in tables] == \
        [(1, "table-file", 3), (2, "table-file", 3)]
    (table_file,) = tmp_path.glob(f"wandb/offline-run-*/files/{tables[0]['samples']['path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["prompt", "response", "reward", "components.digits", "truncated"]
    assert table["data"][0] == ["1+0=", "4|\n2", 1.0, 0.25, False]

    client, run = mlflow_run(tmp_path, mlflow_store)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward_mean")] == [(1, 0.5), (2, 1.0)]
    assert "flag/collapse" not in run.data.metrics and "note" not in run.data.metrics
    assert run.data.params["scorers.http.token_env"] == "REWARD_TOKEN" and run.data.tags["stage"] == "ppo"
    assert mlflow_samples(client, run, "iteration", 2)[2] == {"prompt": "2+2=", "response": "4|\n2", "reward": 1.0,
                                                               "components.digits": 0.25, "truncated": False}
    assert not (tmp_path / "mlruns").exists() and run.info.artifact_uri.startswith(
        (Path(mlflow_store.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri())
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"tok-3f9a-never-logged" not in path.read_bytes(), path


class RecordingTracker:
    def __init__(self):
        self.closed: list[bool] = []  # the ``failed`` of each close

    def close(self, failed: bool) -> None:
        self.closed.append(failed)


def test_tracker_runs_close_once_as_failed_exactly_when_the_stage_fails():
    from rlhf_ray.tracking import Trackers

    for fails in (False, True):
        tracker = RecordingTracker()
        with pytest.raises(RuntimeError) if fails else nullcontext(), Trackers([tracker], "step"):
            if fails:
                raise RuntimeError("a learner died")
        assert tracker.closed == [fails]
    # PPO's trainer: a failed start closes them (as failed), a good one leaves them open for fit().
    started, failed_start = Trackers([RecordingTracker()], "iteration"), Trackers([RecordingTracker()], "iteration")
    with started.closed_on_failure():
        pass
    with pytest.raises(RuntimeError), failed_start.closed_on_failure():
        raise RuntimeError("no room for the actors")
    failed_start.close()  # PPOTrainer.close() after that: nothing more
    assert started.trackers[0].closed == [] and failed_start.trackers[0].closed == [True]


def test_a_stage_that_fails_closes_its_tracker_runs_as_failed(offline_trackers, mlflow_store, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.trackers=[wandb,mlflow]",
                             f"logging.mlflow_tracking_uri={mlflow_store}"])
    trackers = open_trackers(cfg, tmp_path, "sft", "step")
    with pytest.raises(RuntimeError), trackers.closed_on_failure():
        MetricsWriter(tmp_path, step_key="step", mirror=trackers.log_metrics).write({"step": 1, "sft_loss": 2.0})
        raise RuntimeError("a learner died")
    assert wandb_run(tmp_path)["exit_code"] == 1
    client, run = mlflow_run(tmp_path, mlflow_store)
    assert run.info.status == "FAILED" and run.data.tags["stage"] == "sft"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "sft_loss")] == [(1, 2.0)]


# --- slow: a real PPO run, read back --------------------------------------------------------------

@pytest.mark.slow
def test_short_ppo_run_reads_back_from_wandb_offline_and_mlflow(short_ppo_run):
    """The short PPO run logged to all three trackers: every iteration's metrics, the resolved
    config and each iteration's samples table come back through W&B's and MLflow's own readers,
    equal to metrics.jsonl and samples.jsonl."""
    trainer, history = short_ppo_run
    run_dir = Path(trainer.run_dir)
    logged = read_metrics(run_dir)
    samples = read_metrics(run_dir, "samples.jsonl")
    assert [r["iteration"] for r in logged] == [1, 2] and len(history) == 2

    wandb = wandb_run(run_dir)
    assert wandb["exit_code"] == 0
    assert wandb["config"]["ppo"]["advantage_estimator"] == "grpo"
    rows = [row for row in wandb["history"] if "reward_mean" in row]
    assert [(row["iteration"], row["reward_mean"], row["kl_to_ref"]) for row in rows] == \
        [(r["iteration"], r["reward_mean"], r["kl_to_ref"]) for r in logged]
    tables = [row for row in wandb["history"] if "samples" in row]
    assert [(row["iteration"], row["samples"]["nrows"]) for row in tables] == [(1, 32), (2, 32)]

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.data.params["ppo.advantage_estimator"] == "grpo"
    for key in ("reward_mean", "kl_to_ref", "policy_loss"):
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == \
            [(r["iteration"], r[key]) for r in logged], key
    for iteration in (1, 2):
        table = mlflow_samples(client, run, "iteration", iteration)
        assert [(row["prompt"], row["response"]) for row in table] == \
            [(s["prompt"], s["response"]) for s in samples if s["iteration"] == iteration]
