"""Supervised fine-tuning on DeepSpeed learners: next-token loss on response tokens only (of a
multi-turn demonstration, on the policy's turns only: tool results are not the policy's to learn).

Writes ``<run_dir>/model`` (HF folder, safetensors, tokenizer), ``metrics.jsonl`` (one line per
optimiser step, plus held-out loss per epoch) and ``summary.json``.
"""

from __future__ import annotations

import json

from rlhf_ray.actors.learner import PolicyLearnerActor
from rlhf_ray.actors.placement import learner_placement_group, learner_spec
from rlhf_ray.actors.worker_group import WorkerGroup
from rlhf_ray.config import RunConfig
from rlhf_ray.data.tokenize import encode_examples
from rlhf_ray.stages.common import begin, check_lora_targets, prepare_run, resolve_policy_path
from rlhf_ray.stages.supervised import train_epochs
from rlhf_ray.tracking import MetricsWriter, open_trackers, plot_metrics


def load_sft_data(cfg: RunConfig, tokenizer):
    """(train, held-out) lists of ``SFTExample`` from data.sft or the built-in task."""
    from rlhf_ray.data import formats

    if cfg.data.sft:
        examples, report = formats.load_sft(cfg.data.sft, cfg.data.fields, cfg.data.on_bad_row, tokenizer,
                                            subset=cfg.data.subset, split=cfg.data.split)
        examples = formats.apply_prompt_limit(examples, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow, report)
        if report.eventful:
            print(report.summary())
    else:
        from rlhf_ray.tasks import get_task

        examples = formats.task_sft(get_task(cfg.data.task, cfg.seed), cfg.data.num_sft_examples,
                                    cfg.data.sft_error_rate)
    return formats.split_holdout(examples, cfg.data.eval_fraction, cfg.seed)


def text_examples(cfg: RunConfig, source: str, tokenizer, held_out: bool):
    """Language-modelling text (the PPO pretraining mix, eval perplexity) as ``SFTExample``s:
    ``source`` when given, else the SFT data (data.sft or the task's demonstrations), its train or
    held-out split."""
    from rlhf_ray.data import formats

    if source:
        examples, report = formats.load_lm_examples(source, cfg.data.fields, cfg.data.on_bad_row, tokenizer,
                                                    subset=cfg.data.subset, split=cfg.data.split)
        if report.eventful:
            print(report.summary())
        return examples
    train, held = load_sft_data(cfg, tokenizer)
    examples = held if held_out else train
    if not examples:
        raise ValueError("no held-out SFT demonstrations for perplexity (data.eval_fraction=0): "
                         "raise data.eval_fraction or give eval.reference_text")
    return examples


def run_sft(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = prepare_run(cfg)
    base_path = resolve_policy_path(cfg)
    check_lora_targets(cfg, "policy", base_path)
    tokenizer = load_tokenizer(base_path, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load_sft_data(cfg, tokenizer)
    base_path = begin(cfg, run_dir, base_path)

    sft, pol = cfg.sft, cfg.policy
    pg = learner_placement_group(pol, cfg.cluster.placement_timeout_s)
    spec = learner_spec(cfg, pol, base_path, sft.batch_size, sft.lr)
    with (open_trackers(cfg, run_dir, "sft", "step") as trackers,
          WorkerGroup.launch(PolicyLearnerActor, spec, pol, pg) as learners):  # both closed on any failure too

        def encode(rows):
            return encode_examples(tokenizer, rows, cfg.data.max_prompt_tokens, cfg.data.max_seq_len)

        def held_out_loss() -> float:
            if not held_out:
                return float("nan")
            parts = learners.submit("sft_eval_loss", encode(held_out)).results()
            return sum(p[0] for p in parts) / max(1.0, sum(p[1] for p in parts))

        def train_step(rows: list[int]) -> dict[str, float]:
            return learners.call("sft_step", encode([train[j] for j in rows]))

        metrics = MetricsWriter(run_dir, step_key="step", mirror=trackers.log_metrics)
        evaluations, step = train_epochs("sft", len(train), sft.epochs, sft.batch_size, cfg.seed, train_step,
                                         lambda: {"eval_loss": held_out_loss()}, metrics, progress=("sft_loss",))
        eval_losses = [e["eval_loss"] for e in evaluations]

        model_dir = run_dir / "model"
        learners.run("save", str(model_dir))
    summary = {"stage": "sft", "model": str(model_dir), "train_examples": len(train),
               "held_out_examples": len(held_out), "steps": step, "held_out_loss_before": eval_losses[0],
               "held_out_loss": eval_losses[-1], "held_out_loss_per_epoch": eval_losses[1:]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(run_dir, keys=["sft_loss", "eval_loss"], x="step")
    print(f"sft done: held-out loss {eval_losses[0]:.3f} -> {eval_losses[-1]:.3f}; model in {model_dir}")
    return summary
