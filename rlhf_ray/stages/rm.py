"""Reward-model training on preference pairs: Bradley-Terry loss with the chapter's margin term,
held-out preference accuracy every epoch, optional ensembles, and score normalisation.

Writes ``<run_dir>/reward_model-<i>`` per ensemble member (HF backbone + head; its
``reward_norm.json`` holds the calibration mean and std that PPO's reward actor applies), plus
``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_ray.actors.learner import RewardLearnerActor
from rlhf_ray.actors.placement import learner_placement_group, learner_spec
from rlhf_ray.actors.worker_group import WorkerGroup
from rlhf_ray.config import RunConfig
from rlhf_ray.stages.common import begin, check_lora_targets, prepare_run, resolve_policy_path
from rlhf_ray.stages.supervised import encode_side, load_preference_data, train_epochs
from rlhf_ray.tracking import MetricsWriter, open_trackers, plot_metrics

NORM_FILE = "reward_norm.json"


def run_rm(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = prepare_run(cfg)
    init_path = cfg.rm.init or resolve_policy_path(cfg)
    check_lora_targets(cfg, "critic", init_path)
    tokenizer = load_tokenizer(init_path, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load_preference_data(cfg, tokenizer, "rm")
    init_path = begin(cfg, run_dir, init_path)

    def encode(pairs, side):
        return encode_side(cfg, tokenizer, pairs, side)

    with open_trackers(cfg, run_dir, "rm", "step") as trackers:
        metrics = MetricsWriter(run_dir, step_key="step", mirror=trackers.log_metrics)
        members = [_train_member(cfg, member, init_path, train, held_out, encode, metrics, run_dir)
                   for member in range(cfg.rm.ensemble_size)]
    summary = {"stage": "rm", "models": [m["path"] for m in members], "train_pairs": len(train),
               "held_out_pairs": len(held_out),
               "held_out_accuracy": sum(m["held_out_accuracy"] for m in members) / len(members),
               "members": members}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(run_dir, keys=["rm_loss", "rm_accuracy", "eval_accuracy"], x="step")
    print(f"rm done: held-out preference accuracy {summary['held_out_accuracy']:.3f} "
          f"({len(members)} model(s)) in {run_dir}")
    return summary


def _train_member(cfg: RunConfig, member: int, init_path: str, train, held_out, encode, metrics,
                  run_dir: Path) -> dict:
    rm, lc = cfg.rm, cfg.critic
    pg = learner_placement_group(lc, cfg.cluster.placement_timeout_s)
    spec = learner_spec(cfg, lc, init_path, rm.batch_size, rm.lr, seed_offset=1000 * member)
    with WorkerGroup.launch(RewardLearnerActor, spec, lc, pg) as learners:  # stopped on any failure too
        held_chosen, held_rejected = encode(held_out, "chosen"), encode(held_out, "rejected")

        def held_out_accuracy() -> float:
            return (learners.gather("scores", held_chosen) > learners.gather("scores", held_rejected)).float().mean().item()

        def train_step(rows: list[int]) -> dict[str, float]:
            pairs = [train[j] for j in rows]
            return learners.call("train_step", encode(pairs, "chosen"), encode(pairs, "rejected"), rm.margin,
                                 rm.margin_weight)

        evaluations, _ = train_epochs(f"rm[{member}]", len(train), rm.epochs, rm.batch_size, cfg.seed + 1000 * member,
                                      train_step, lambda: {"eval_accuracy": held_out_accuracy()}, metrics,
                                      progress=("rm_loss", "rm_accuracy"), tags={"member": member})
        accuracies = [e["eval_accuracy"] for e in evaluations]

        calibration = torch.cat([learners.gather("scores", held_chosen), learners.gather("scores", held_rejected)])
        norm = {"mean": calibration.mean().item(), "std": calibration.std().item()} if cfg.rm.normalize \
            else {"mean": 0.0, "std": 1.0}
        path = run_dir / f"reward_model-{member}"
        learners.run("save", str(path))
    (path / NORM_FILE).write_text(json.dumps(norm))
    return {"path": str(path), "held_out_accuracy": accuracies[-1], "accuracy_per_epoch": accuracies[1:],
            "accuracy_before": accuracies[0], "normalization": norm}
