"""Reward-model training on preference pairs: Bradley-Terry loss with the chapter's margin term,
held-out preference accuracy every epoch, optional ensembles, and score normalisation.

Writes ``<run_dir>/reward_model-<i>`` per ensemble member (HF backbone + head; its
``reward_norm.json`` holds the calibration mean and std that PPO's reward actor applies), plus
``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_ray.actors.learner import RewardLearnerActor
from rlhf_ray.actors.placement import learner_placement_group, learner_spec
from rlhf_ray.actors.worker_group import WorkerGroup
from rlhf_ray.config import RunConfig
from rlhf_ray.data.tokenize import encode_pairs
from rlhf_ray.stages.common import begin, prepare_run, resolve_policy_path
from rlhf_ray.tracking import MetricsWriter, plot_metrics

NORM_FILE = "reward_norm.json"


def load_preference_data(cfg: RunConfig, tokenizer):
    """(train, held-out) lists of ``PreferencePair`` from data.preferences or the built-in task."""
    from rlhf_ray.data import formats

    if cfg.data.preferences:
        pairs, report = formats.load_preferences(cfg.data.preferences, cfg.data.fields, cfg.data.on_bad_row,
                                                 tokenizer)
        pairs = formats.apply_prompt_limit(pairs, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow, report)
        if report.eventful:
            print(report.summary())
    else:
        from rlhf_ray.tasks import get_task

        pairs = formats.task_preferences(get_task(cfg.data.task, cfg.seed), cfg.data.num_preference_pairs)
    return formats.split_holdout(pairs, cfg.data.eval_fraction, cfg.seed)


def run_rm(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = prepare_run(cfg)
    init_path = cfg.rm.init or resolve_policy_path(cfg, run_dir)
    tokenizer = load_tokenizer(init_path, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load_preference_data(cfg, tokenizer)
    if not held_out:
        raise ValueError("rm: no held-out pairs (data.eval_fraction is 0 or the data is tiny); "
                         "preference accuracy cannot be measured")
    begin(cfg, run_dir)

    def encode(pairs, side):
        return encode_pairs(tokenizer, [p.prompt for p in pairs], [getattr(p, side) for p in pairs],
                            cfg.data.max_prompt_tokens, cfg.data.max_seq_len)

    metrics = MetricsWriter(run_dir, tensorboard_step="step" if cfg.logging.tensorboard else None)
    members = []
    for member in range(cfg.rm.ensemble_size):
        members.append(_train_member(cfg, member, init_path, train, held_out, encode, metrics, run_dir))
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

        rng = random.Random(cfg.seed + 1000 * member)
        steps_per_epoch = max(1, len(train) // rm.batch_size)
        step, accuracies = 0, [held_out_accuracy()]
        metrics.write({"member": member, "step": 0, "epoch": 0, "eval_accuracy": accuracies[0]})
        with tqdm(total=rm.epochs * steps_per_epoch, desc=f"rm[{member}]", unit="step") as bar:
            for epoch in range(1, rm.epochs + 1):
                order = list(range(len(train)))
                rng.shuffle(order)
                for i in range(steps_per_epoch):
                    pairs = [train[j] for j in order[i * rm.batch_size:(i + 1) * rm.batch_size]]
                    stats = learners.call("train_step", encode(pairs, "chosen"), encode(pairs, "rejected"), rm.margin,
                                          rm.margin_weight)
                    step += 1
                    metrics.write({"member": member, "step": step, "epoch": epoch, **stats})
                    bar.update()
                    bar.set_postfix(loss=f"{stats['rm_loss']:.3f}", acc=f"{stats['rm_accuracy']:.2f}")
                accuracies.append(held_out_accuracy())
                metrics.write({"member": member, "step": step, "epoch": epoch, "eval_accuracy": accuracies[-1]})
                print(f"rm[{member}] epoch {epoch}: held-out preference accuracy {accuracies[-1]:.3f}")

        calibration = torch.cat([learners.gather("scores", held_chosen), learners.gather("scores", held_rejected)])
        norm = {"mean": calibration.mean().item(), "std": calibration.std().item()} if cfg.rm.normalize \
            else {"mean": 0.0, "std": 1.0}
        path = run_dir / f"reward_model-{member}"
        learners.run("save", str(path))
    (path / NORM_FILE).write_text(json.dumps(norm))
    return {"path": str(path), "held_out_accuracy": accuracies[-1], "accuracy_per_epoch": accuracies[1:],
            "accuracy_before": accuracies[0], "normalization": norm}
