"""What every stage does before its loop: the run directory, the models, Ray."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_ray.config import RunConfig, dump_config
from rlhf_ray.platform import detect

BUILTIN_TINY = "builtin:tiny"


def prepare_run(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def resolve_policy_path(cfg: RunConfig, run_dir: Path) -> str:
    """``builtin:tiny`` becomes a tiny model built offline into the run directory."""
    if cfg.model.policy != BUILTIN_TINY:
        from rlhf_ray.models.loading import check_model_path

        return check_model_path(cfg.model.policy)
    from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model

    hidden = cfg.model.tiny_hidden_size
    # Head size 32: vLLM's CPU attention kernels do not support smaller heads.
    spec = TinyModelSpec(hidden_size=hidden, num_layers=cfg.model.tiny_layers, num_heads=hidden // 32,
                         num_kv_heads=hidden // 32, intermediate_size=2 * hidden, seed=cfg.seed)
    return str(build_tiny_model(run_dir / "base_model", spec))


def reward_sources(cfg: RunConfig) -> tuple[list[str], list[float]]:
    """Rule-reward functions and their weights, the task's gold scorer included when asked."""
    from rlhf_ray.tasks import GOLD_REWARD

    functions = list(cfg.scorers.reward_functions)
    weights = list(cfg.scorers.reward_function_weights) or [1.0] * len(functions)
    if cfg.data.task and cfg.scorers.use_task_gold_as_reward and not cfg.model.reward:
        functions.append(GOLD_REWARD[cfg.data.task])
        weights.append(1.0)
    return functions, weights


def init_ray(cfg: RunConfig) -> None:
    """Joins the cluster named by ``ray_address`` or starts a local Ray bound to localhost."""
    import ray

    if ray.is_initialized():
        return
    platform = detect(cfg.backend)
    env = {**platform.process_env(), "TOKENIZERS_PARALLELISM": "false"}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, runtime_env={"env_vars": env})
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env},
                 num_cpus=max(8, os.cpu_count() or 1))  # logical slots: roles mostly wait on each other
