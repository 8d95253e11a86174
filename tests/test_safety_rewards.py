"""Multi-criteria (safety) rewards: the combination rules on hand-made scores, and the reward actor
(a plain class here, no Ray) logging every criterion and paying their combination."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algo import combine_scores
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.batch import RolloutBatch

# Three judges (helpful, harmless, honest) of four responses.
SCORES = torch.tensor([[0.9, 0.2, 0.5, -1.0],
                       [0.1, 0.8, 0.5, 4.0],
                       [0.5, 0.5, 0.0, 0.0]])


def test_weighted_combination_is_the_weighted_sum():
    got = combine_scores(SCORES, [2.0, 1.0, 0.5], "weighted")
    assert torch.allclose(got, torch.tensor([2.15, 1.45, 1.5, 2.0]))
    mean = combine_scores(SCORES, [1 / 3] * 3, "weighted")
    assert torch.allclose(mean, SCORES.mean(0))


def test_min_combination_takes_the_worst_criterion_per_response():
    got = combine_scores(SCORES, [], "min")
    assert got.tolist() == pytest.approx([0.1, 0.2, 0.0, -1.0])
    # Constitutional-style: no criterion can be bought with another. Response 3 is excellent on
    # harmlessness (4.0): the plain sum ranks it first, the minimum last (its -1.0 on helpfulness).
    assert int(combine_scores(SCORES, [1.0, 1.0, 1.0], "weighted").argmax()) == 3
    assert int(got.argmin()) == 3


def test_combination_rejects_bad_input():
    with pytest.raises(ValueError, match="2 weights for 3 judges"):
        combine_scores(SCORES, [1.0, 1.0], "weighted")
    with pytest.raises(ValueError, match="valid modes: weighted, min"):
        combine_scores(SCORES, [1.0] * 3, "mean")
    with pytest.raises(ValueError, match="at least one judge"):
        combine_scores(torch.zeros(0, 4), [], "min")


def _score(criteria, weights=None, combine="weighted", functions=()):
    from rlhf_ray.actors.scorers import RewardActor

    actor = RewardActor([], "mean", list(functions), [1.0] * len(functions), "cpu", 8,
                        criteria=criteria, criteria_weights=weights, criteria_combine=combine)
    responses = ["1234", "ab", "12ab5678", ""]
    batch = RolloutBatch.from_token_lists([[1]] * 4, [[2]] * 4, 0)
    return actor.score(batch, ["p"] * 4, responses)


CRITERIA = {"honesty": "rlhf_ray.tasks.rewards:digit_fraction", "brevity": "rlhf_ray.tasks.rewards:brevity"}
DIGITS = [1.0, 0.0, 0.75, 0.0]  # share of digits of each response
BREVITY = [1 - 4 / 32, 1 - 2 / 32, 1 - 8 / 32, 1.0]


def test_reward_actor_logs_each_criterion_and_pays_their_combination():
    out = _score(CRITERIA, {"honesty": 2.0})
    assert out["reward/criterion/honesty"].tolist() == pytest.approx(DIGITS)
    assert out["reward/criterion/brevity"].tolist() == pytest.approx(BREVITY)
    assert out["score"].tolist() == pytest.approx([2 * d + b for d, b in zip(DIGITS, BREVITY)])
    worst = _score(CRITERIA, combine="min")
    assert worst["score"].tolist() == pytest.approx([min(d, b) for d, b in zip(DIGITS, BREVITY)])
    # Criteria add to the other reward sources, which keep their own components.
    both = _score(CRITERIA, combine="min", functions=["rlhf_ray.tasks.rewards:brevity"])
    assert both["score"].tolist() == pytest.approx([min(d, b) + b for d, b in zip(DIGITS, BREVITY)])
    assert "reward/brevity" in both and "reward/criterion/brevity" in both


def test_criteria_config_is_checked_by_key():
    cfg = load_config(None, ["scorers.criteria={helpful: 'rm:runs/rm/reward_model-0', safe: 'a.b:c'}",
                             "scorers.criteria_combine=min"])
    assert cfg.scorers.criteria == {"helpful": "rm:runs/rm/reward_model-0", "safe": "a.b:c"}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["scorers.criteria={helpful: nocolon}", "scorers.criteria_weights={honest: 1}"])
    assert "scorers.criteria.helpful" in str(err.value) and "scorers.criteria_weights.honest" in str(err.value)
    with pytest.raises(ConfigError, match="scorers.criteria_weights: weights are not used"):
        load_config(None, ["scorers.criteria={a: 'x:y'}", "scorers.criteria_weights={a: 2}",
                           "scorers.criteria_combine=min"])


def test_task_gold_is_logged_but_not_paid_beside_criteria():
    from rlhf_ray.stages.common import reward_sources

    gold_only = reward_sources(load_config(None, ["data.task=arithmetic"]))
    assert gold_only == (["rlhf_ray.tasks.arithmetic:gold_reward"], [1.0])
    with_criteria = reward_sources(load_config(None, ["data.task=arithmetic",
                                                      f"scorers.criteria={{a: '{CRITERIA['brevity']}'}}"]))
    assert with_criteria == (["rlhf_ray.tasks.arithmetic:gold_reward"], [0.0])
