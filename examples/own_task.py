"""GRPO on your own task from Python: your data, your reward function, your held-out set.

    .venv/bin/python examples/own_task.py [section.key=value ...]

Trains SmolLM2-135M-Instruct (no hub needed) on configs/data/sums_train.jsonl, whose rows carry an
``answer`` column, and evaluates it on configs/data/sums_heldout.jsonl. On a Ray cluster the same
script runs as a job; the function below travels to the reward actor by value:

    ray job submit --address http://HEAD:8265 --working-dir . -- python examples/own_task.py ray_address=auto
"""

import re
import sys

from rlhf_ray import RunConfig, apply_overrides, run_ppo
from rlhf_ray.config import DataConfig, ModelConfig, PPOConfig, RolloutConfig, ScorerConfig


def last_number_is_answer(prompts, responses, answer, **kwargs):
    """1.0 when the response's last number is the row's answer (any column reaches a reward by name)."""
    last = [(re.findall(r"-?\d+", r) or [None])[-1] for r in responses]
    return [float(n == str(a)) for n, a in zip(last, answer)]


if __name__ == "__main__":  # vLLM and the reward helpers start processes
    cfg = RunConfig(
        run_dir="runs/own_task",
        model=ModelConfig(policy="builtin:smollm2-135m-instruct"),
        data=DataConfig(prompts="configs/data/sums_train.jsonl", eval_prompts="configs/data/sums_heldout.jsonl"),
        scorers=ScorerConfig(reward_functions=[last_number_is_answer]),
        rollout=RolloutConfig(samples_per_prompt=8, max_new_tokens=24, max_model_len=128, temperature=0.7),
        ppo=PPOConfig(advantage_estimator="grpo", iterations=30, prompts_per_iteration=8, kl_coef=0.001, eval_every=5),
    )
    cfg.policy.lr = 2e-5
    history = run_ppo(apply_overrides(cfg, sys.argv[1:]))
