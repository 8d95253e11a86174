"""The preference collector: sample several responses per prompt from the rollout engines, have
a judge score them, and write the pairs a reward model trains on.

Writes ``<run_dir>/responses.jsonl`` (``{prompt, responses, scores}``: what a human annotator
labels in ``rlhf-ray annotate``) and, unless the judge is ``none``, ``<run_dir>/preferences.jsonl``
(``{prompt, chosen, rejected, score_chosen, score_rejected}``: what ``rlhf-ray rm`` reads), using the
best and worst response of each prompt. Ties (score gap at most ``collect.min_score_gap``) are
left out and counted.
"""

from __future__ import annotations

import json

import ray
import torch

from rlhf_ray.actors.rollout_pool import RolloutPool
from rlhf_ray.actors.scorers import RewardActor
from rlhf_ray.config import RunConfig
from rlhf_ray.data.prompts import run_prompts
from rlhf_ray.data.tokenize import encode_pairs, encode_prompts, stop_token_ids
from rlhf_ray.engines.sampling import SamplingSpec
from rlhf_ray.errors import BadInputError
from rlhf_ray.stages.common import begin, prepare_run, resolve_policy_path


def _judge(cfg: RunConfig, policy: str, tokenizer, prompts: list[str], responses: list[str]) -> list[float] | None:
    judge = cfg.collect.judge
    if judge == "none":
        return None
    if judge == "gold":
        from rlhf_ray.tasks import GOLD_REWARD

        judge = GOLD_REWARD[cfg.data.task]
    models, functions = ([judge.removeprefix("rm:")], []) if judge.startswith("rm:") else ([], [judge])
    actor = ray.remote(RewardActor).options(num_cpus=cfg.scorers.num_cpus, num_gpus=cfg.scorers.num_gpus) \
        .remote(models, "mean", functions, [1.0] * len(functions), cfg.backend, cfg.scorers.micro_batch_size,
                dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, batch_tokenizer=policy)
    try:
        batch = encode_pairs(tokenizer, prompts, responses, cfg.data.max_prompt_tokens, cfg.data.max_seq_len,
                             add_eos=False)
        return ray.get(actor.score.remote(batch, prompts, responses))["score"].tolist()
    finally:
        ray.kill(actor)


def run_collect(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import load_tokenizer

    run_dir = prepare_run(cfg)
    policy = resolve_policy_path(cfg)
    tokenizer = load_tokenizer(policy, trust_remote_code=cfg.model.trust_remote_code)
    prompts = run_prompts(cfg.data, cfg.seed, tokenizer)[: cfg.collect.num_prompts]
    if cfg.collect.judge == "gold" and (not cfg.data.task or cfg.data.prompts):
        raise BadInputError("collect.judge: gold is the built-in task's gold scorer (data.task, on its own prompts); "
                            "judge your prompts with module:function or rm:<reward model dir>, or none")
    stop_ids = stop_token_ids(tokenizer, cfg.rollout.stop)
    policy = begin(cfg, run_dir, policy)

    ro, k = cfg.rollout, cfg.collect.responses_per_prompt
    spec = SamplingSpec(temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens,
                        min_new_tokens=ro.min_new_tokens, n=k,
                        stop_token_ids=stop_ids, seed=cfg.seed)
    ids = encode_prompts(tokenizer, prompts, cfg.data.max_prompt_tokens)
    with RolloutPool.launch(cfg, policy, ro.num_engines, tokenizer.pad_token_id) as pool:
        generations = pool.generate(prompts, ids, spec, iteration=1)  # prompt-major: k per prompt, in order
    texts = tokenizer.batch_decode([g.response_ids for g in generations], skip_special_tokens=True)
    scores = _judge(cfg, policy, tokenizer, [p for p in prompts for _ in range(k)], texts)

    pairs, ties = [], 0
    with (run_dir / "responses.jsonl").open("w") as f:
        for i, prompt in enumerate(prompts):
            group = texts[i * k:(i + 1) * k]
            row = {"prompt": prompt, "responses": group}
            if scores is not None:
                group_scores = torch.tensor(scores[i * k:(i + 1) * k])
                row["scores"] = group_scores.tolist()
                best, worst = int(group_scores.argmax()), int(group_scores.argmin())
                gap = float(group_scores[best] - group_scores[worst])
                if gap <= cfg.collect.min_score_gap or group[best].strip() == group[worst].strip():
                    ties += 1
                else:
                    pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                                  "score_chosen": float(group_scores[best]),
                                  "score_rejected": float(group_scores[worst])})
            f.write(json.dumps(row) + "\n")
    if scores is not None:
        with (run_dir / "preferences.jsonl").open("w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    summary = {"stage": "collect", "prompts": len(prompts), "responses_per_prompt": k, "judge": cfg.collect.judge,
               "pairs": len(pairs), "ties_left_out": ties,
               "preferences": str(run_dir / "preferences.jsonl") if scores is not None else None,
               "responses": str(run_dir / "responses.jsonl")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"collect done: {len(prompts)} prompts x {k} responses -> {len(pairs)} pairs "
          f"({ties} ties left out) in {run_dir}")
    return summary
