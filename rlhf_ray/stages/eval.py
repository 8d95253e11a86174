"""Checkpoints compared on held-out data: the alignment tax of RLHF, measured.

For each model (base, SFT, RLHF, ...): the task's gold score of its greedy responses to held-out
prompts (true progress, not what a learned reward pays for), its perplexity on reference text (what
fine-tuning cost the language model) and the configured reward's score of the same responses, each
with its percentage change vs the base and SFT models. Printed as a table and written to
``<run_dir>/eval.json``. Greedy decoding and perplexity run in one vLLM engine per checkpoint, all
started at once; the reward in one frozen reward actor.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import ray
import torch

from rlhf_ray import algo
from rlhf_ray.actors.rollout_pool import RolloutPool
from rlhf_ray.actors.scorers import RewardActor
from rlhf_ray.config import RunConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.stages.common import begin, check_reward_functions, prepare_run


def held_out_prompts(cfg: RunConfig, tokenizer=None) -> list[str]:
    """The held-out prompts, in their order, at most data.num_eval_prompts: data.eval_prompts read
    like data.prompts (with data.eval_split: that split of it, or of data.prompts), or the task's
    held-out prompts when the run's prompts are the task's; empty when none is named."""
    data = cfg.data
    if data.eval_prompts or (data.eval_split and data.prompts):
        from rlhf_ray.data.prompts import run_prompts

        held_out = replace(data, prompts=data.eval_prompts or data.prompts, split=data.eval_split or data.split)
        return run_prompts(held_out, cfg.seed, tokenizer)[: data.num_eval_prompts]
    if not data.task or data.prompts:
        return []
    from rlhf_ray.tasks import get_task

    return get_task(cfg.data.task, cfg.seed).prompts(cfg.data.num_eval_prompts, split="eval")


def held_out_rewards(cfg: RunConfig) -> dict[str, tuple]:
    """The rule rewards that score held-out answers, by metric name: the run's reward functions and
    the task's gold scorer (``gold``) when the prompts are the task's; name -> (spec, function)."""
    from rlhf_ray.stages.common import reward_sources
    from rlhf_ray.tasks import GOLD_COMPONENT
    from rlhf_ray.tasks.rewards import load_reward_function, reward_name

    functions, _ = reward_sources(cfg)
    return {("gold" if reward_name(spec) == GOLD_COMPONENT else reward_name(spec)): (spec, load_reward_function(spec))
            for spec in functions}


def sampled_scores(spec, fn, prompts: list[str], answers: list[str], k: int) -> tuple[float, float]:
    """A rule reward of ``k`` sampled answers to each prompt (prompt-major, as the engines answer):
    their mean, and pass@k (the mean over prompts of the best of the k)."""
    from rlhf_ray.tasks.rewards import call_reward_function

    repeated = [p for p in prompts for _ in range(k)]
    per_prompt = torch.tensor(call_reward_function(spec, fn, repeated, answers)).view(len(prompts), k)
    return per_prompt.mean().item(), per_prompt.max(dim=1).values.mean().item()


def has_reward(cfg: RunConfig) -> bool:
    return bool(cfg.model.reward or cfg.scorers.criteria)


def evaluate(cfg: RunConfig, models: dict[str, str], prompts: list[str], references: list) -> dict[str, dict]:
    """``{metric: {model name: value}}`` for the metrics that apply: each rule reward's mean score
    (the task's gold scorer: ``gold_score``; every reward function by its name) and the reward
    models' or criteria's (``reward``) of greedy responses to ``prompts``; with ``eval.samples`` = k,
    each rule reward's mean over k sampled responses per prompt (``<name>_sampled``) and its pass@k
    (``<name>_pass@k``: the mean over prompts of the best of the k); perplexity of the ``references``
    (``SFTExample``s: the responses given the prompts, a plain text's every token)."""
    from rlhf_ray.data.tokenize import encode_examples, encode_prompts, stop_token_ids, tokenizer_identity
    from rlhf_ray.engines.sampling import SamplingSpec
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.tasks.rewards import call_reward_function

    rules = {("gold_score" if name == "gold" else name): rule
             for name, rule in (held_out_rewards(cfg) if prompts else {}).items()}
    k = cfg.eval.samples
    ro, sc = cfg.rollout, cfg.scorers
    paths = list(dict.fromkeys(models.values()))  # a checkpoint named twice is evaluated once
    tokenizers = {path: load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code) for path in paths}
    stops = {path: stop_token_ids(tok, ro.stop) for path, tok in tokenizers.items()}
    # One engine per checkpoint on rollout capacity, all starting at once.
    pools = {path: RolloutPool.launch(cfg, path, 1, tokenizers[path].pad_token_id, wait=False) for path in paths}
    engines = {path: pool[0] for path, pool in pools.items()}
    reward = None
    if has_reward(cfg) and prompts:
        # The batches come from each checkpoint's tokenizer: when they differ, no ids are shared.
        shared_tokenizer = paths[0] if len({tokenizer_identity(t) for t in tokenizers.values()}) == 1 else None
        reward = ray.remote(RewardActor).options(num_cpus=sc.num_cpus, num_gpus=sc.num_gpus).remote(
            cfg.model.reward, cfg.model.reward_combine, [], [], cfg.backend, sc.micro_batch_size,
            sc.criteria, sc.criteria_weights, sc.criteria_combine, dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code, batch_tokenizer=shared_tokenizer)
    try:
        prompt_ids = {path: encode_prompts(tok, prompts, cfg.data.max_prompt_tokens)
                      for path, tok in tokenizers.items()}
        greedy = {path: engines[path].greedy.remote(prompt_ids[path], cfg.eval.max_new_tokens, stops[path])
                  for path in paths if prompts}
        sampled = {path: engines[path].generate.remote(prompt_ids[path], SamplingSpec(
                       temperature=cfg.eval.temperature, top_p=ro.top_p, max_new_tokens=cfg.eval.max_new_tokens,
                       n=k, stop_token_ids=stops[path], seed=cfg.seed))
                   for path in paths if prompts and k and rules}
        max_len = min(cfg.data.max_seq_len, ro.max_model_len - 1)
        reference_batches = {path: encode_examples(tok, references, cfg.data.max_prompt_tokens, max_len)
                             for path, tok in tokenizers.items() if references}
        reference_logprobs = {path: engines[path].score.remote(b.prompt_token_lists(), b.response_token_lists())
                              for path, b in reference_batches.items()}
        per_path: dict[str, dict[str, float]] = {path: {} for path in paths}
        for path, tok in tokenizers.items():
            out = per_path[path]
            if prompts:
                response_ids = ray.get(greedy[path])
                responses = tok.batch_decode(response_ids, skip_special_tokens=True)
                for name, (spec, fn) in rules.items():
                    out[name] = sum(call_reward_function(spec, fn, prompts, responses)) / len(prompts)
                if path in sampled:  # prompt-major: k answers to each prompt in turn
                    answers = tok.batch_decode([g.response_ids for g in ray.get(sampled[path])],
                                               skip_special_tokens=True)
                    for name, (spec, fn) in rules.items():
                        out[f"{name}_sampled"], out[f"{name}_pass@{k}"] = sampled_scores(spec, fn, prompts, answers, k)
                if reward is not None:
                    batch = RolloutBatch.from_token_lists(prompt_ids[path], response_ids, tok.pad_token_id)
                    out["reward"] = ray.get(reward.score.remote(batch, prompts, responses))["score"].mean().item()
            if references:
                # The policy's tokens only: a multi-turn demonstration's tool results are not its text.
                batch = reference_batches[path]
                logprobs = torch.tensor([lp for row in ray.get(reference_logprobs[path]) for lp in row])
                policy = torch.cat([mask[:n] for mask, n in zip(batch.response_mask, batch.response_lengths())])
                out["perplexity"] = algo.language_model_loss(logprobs, policy).exp().item()
    finally:
        for pool in pools.values():
            pool.shutdown()
        if reward is not None:
            ray.kill(reward)
    return {metric: {name: per_path[path][metric] for name, path in models.items()}
            for metric in per_path[paths[0]]}


def default_compare_to(names: list[str]) -> list[str]:
    return [n for n in ("base", "sft") if n in names] or names[:1]


def percent_change(value: float, baseline: float) -> float | None:
    """(value - baseline) / |baseline| in percent; None when the baseline is 0."""
    return (value - baseline) / abs(baseline) * 100 if baseline else None


def changes(results: dict[str, dict[str, float]], compare_to: list[str]) -> dict[str, dict[str, dict]]:
    """``{reference model: {metric: {model: % change}}}``."""
    return {ref: {metric: {name: percent_change(v, values[ref]) for name, v in values.items()}
                  for metric, values in results.items()}
            for ref in compare_to}


def format_table(results: dict[str, dict[str, float]], compare_to: list[str] | None = None) -> str:
    """One row per model: each metric's value, then its % change vs each of ``compare_to``."""
    names = list(next(iter(results.values())))
    compare_to = compare_to or default_compare_to(names)
    pct = changes(results, compare_to)
    header = [f"{'model':<10}"]
    for metric in results:
        header += [f"{metric:>12}", *(f"{'vs ' + ref:>10}" for ref in compare_to)]
    lines = [" ".join(header)]
    for name in names:
        row = [f"{name:<10}"]
        for metric, values in results.items():
            row.append(f"{values[name]:>12.3f}")
            row += [f"{c:>+9.1f}%" if c is not None else f"{'n/a':>10}"
                    for c in (pct[ref][metric][name] for ref in compare_to)]
        lines.append(" ".join(row))
    return "\n".join(lines)


def eval_data(cfg: RunConfig, tokenizer) -> tuple[list[str], list]:
    """(held-out prompts, reference texts for perplexity), read before any engine starts so a bad
    file stops the run early. Reference texts: eval.reference_text, else the held-out SFT data."""
    from rlhf_ray.stages.sft import text_examples

    prompts = held_out_prompts(cfg, tokenizer)
    references = []
    if cfg.eval.reference_text or cfg.data.sft or cfg.data.task:
        references = text_examples(cfg, cfg.eval.reference_text, tokenizer, held_out=True)
    references = references[: cfg.eval.max_reference_texts]
    if not references and not (prompts and (held_out_rewards(cfg) or has_reward(cfg))):
        raise ValueError("eval has nothing to measure: give data.eval_prompts with scorers.reward_functions, "
                         "model.reward or scorers.criteria (or data.task: gold score), or eval.reference_text "
                         "(perplexity)")
    return prompts, references


def compare_checkpoints(cfg: RunConfig, models: dict[str, str], run_dir: Path, prompts: list[str],
                        references: list) -> dict:
    """Evaluates ``models``, prints the table and writes ``run_dir/eval.json``: per model its
    checkpoint, each metric and each metric's % change vs eval.compare_to (default base and sft)."""
    results = evaluate(cfg, models, prompts, references)
    compare_to = cfg.eval.compare_to or default_compare_to(list(models))
    pct = changes(results, compare_to)
    report = {
        "compare_to": compare_to, "held_out_prompts": len(prompts), "reference_texts": len(references),
        "models": {name: {"checkpoint": path, **{m: v[name] for m, v in results.items()},
                          "change_pct": {f"vs_{ref}": {m: pct[ref][m][name] for m in results} for ref in compare_to}}
                   for name, path in models.items()},
    }
    (Path(run_dir) / "eval.json").write_text(json.dumps(report, indent=2))
    print(format_table(results, compare_to))
    return report


def run_eval(cfg: RunConfig) -> dict:
    from rlhf_ray.models.loading import check_model_folder, load_tokenizer

    if not cfg.eval.models:
        raise ValueError("eval.models is empty: name the checkpoints to compare, e.g. "
                         "eval.models='{base: path/a, sft: path/b, rlhf: path/c}'")
    # Every checkpoint, reward model and rm: criterion must exist before any engine starts.
    paths = {**{f"eval.models.{name}": path for name, path in cfg.eval.models.items()},
             **{f"model.reward[{i}]": path for i, path in enumerate(cfg.model.reward)},
             **{f"scorers.criteria.{name}": judge.removeprefix("rm:")
                for name, judge in cfg.scorers.criteria.items() if judge.startswith("rm:")}}
    for key, path in paths.items():
        try:
            check_model_folder(path)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(f"{key}: {e}") from None
    tokenizer = load_tokenizer(next(iter(cfg.eval.models.values())), trust_remote_code=cfg.model.trust_remote_code)
    prompts, references = eval_data(cfg, tokenizer)
    if prompts:
        check_reward_functions(cfg, prompts)
    run_dir = prepare_run(cfg)
    begin(cfg, run_dir)
    report = compare_checkpoints(cfg, cfg.eval.models, run_dir, prompts, references)
    print(f"eval done: {Path(run_dir) / 'eval.json'}")
    return report
