"""Faults the PPO driver survives or stops on: non-finite batches and a killed rollout engine."""

from __future__ import annotations

import math
import os
import signal
import sys
import types

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.stages.ppo import NonFiniteError, PPOTrainer, nonfinite_phase
from rlhf_ray.tracking import read_metrics

NAN_CALLS = {2, 5, 6, 7}  # reward calls (= iterations) whose scores are NaN


class FlakyReward:
    """Stands in for the RewardActor: digit fraction, but NaN on some calls. Ray workers cannot
    import tests/, so the class travels by value (see the test) rather than as module:function."""

    def __init__(self):
        self.calls = 0

    def score(self, batch, prompts: list[str], responses: list[str]) -> dict:
        self.calls += 1
        bad = self.calls in NAN_CALLS
        s = torch.tensor([float("nan") if bad else sum(c.isdigit() for c in r) / max(1, len(r))
                          for r in responses])
        return {"score": s, "reward/flaky": s}


def test_nonfinite_phase_names_the_first_bad_phase_and_ignores_padding():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    padded = torch.tensor([[0.1, 0.2, float("nan")], [0.3, float("inf"), 0.0]])
    assert nonfinite_phase(mask, score=[padded, None], reward=[torch.ones(2)]) is None
    assert nonfinite_phase(mask, score=[padded], reward=[torch.tensor([1.0, float("nan")])]) == "reward"
    bad = padded.clone()
    bad[0, 1] = float("inf")
    assert nonfinite_phase(mask, score=[bad], advantages=[torch.full((2, 3), float("nan"))]) == "score"


def test_a_run_of_nonfinite_batches_stops_with_the_phase_named():
    trainer = types.SimpleNamespace(
        cfg=load_config(None, ["faults.max_consecutive_nonfinite=2"]), iteration=4,
        faults={"nonfinite_batches": 0, "consecutive_nonfinite": 0, "engine_replacements": 0})
    count = PPOTrainer._count_nonfinite.__get__(trainer)
    count("reward")
    count(None)  # a clean batch resets the run
    count("advantages")
    count("advantages")
    with pytest.raises(NonFiniteError, match="'loss' phase"):
        count("loss")
    assert trainer.faults["nonfinite_batches"] == 4


@pytest.mark.slow
def test_nan_batches_are_skipped_a_dead_engine_is_replaced_then_a_nan_run_stops(ray_session, tmp_path):
    """2 engines, GRPO: iteration 2 has NaN rewards (skipped), engine 1 is SIGKILLed as iteration 3
    starts (its prompts go to engine 0, a new engine gets the weights and passes parity), then
    iterations 5-7 are all NaN: training stops at the third with an error naming the reward phase."""
    import ray

    cfg = load_config(None, [
        f"run_dir={tmp_path}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
        "scorers.use_task_gold_as_reward=false", "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction",
        "rollout.max_new_tokens=8", "rollout.max_model_len=64", "rollout.gpu_memory_utilization=0.05",
        "rollout.num_engines=2", "rollout.samples_per_prompt=2", "ppo.advantage_estimator=grpo",
        "ppo.prompts_per_iteration=8", "ppo.iterations=8", "policy.num_ranks=1", "policy.micro_batch_size=16",
        "sync.parity_every=1", "faults.max_consecutive_nonfinite=2", "logging.tensorboard=false",
        "checkpoint.save_final=false"])
    trainer = PPOTrainer(cfg)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.kill(trainer.roles.reward)
    trainer.roles.reward = ray.remote(FlakyReward).options(num_cpus=0).remote()
    generate, killed = trainer._generate, []

    def generate_with_a_kill(prompts):
        if trainer.iteration == 2 and not killed:  # iteration 3 has started: its prompts are drawn
            victim = trainer.roles.rollout[1]
            pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            killed.append(victim)
        return generate(prompts)

    trainer._generate = generate_with_a_kill
    try:
        with pytest.raises(NonFiniteError, match=r"iteration 7: 3 batches in a row .* 'reward' phase"):
            trainer.fit()
        assert killed and trainer.roles.rollout[1] is not killed[0]
        assert trainer.faults["engine_replacements"] == 1
        # The new engine serves with current weights: parity of every engine holds now.
        gens = trainer._generate(trainer.prompts.next_batch(4))
        from rlhf_ray.data.batch import RolloutBatch

        trainer.check_sync_parity(RolloutBatch.from_token_lists(
            [g.prompt_ids for g in gens], [g.response_ids for g in gens], trainer.tokenizer.pad_token_id))
    finally:
        trainer.close()
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped_nonfinite") for r in rows] == [None, "reward", None, None, "reward", "reward"]
    assert [r["faults/nonfinite_batches"] for r in rows] == [0, 1, 1, 1, 2, 3]
    assert rows[2]["faults/engine_replacements"] == 1
    # Iteration 3 lost an engine mid-way and still trained on all 8 prompts x 2 samples.
    assert rows[2]["generated_tokens"] > 0 and math.isfinite(rows[2]["policy_loss"])
    assert [r["prompts_position"] for r in rows] == [8 * i for i in range(6)]
