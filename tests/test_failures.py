"""Faults the PPO driver survives or stops on: non-finite batches and a killed rollout engine."""

from __future__ import annotations

import math
import os
import signal
import sys

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.faults import FaultCounter, NonFiniteError
from rlhf_ray.stages.ppo import PPOTrainer
from rlhf_ray.stages.prepare import nonfinite_phase
from rlhf_ray.tracking import read_metrics

NAN_ITERATIONS = {2, 5, 6}  # iterations whose reward scores are NaN


class FlakyReward:
    """Stands in for the RewardActor: digit fraction, but NaN in some iterations (the driver tells
    it which iteration is scoring). Ray workers cannot import tests/, so the class travels by value
    (see the test) rather than as module:function."""

    def __init__(self):
        self.iteration = 0

    def set_iteration(self, iteration: int) -> None:
        self.iteration = iteration

    def score(self, batch, prompts: list[str], responses: list[str]) -> dict:
        bad = self.iteration in NAN_ITERATIONS
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
    faults = FaultCounter(max_consecutive_nonfinite=2, max_engine_replacements=1)
    faults.batch_done("reward", 1)
    faults.batch_done(None, 2)  # a clean batch resets the run
    faults.batch_done("advantages", 3)
    faults.batch_done("advantages", 4)
    with pytest.raises(NonFiniteError, match="iteration 5: 3 batches in a row .*'loss' phase"):
        faults.batch_done("loss", 5)
    assert faults.nonfinite_batches == 4


def test_fault_counts_survive_a_checkpoint_but_replacements_never_go_back():
    faults = FaultCounter(max_consecutive_nonfinite=3, max_engine_replacements=2)
    faults.batch_done("score", 1)
    faults.engine_replacements = 1
    saved = faults.state_dict()
    assert faults.replacements_left(1) and not faults.replacements_left(2)
    faults.batch_done("score", 2)
    faults.engine_replacements = 2  # replaced after the checkpoint: still counted after a rollback
    faults.load_state_dict(saved)
    assert (faults.nonfinite_batches, faults.consecutive_nonfinite, faults.engine_replacements) == (1, 1, 2)
    faults.restarts = 1
    assert faults.metrics() == {"faults/nonfinite_batches": 1, "faults/engine_replacements": 2, "faults/restarts": 1}


def _sigkill(actor) -> None:
    """Kills the actor's process for real (what a crash or OOM kill does), not through Ray."""
    import ray

    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)


@pytest.mark.slow
def test_nan_batches_dead_engines_and_a_dead_learner_are_survived_then_limits_stop_the_run(
        ray_session, tmp_path, capsys):
    """One GRPO run, 2 engines, checkpoints every 2 iterations, one restart allowed:
    it 2: NaN rewards (skipped); it 3: engine 1 SIGKILLed as generation starts (its prompts go to
    engine 0, a new engine gets the weights and passes parity), then engine 0 SIGKILLed while the
    learner trains (replaced at the sync); it 4: the policy learner SIGKILLed before its update
    (every actor relaunched, the run resumes from checkpoint 2 and redoes 3 and 4); it 5-6: NaN,
    which stops training at the second. Then a killed reference scorer exceeds the restart limit."""
    import ray

    from rlhf_ray.faults import ActorFailureError

    cfg = load_config(None, [
        f"run_dir={tmp_path}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
        "scorers.use_task_gold_as_reward=false", "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction",
        "rollout.max_new_tokens=8", "rollout.max_model_len=64", "data.max_prompt_tokens=32", "rollout.gpu_memory_utilization=0.05",
        "rollout.num_engines=2", "rollout.samples_per_prompt=2", "ppo.advantage_estimator=grpo",
        "ppo.prompts_per_iteration=8", "ppo.iterations=6", "policy.num_ranks=1", "policy.micro_batch_size=16",
        "faults.max_consecutive_nonfinite=1", "faults.max_restarts=1", "checkpoint.every=2",
        "logging.trackers=[]", "checkpoint.save_final=false"])
    trainer = PPOTrainer(cfg)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    launch, step, generate, train = trainer._launch, trainer.step, trainer._generate, trainer._train
    injected: list[str] = []

    def launch_with_flaky_reward():
        launch()
        ray.kill(trainer.roles.reward)
        trainer.roles.reward = ray.remote(FlakyReward).options(num_cpus=0).remote()

    def step_telling_the_iteration():
        ray.get(trainer.roles.reward.set_iteration.remote(trainer.iteration + 1))
        return step()

    def generate_with_a_kill(prompts):
        if trainer.iteration + 1 == 3 and "engine in generate" not in injected:
            _sigkill(trainer.roles.rollout[1])
            injected.append("engine in generate")
            generations = generate(prompts)
            assert len(generations) == 8 * 2  # engine 0 answered the dead engine's prompts as well
            return generations
        return generate(prompts)

    def train_with_kills(batch, temperature):
        it = trainer.iteration + 1
        if it == 4 and "learner" not in injected:
            _sigkill(trainer.roles.policy[0])
            injected.append("learner")
        stats = train(batch, temperature)
        if it == 3 and "engine before sync" not in injected:
            _sigkill(trainer.roles.rollout[0])
            injected.append("engine before sync")
        return stats

    ray.kill(trainer.roles.reward)
    trainer.roles.reward = ray.remote(FlakyReward).options(num_cpus=0).remote()
    trainer._launch, trainer.step = launch_with_flaky_reward, step_telling_the_iteration
    trainer._generate, trainer._train = generate_with_a_kill, train_with_kills
    try:
        with pytest.raises(NonFiniteError, match=r"iteration 6: 2 batches in a row .* 'reward' phase"):
            trainer.fit()
        assert injected == ["engine in generate", "engine before sync", "learner"]
        assert trainer.faults.restarts == 1 and trainer.faults.engine_replacements == 2
        # A scorer dies too: the one allowed restart is used up, so the run stops naming the limit.
        _sigkill(trainer.roles.reference[0])
        with pytest.raises(ActorFailureError, match=r"during iteration 6 .* faults\.max_restarts=1 restarts are used up"):
            trainer.fit()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert "rollout engine 1 died during iteration 3" in out
    assert "rollout engine(s) [0] died before the sync of iteration 3" in out
    assert "restart 1 of 1 from the last checkpoint" in out and "at iteration 2" in out
    rows = read_metrics(tmp_path)
    # Iteration 3 ran twice (before and after the restart) but is logged once.
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("skipped_nonfinite") for r in rows] == [None, "reward", None, None, "reward"]
    assert [r["faults/nonfinite_batches"] for r in rows] == [0, 1, 1, 1, 2]
    assert [r["faults/engine_replacements"] for r in rows] == [0, 0, 2, 2, 2]
    assert [r["faults/restarts"] for r in rows] == [0, 0, 1, 1, 1]
    assert math.isfinite(rows[2]["policy_loss"]) and math.isfinite(rows[3]["policy_loss"])
    assert [r["prompts_position"] for r in rows] == [8 * i for i in range(5)]
    prompts = read_metrics(tmp_path, "prompts.jsonl")
    assert [r["iteration"] for r in prompts] == [1, 2, 3, 4, 5]
