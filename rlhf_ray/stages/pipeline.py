"""The three-stage pipeline: SFT, then the reward model, then PPO, each reading the previous
stage's output, with base, SFT and PPO models compared at the end (held-out gold score, perplexity
on held-out demonstrations, the trained reward model's score: the alignment tax).

Layout: ``<run_dir>/{base_model,sft,rm,ppo}/``, ``<run_dir>/eval.json`` and ``<run_dir>/summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rlhf_ray.config import RunConfig
from rlhf_ray.stages.common import begin, prepare_run, resolve_policy_path


def run_pipeline(cfg: RunConfig) -> dict:
    from rlhf_ray.data.tokenize import stop_token_ids
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.eval import compare_checkpoints, eval_data
    from rlhf_ray.stages.ppo import run_ppo
    from rlhf_ray.stages.rm import run_rm
    from rlhf_ray.stages.sft import run_sft

    root = prepare_run(cfg)
    base = resolve_policy_path(cfg, root)
    # The eval's data and the stop strings first: bad input stops the pipeline before any training.
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    stop_token_ids(tokenizer, cfg.rollout.stop)
    eval_inputs = eval_data(cfg, tokenizer) if cfg.data.task else None
    begin(cfg, root)

    def stage(name: str, **model_changes) -> RunConfig:
        return replace(cfg, run_dir=str(root / name), model=replace(cfg.model, **model_changes))

    sft = run_sft(stage("sft", policy=base))
    rm = run_rm(stage("rm", policy=sft["model"]))
    ppo_cfg = stage("ppo", policy=sft["model"], reward=rm["models"])
    history = run_ppo(ppo_cfg)
    ppo_model = str(Path(ppo_cfg.run_dir) / "policy")

    summary: dict = {"sft": sft, "rm": rm,
                     "ppo": {"model": ppo_model, "iterations": len(history),
                             "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
                             "kl_last": history[-1]["kl_to_ref"]}}
    if eval_inputs is not None:
        eval_cfg = replace(cfg, model=replace(cfg.model, reward=rm["models"]))
        report = compare_checkpoints(eval_cfg, {"base": base, "sft": sft["model"], "ppo": ppo_model}, root,
                                     *eval_inputs)
        summary["held_out_gold_score"] = {name: row["gold_score"] for name, row in report["models"].items()}
        summary["eval"] = report
    summary["rm_held_out_accuracy"] = rm["held_out_accuracy"]
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"pipeline done: {root / 'summary.json'}")
    return summary
