"""Checkpoints compared by the task's gold scorer on held-out prompts (greedy decoding in vLLM).

The gold scorer, not a reward model, says whether training made the model better: this is how
the pipeline shows true progress apart from what the learned reward pays for.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from rlhf_ray.actors.rollout import RolloutActor
from rlhf_ray.config import RunConfig
from rlhf_ray.stages.common import init_ray, prepare_run


def held_out_prompts(cfg: RunConfig) -> list[str]:
    from rlhf_ray.tasks import get_task

    return get_task(cfg.data.task, cfg.seed).prompts(cfg.data.num_eval_prompts, split="eval")


def compare_gold(cfg: RunConfig, models: dict[str, str]) -> dict[str, float]:
    """Mean gold score of greedy responses of each checkpoint on the held-out prompts; one vLLM
    engine per checkpoint, all started at once."""
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.tasks import GOLD_REWARD
    from rlhf_ray.tasks.rewards import load_reward_function

    prompts = held_out_prompts(cfg)
    gold = load_reward_function(GOLD_REWARD[cfg.data.task])
    ro = cfg.rollout
    engines = {
        name: ray.remote(RolloutActor).options(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus * ro.tensor_parallel_size)
        .remote(path, backend=cfg.backend, tensor_parallel_size=ro.tensor_parallel_size, dtype=cfg.model.dtype,
                max_model_len=ro.max_model_len, gpu_memory_utilization=ro.gpu_memory_utilization, seed=cfg.seed,
                trust_remote_code=cfg.model.trust_remote_code)
        for name, path in models.items()
    }
    try:
        tokenizers = {name: load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
                      for name, path in models.items()}
        refs = {name: engines[name].greedy.remote(
                    [tok(p)["input_ids"][-cfg.data.max_prompt_tokens:] for p in prompts], cfg.eval.max_new_tokens)
                for name, tok in tokenizers.items()}
        scores = {}
        for name, ref in refs.items():
            responses = tokenizers[name].batch_decode(ray.get(ref), skip_special_tokens=True)
            values = gold(prompts, responses)
            scores[name] = sum(values) / len(values)
        return scores
    finally:
        for engine in engines.values():
            ray.kill(engine)


def format_table(scores: dict[str, float]) -> str:
    baseline = next(iter(scores.values()))
    lines = [f"{'model':<10} {'gold score':>10} {'change':>9}"]  # change relative to the first model
    for name, value in scores.items():
        change = f"{(value - baseline) / abs(baseline) * 100:>8.1f}%" if baseline else f"{'n/a':>9}"
        lines.append(f"{name:<10} {value:>10.3f} {change}")
    return "\n".join(lines)


def run_eval(cfg: RunConfig) -> dict[str, float]:
    if not cfg.eval.models:
        raise ValueError("eval.models is empty: name the checkpoints to compare, e.g. "
                         "eval.models='{base: path/a, rlhf: path/b}'")
    if not cfg.data.task:
        raise ValueError("eval needs data.task: its gold scorer grades the responses")
    run_dir = prepare_run(cfg)
    init_ray(cfg)
    scores = compare_gold(cfg, cfg.eval.models)
    (Path(run_dir) / "eval.json").write_text(json.dumps({"gold_score": scores}, indent=2))
    print(format_table(scores))
    return scores
