"""Direct Preference Optimisation (Rafailov et al. 2023) on the policy learners: the preference
pairs ``rm`` reads, trained into the policy directly, with no reward model and no rollouts.

The frozen reference is the starting policy (model.policy; the SFT output in the pipeline). Its
sequence log-probs of every pair are computed once, by the policy learners before their first
step, and cached with the run. Writes ``<run_dir>/policy`` (an HF folder, as PPO saves it),
``ref_logps.safetensors``, ``metrics.jsonl`` (one line per optimiser step, plus the held-out
metrics before training and after each epoch), ``metrics.png`` and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_ray import algo
from rlhf_ray.actors.learner import PolicyLearnerActor, dpo_metrics
from rlhf_ray.actors.placement import learner_placement_group, learner_spec
from rlhf_ray.actors.worker_group import WorkerGroup
from rlhf_ray.config import RunConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.stages.common import begin, check_lora_targets, prepare_run, resolve_policy_path
from rlhf_ray.stages.supervised import encode_side, load_preference_data, train_epochs
from rlhf_ray.tracking import MetricsWriter, open_trackers, plot_metrics

REF_CACHE = "ref_logps.safetensors"
SIDES = ("chosen", "rejected")


def run_dpo(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = prepare_run(cfg)
    policy_path = resolve_policy_path(cfg)
    check_lora_targets(cfg, "policy", policy_path)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load_preference_data(cfg, tokenizer, "dpo")
    # Encoded once: every batch is a selection of rows, each carrying its reference log-probs.
    pairs = {f"{split}_{side}": encode_side(cfg, tokenizer, rows, side)
             for split, rows in (("train", train), ("held_out", held_out)) for side in SIDES}
    policy_path = begin(cfg, run_dir, policy_path)

    dpo, pol = cfg.dpo, cfg.policy
    pg = learner_placement_group(pol, cfg.cluster.placement_timeout_s)
    spec = learner_spec(cfg, pol, policy_path, dpo.batch_size, dpo.lr)
    with (open_trackers(cfg, run_dir, "dpo", "step") as trackers,
          WorkerGroup.launch(PolicyLearnerActor, spec, pol, pg) as learners):  # both closed on any failure too
        ref = reference_logps(run_dir / REF_CACHE, pairs, reference_fingerprint(cfg, policy_path, pairs),
                              lambda batch: sequence_logprobs(learners, batch))
        pairs = {key: batch.with_extras(ref_logps=ref[key]) for key, batch in pairs.items()}

        def train_step(rows: list[int]) -> dict[str, float]:
            index = torch.tensor(rows)
            return learners.call("dpo_step", pairs["train_chosen"].select(index), pairs["train_rejected"].select(index),
                                 dpo.beta, dpo.kind, dpo.label_smoothing)

        def evaluate() -> dict[str, float]:
            chosen, rejected = (sequence_logprobs(learners, pairs[f"held_out_{side}"]) for side in SIDES)
            out = algo.dpo_loss(chosen, rejected, ref["held_out_chosen"], ref["held_out_rejected"], dpo.beta,
                                dpo.kind, dpo.label_smoothing)
            return {f"eval_{key}": value for key, value in dpo_metrics(out).items()}

        metrics = MetricsWriter(run_dir, step_key="step", mirror=trackers.log_metrics)
        evaluations, steps = train_epochs("dpo", len(train), dpo.epochs, dpo.batch_size, cfg.seed, train_step,
                                          evaluate, metrics, progress=("dpo_loss", "dpo_accuracy"))
        model_dir = run_dir / "policy"
        learners.run("save", str(model_dir))
    before, after = evaluations[0], evaluations[-1]
    summary = {"stage": "dpo", "model": str(model_dir), "reference": policy_path, "train_pairs": len(train),
               "held_out_pairs": len(held_out), "steps": steps, "held_out_before": before, "held_out": after,
               "held_out_per_epoch": evaluations[1:]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(run_dir, keys=["dpo_loss", "dpo_accuracy", "dpo_margin", "dpo_chosen_reward", "dpo_rejected_reward",
                                "eval_dpo_loss", "eval_dpo_accuracy", "eval_dpo_margin"], x="step")
    print(f"dpo done: held-out reward accuracy {before['eval_dpo_accuracy']:.3f} -> {after['eval_dpo_accuracy']:.3f}, "
          f"margin {before['eval_dpo_margin']:.3f} -> {after['eval_dpo_margin']:.3f}; policy in {model_dir}")
    return summary


def sequence_logprobs(learners: WorkerGroup, batch: RolloutBatch) -> torch.Tensor:
    """The policy's summed response log-probs of every row ``[B]``. The rows are padded (the last
    one repeated) to a multiple of the ranks: with equal shards every rank runs as many forward
    passes, which ZeRO-3 needs (each pass gathers the sharded parameters from all ranks)."""
    padding = -batch.size % len(learners)
    padded = RolloutBatch.concat([batch, batch.select(torch.full((padding,), batch.size - 1))]) if padding else batch
    return learners.gather("sequence_logprobs", padded)[: batch.size]


def reference_fingerprint(cfg: RunConfig, model_path: str, pairs: dict[str, RolloutBatch]) -> str:
    """What the reference log-probs depend on, as JSON: the reference model (its weight files'
    names, sizes and modification times, so a model retrained into the same folder is not taken
    for the old one; a hub name stands for itself), the learners' numerics and every token of
    the encoded pairs."""
    tokens = hashlib.sha256()
    for key in sorted(pairs):
        batch = pairs[key]
        tokens.update(key.encode())
        for tensor in (batch.sequences, batch.attention_mask, batch.response_mask):
            tokens.update(tensor.contiguous().numpy().tobytes())
    weights = []
    if os.path.isdir(model_path):
        weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_path).iterdir()
                         if f.suffix in (".safetensors", ".bin"))
    return json.dumps({"model": os.path.abspath(model_path) if weights else model_path, "weights": weights,
                       "dtype": cfg.model.dtype, "bf16": cfg.policy.bf16, "pairs": tokens.hexdigest()})


def reference_logps(path: Path, pairs: dict[str, RolloutBatch], fingerprint: str,
                    compute: Callable[[RolloutBatch], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's sequence log-probs ``[B]`` of each of ``pairs``: read from ``path`` when it
    was written for the same ``fingerprint``, else ``compute``d (the reference forward pass over
    every pair, once per run) and written there."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if path.exists():
        with safe_open(str(path), "pt") as f:
            cached = (f.metadata() or {}).get("fingerprint")
        if cached == fingerprint:
            print(f"dpo: reference log-probs reused from {path}")
            return load_file(str(path))
    logps = {key: compute(batch).float().contiguous() for key, batch in pairs.items()}
    tmp = path.with_name(f".{path.name}.tmp")  # a killed run never leaves a half-written cache
    save_file(logps, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)
    return logps
