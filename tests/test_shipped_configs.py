"""The shipped method configs (``configs/method_*.yaml``) as their headers say: they share one
start (an SFT model built as ``configs/method_sft.yaml`` builds it) and one reward (the task's gold
scorer) and differ only in the algorithm, so one of them run for two iterations shows for all
that the reward has something to climb and the policy moves. The failure this guards against is a
config whose policy can never earn its reward ("reward 0.000 -> 0.000"). How far each method
climbs in 40 iterations is measured by benchmarks/compare_algorithms.py (docs/algorithms.md), and
each method's loss runs end to end in tests/test_ppo.py and tests/test_alignment.py.

The other CPU configs run elsewhere: tiny_ppo.yaml's settings are tests/test_ppo.py's GAE run,
tiny_pipeline.yaml's stages are tests/test_pipeline.py's, DPO's stage is tests/test_dpo.py's,
cpu_smoke_ppo.yaml is the Ray job of tests/test_ray_job.py, and tiny_long_grpo.yaml is the long
shape of benchmarks/compare_trl.py on the tiny model (its parts: the length floor in
tests/test_hf_engine.py and tests/test_vllm_engine.py, the tiny model's context in
tests/test_tiny_and_data.py). smollm2_sums_grpo.yaml (a user's own task on a real chat model) runs
one GRPO step in tests/test_pretrained.py (its measured run: docs/own_task.md), and the GPU configs'
plans, Qwen2.5-1.5B's on one GPU included, are checked in tests/test_cluster_fit.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlhf_ray.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RL_METHODS = ["ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo"]


def _config(method: str, *overrides: str):
    return load_config(CONFIGS / f"method_{method}.yaml", list(overrides))


@pytest.mark.parametrize("method", [*RL_METHODS, "dpo"])
def test_method_configs_name_their_command_and_their_start(method):
    header = (CONFIGS / f"method_{method}.yaml").read_text().splitlines()
    stage = "dpo" if method == "dpo" else "ppo"
    assert header[0] == f"# rlhf-ray {stage} --config configs/method_{method}.yaml"
    assert "rlhf-ray sft --config configs/method_sft.yaml" in header[1]
    sft = load_config(CONFIGS / "method_sft.yaml")
    assert _config(method).model.policy == f"{sft.run_dir}/model"  # where that command writes it


@pytest.mark.parametrize("method", RL_METHODS)
def test_method_configs_differ_from_each_other_in_the_algorithm_only(method):
    """Same start, data, reward, rollout and policy learner as GRPO's; only ppo.* (and PPO's
    critic) change, so the comparison is fair and the run below stands for all."""
    cfg, grpo = _config(method), _config("grpo")
    differing = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(grpo, f.name)}
    assert differing <= {"run_dir", "ppo", "critic"}, differing
    assert cfg.scorers.use_task_gold_as_reward and not cfg.model.reward  # paid by the gold scorer


@pytest.mark.slow
def test_a_method_config_from_its_sft_start_has_a_reward_to_climb_and_moves_the_policy(ray_session, tmp_path):
    """DAPO's config (the one with the most parts: dynamic sampling, overlong shaping, clip-higher)
    from an SFT model built by method_sft.yaml on less data."""
    from rlhf_ray.stages.ppo import run_ppo
    from rlhf_ray.stages.sft import run_sft

    sft = load_config(CONFIGS / "method_sft.yaml", [f"run_dir={tmp_path / 'sft'}", "data.num_sft_examples=640",
                                                    "logging.trackers=[]"])
    cfg = _config("dapo", f"run_dir={tmp_path / 'dapo'}", f"model.policy={run_sft(sft)['model']}", "ppo.iterations=2",
                  "checkpoint.save_final=false", "logging.trackers=[]")
    first, second = run_ppo(cfg)
    # Some samples of the SFT model earn the gold reward and some do not: a gradient exists.
    assert 0 < first["reward_mean"] < 1 and first["reward_std"] > 0, first
    # The first update moved the policy away from the reference it started as.
    assert first["kl_to_ref"] == pytest.approx(0, abs=1e-3) and second["kl_to_ref"] > 1e-3, second
    # Dynamic sampling on a 0/1-ish reward: a batch of 16 groups, however many were drawn for it.
    assert all(r["dynamic/prompts_drawn"] >= 16 and r["dynamic/rounds"] >= 1 for r in (first, second))
