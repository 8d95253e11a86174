"""rlhf_ray: distributed RLHF on Ray.

The Python API (``examples/own_task.py``): build a config (``load_config`` with dotted overrides,
or ``RunConfig`` and its sections), put reward functions in it as Python callables, and run a stage::

    from rlhf_ray import load_config, run_ppo

    def correct(prompts, responses, answer, **kwargs):
        return [float(r.strip() == a) for r, a in zip(responses, answer)]

    cfg = load_config("configs/my_task.yaml")
    cfg.scorers.reward_functions = [correct]
    history = run_ppo(cfg)

Importing this package loads the config layer only; the stages (torch, Ray) load on first use.
"""

from rlhf_ray.config import RunConfig, apply_overrides, check_config, load_config

_STAGES = {"PPOTrainer": "rlhf_ray.stages.ppo", "run_ppo": "rlhf_ray.stages.ppo", "run_sft": "rlhf_ray.stages.sft",
           "run_rm": "rlhf_ray.stages.rm", "run_dpo": "rlhf_ray.stages.dpo", "run_eval": "rlhf_ray.stages.eval",
           "run_pipeline": "rlhf_ray.stages.pipeline"}

__all__ = ["PPOTrainer", "RunConfig", "apply_overrides", "check_config", "load_config", "run_dpo", "run_eval",
           "run_pipeline", "run_ppo", "run_rm", "run_sft"]


def __getattr__(name: str):
    if name in _STAGES:
        import importlib

        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(f"module 'rlhf_ray' has no attribute {name!r}")
