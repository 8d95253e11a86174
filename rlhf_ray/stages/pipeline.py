"""The pipeline: SFT, then the preference stage(s) of ``pipeline.method``, each reading the
previous stage's output, with the base, SFT and final models compared at the end (held-out gold
score, perplexity on held-out demonstrations, the trained reward model's score when there is one:
the alignment tax).

* ``ppo``: SFT -> reward model -> PPO against it. Layout ``<run_dir>/{base_model,sft,rm,ppo}/``.
* ``dpo``: SFT -> DPO on the same preference pairs, no reward model. Layout ``<run_dir>/{base_model,sft,dpo}/``.

Both write ``<run_dir>/eval.json`` and ``<run_dir>/summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rlhf_ray.config import RunConfig
from rlhf_ray.stages.common import begin, prepare_run, resolve_policy_path

StageConfig = Callable[..., RunConfig]  # (stage name, **model changes) -> that stage's config


def run_pipeline(cfg: RunConfig) -> dict:
    from rlhf_ray.data.tokenize import stop_token_ids
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.eval import compare_checkpoints, eval_data
    from rlhf_ray.stages.sft import run_sft

    root = prepare_run(cfg)
    base = resolve_policy_path(cfg)
    # The eval's data and the stop strings first: bad input stops the pipeline before any training.
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    stop_token_ids(tokenizer, cfg.rollout.stop)
    eval_inputs = eval_data(cfg, tokenizer) if cfg.data.has_held_out_prompts else None
    base = begin(cfg, root, base)

    def stage(name: str, **model_changes) -> RunConfig:
        return replace(cfg, run_dir=str(root / name), model=replace(cfg.model, **model_changes))

    sft = run_sft(stage("sft", policy=base))
    preference_stage = {"ppo": _rm_then_ppo, "dpo": _dpo}[cfg.pipeline.method]
    name, model, reward_models, summary = preference_stage(stage, sft["model"])
    summary = {"sft": sft, **summary}
    if eval_inputs is not None:
        eval_cfg = replace(cfg, model=replace(cfg.model, reward=reward_models))
        report = compare_checkpoints(eval_cfg, {"base": base, "sft": sft["model"], name: model}, root, *eval_inputs)
        if "gold_score" in report["models"][name]:
            summary["held_out_gold_score"] = {name: row["gold_score"] for name, row in report["models"].items()}
        summary["eval"] = report
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"pipeline done: {root / 'summary.json'}")
    return summary


def _rm_then_ppo(stage: StageConfig, sft_model: str) -> tuple[str, str, list[str], dict]:
    """(eval name, trained policy, reward models for the eval, summary entries)."""
    from rlhf_ray.stages.ppo import run_ppo
    from rlhf_ray.stages.rm import run_rm

    rm = run_rm(stage("rm", policy=sft_model))
    ppo_cfg = stage("ppo", policy=sft_model, reward=rm["models"])
    history = run_ppo(ppo_cfg)
    ppo_model = str(Path(ppo_cfg.run_dir) / "policy")
    ppo = {"model": ppo_model, "iterations": len(history), "reward_first": history[0]["reward_mean"],
           "reward_last": history[-1]["reward_mean"], "kl_last": history[-1]["kl_to_ref"]}
    return "ppo", ppo_model, rm["models"], {"rm": rm, "ppo": ppo, "rm_held_out_accuracy": rm["held_out_accuracy"]}


def _dpo(stage: StageConfig, sft_model: str) -> tuple[str, str, list[str], dict]:
    """(eval name, trained policy, no reward models, summary entries): DPO's reference is the SFT model."""
    from rlhf_ray.stages.dpo import run_dpo

    dpo = run_dpo(stage("dpo", policy=sft_model))
    return "dpo", dpo["model"], [], {"dpo": dpo}
