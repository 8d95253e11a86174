import pytest

from rlhf_ray.tasks import get_task
from rlhf_ray.tasks.arithmetic import ArithmeticTask, gold_reward
from rlhf_ray.tasks.rewards import brevity, digit_fraction, load_reward_function


def test_gold_scorer_grades_answers():
    assert ArithmeticTask.gold_score("3+4=", "7") == 1.0
    assert ArithmeticTask.gold_score("3+4=", " 7 ") == 1.0
    assert ArithmeticTask.gold_score("3+4=", "8") == pytest.approx(0.4)
    assert ArithmeticTask.gold_score("3+4=", "17") == 0.0
    assert ArithmeticTask.gold_score("3+4=", "seven") == 0.0
    assert ArithmeticTask.gold_score("3+4=", "") == 0.0
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        ArithmeticTask.gold_score("hello", "7")


def test_task_data_is_deterministic_and_consistent():
    task = get_task("arithmetic", seed=3)
    assert task.prompts(20) == get_task("arithmetic", seed=3).prompts(20)
    assert task.prompts(20) != get_task("arithmetic", seed=4).prompts(20)
    assert task.prompts(20, "train") != task.prompts(20, "eval")
    pairs = task.preference_pairs(50)
    assert all(ArithmeticTask.gold_score(p["prompt"], p["chosen"]) == 1.0 for p in pairs)
    assert all(ArithmeticTask.gold_score(p["prompt"], p["rejected"]) < 1.0 for p in pairs)
    sft = task.sft_examples(400, error_rate=0.1)
    wrong = sum(ArithmeticTask.gold_score(r["prompt"], r["response"]) < 1.0 for r in sft)
    assert 15 < wrong < 70  # about 10% deliberately imperfect


def test_rule_rewards_and_loader():
    assert load_reward_function("rlhf_ray.tasks.arithmetic:gold_reward") is gold_reward
    assert digit_fraction(["", ""], ["12", "a1"]) == [1.0, 0.5]
    assert brevity([""], [""]) == [1.0]
    with pytest.raises(ValueError, match="'no.such.module:f' cannot be loaded"):
        load_reward_function("no.such.module:f")
    with pytest.raises(ValueError, match="unknown data.task 'chess'"):
        get_task("chess")
