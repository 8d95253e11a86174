"""A user's own task: every column of a prompt row reaches the rewards (functions, the HTTP
endpoint, the environment, samples.jsonl), each reward is checked against the data before any
work, and the held-out set is scored by the run's own rewards without a built-in task."""

from __future__ import annotations

import json
import pickle
import runpy
import sys
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.formats import (
    ChatPrompt,
    Prompt,
    apply_prompt_limit,
    column_values,
    load_prompts,
    row_columns,
)
from rlhf_ray.tasks.rewards import call_reward_function, signature_problem


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def correct(prompts, responses, answer, **kwargs):
    """The reward a user writes first: the response against the row's answer."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]


@pytest.fixture
def tokenizer():
    from rlhf_ray.models.tiny import build_tokenizer

    return build_tokenizer()


def needs_id(prompts, responses, id):
    return [float(i is not None) for i in id]


def takes_nothing(prompts):
    return [0.0] * len(prompts)


def test_every_column_of_a_prompt_row_comes_along_with_the_prompt(tmp_path):
    rows = [{"question": "1+1=", "answer": "2", "id": 7, "meta": {"source": "x"}},
            {"question": [{"role": "user", "content": "2+2="}], "answer": 4, "id": 8}]
    prompts, _ = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), fields={"prompt": "question"})
    assert prompts == ["1+1=", "User: 2+2=\nAssistant: "]
    assert row_columns(prompts[0]) == {"answer": "2", "id": 7, "meta": {"source": "x"}}
    assert isinstance(prompts[1], ChatPrompt) and row_columns(prompts[1]) == {"answer": 4, "id": 8}
    for p in prompts:  # between Ray processes (pickled) the columns and messages stay
        back = pickle.loads(pickle.dumps(p))
        assert back == p and row_columns(back) == row_columns(p) and type(back) is type(p)
    assert pickle.loads(pickle.dumps(prompts[1])).messages == [{"role": "user", "content": "2+2="}]
    # one value per prompt, in order; None where a row lacks the column
    assert column_values(prompts) == {"answer": ["2", 4], "id": [7, 8], "meta": [{"source": "x"}, None]}
    assert column_values(["a plain task prompt"]) == {}


def test_a_prompt_cut_to_the_token_limit_keeps_its_columns():
    from rlhf_ray.models.tiny import build_tokenizer

    cut = apply_prompt_limit([Prompt("123456789+987654321=", {"answer": "x"})], build_tokenizer(), 8)
    assert cut == ["7654321="] and row_columns(cut[0]) == {"answer": "x"}


def test_reward_functions_get_the_columns_they_name_or_all_with_kwargs():
    seen = {}

    def named(prompts, responses, answer):
        seen["named"] = answer
        return [0.0] * len(responses)

    def every(prompts, responses, **columns):
        seen["every"] = columns
        return [1.0] * len(responses)

    prompts = [Prompt("a", {"answer": "1", "id": 1}), Prompt("b", {"answer": "2", "id": 2})]
    group = [p for p in prompts for _ in range(2)]  # samples_per_prompt=2: each prompt's row per response
    assert call_reward_function("m:named", named, group, ["r"] * 4) == [0.0] * 4
    assert seen["named"] == ["1", "1", "2", "2"]
    assert call_reward_function("m:every", every, group, ["r"] * 4) == [1.0] * 4
    assert seen["every"] == {"answer": ["1", "1", "2", "2"], "id": [1, 1, 2, 2]}
    assert call_reward_function("m:correct", correct, group, ["1", "2", "2", " 2 "]) == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="reward function f returned 1 scores for 4 responses"):
        call_reward_function("m:f", lambda p, r: [0.0], group, ["r"] * 4)


def test_a_reward_function_that_cannot_score_the_data_is_named_with_the_columns_there_are():
    columns = ["answer", "id"]
    assert signature_problem(correct, columns) is None
    assert signature_problem("rlhf_ray.tasks.rewards:digit_fraction", columns) is None
    assert "cannot be loaded: No module named 'nope'" in signature_problem("nope:f", columns)
    assert "has no attribute 'missing'" in signature_problem("rlhf_ray.tasks.rewards:missing", columns)
    assert "must take (prompts, responses, **columns); its parameters: (prompts)" in signature_problem(
        takes_nothing, columns)
    problem = signature_problem(needs_id, ["answer"], {"id": 3}, 10)
    assert problem == ("reward function 'needs_id' needs the column 'id', but 3 of the 10 prompt rows lack it "
                       "(columns in every row: answer; name the parameter after one of them, or give it a default)")
    assert "the prompt rows have no such column (columns in every row: none" in signature_problem(needs_id, [])


def _own_task_files(tmp_path: Path, answer_column: str = "answer") -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+1=", answer_column: str(i + 1)} for i in range(8)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"{i}+2=", answer_column: str(i + 2)} for i in range(4)])
    return train, held


def test_config_check_imports_every_reward_and_checks_it_against_the_data(tmp_path, capsys):
    """``rlhf-ray config check`` finds what a reward actor would only find after Ray started: a
    function that does not import, and one that asks for a column the rows lack."""
    train, held = _own_task_files(tmp_path, answer_column="solution")
    base = ["config", "check", f"data.prompts={train}", f"data.eval_prompts={held}", "ppo.eval_every=1"]
    assert main([*base, "scorers.reward_functions=[no_such_module:f]"]) == 2
    err = capsys.readouterr().err
    assert err.count("rlhf-ray: ") == 1 and "Traceback" not in err
    assert "scorers.reward_functions[0]: reward function 'no_such_module:f' cannot be loaded" in err
    assert main([*base, "scorers.reward_functions=[rlhf_ray.tasks.verifiers:math_answer]"]) == 2
    err = capsys.readouterr().err
    assert ("scorers.reward_functions[0]: reward function 'math_answer' needs the column 'answer', but the prompt "
            "rows have no such column (columns in every row: solution;") in err
    assert main([*base, "scorers.reward_functions=[rlhf_ray.tasks.verifiers:math_answer]",
                 "data.fields={answer: solution}"]) == 2  # data.fields renames the prompt's fields only
    capsys.readouterr()
    assert main([*base, "scorers.reward_functions=[rlhf_ray.tasks.rewards:digit_fraction]"]) == 0
    assert capsys.readouterr().out.strip() == "config ok"


def test_a_run_on_the_users_prompts_has_no_task_and_needs_held_out_prompts_of_its_own(tmp_path):
    from rlhf_ray.stages.common import reward_sources
    from rlhf_ray.stages.eval import held_out_prompts, held_out_rewards

    train, held = _own_task_files(tmp_path)
    assert load_config(None, []).data.task == ""  # no task unless asked
    with pytest.raises(ConfigError, match="ppo.eval_every: needs held-out prompts: give data.eval_prompts"):
        load_config(None, [f"data.prompts={train}", "ppo.eval_every=2", "scorers.reward_functions=[m:f]"])
    # Even with data.task named, prompts of the user's own are never scored by the task's gold scorer.
    cfg = load_config(None, [f"data.prompts={train}", f"data.eval_prompts={held}", "ppo.eval_every=2",
                             "data.task=arithmetic", "scorers.reward_functions=[rlhf_ray.tasks.verifiers:math_answer]"])
    assert reward_sources(cfg) == (["rlhf_ray.tasks.verifiers:math_answer"], [1.0])
    assert list(held_out_rewards(cfg)) == ["math_answer"]
    prompts = held_out_prompts(cfg)
    assert prompts == ["0+2=", "1+2=", "2+2=", "3+2="] and row_columns(prompts[3]) == {"answer": "5"}


@pytest.mark.parametrize("key,moved", [("eval.prompts=x.jsonl", "eval.prompts is now data.eval_prompts"),
                                       ("ppo.eval_temperature=1", "ppo.eval_temperature is now eval.temperature")])
def test_a_moved_key_says_where_it_lives_now(key, moved):
    with pytest.raises(ConfigError, match=moved):
        load_config(None, [key])


def test_the_http_reward_gets_each_responses_row_columns(reward_server):
    from rlhf_ray.engines.http_reward import HttpRewardClient

    client = HttpRewardClient(urls=(reward_server.url(),), token_env="")
    reward_server.token = ""
    prompts = [Prompt("1+1=", {"answer": "2"}), Prompt("1+1=", {"answer": "2"}), Prompt("2+2=", {"answer": "4"})]
    assert client.score(prompts, ["2", "3", "4"]) == [1.0, 1.0, 1.0]
    assert reward_server.bodies[-1] == {"prompts": ["1+1=", "1+1=", "2+2="], "responses": ["2", "3", "4"],
                                        "columns": {"answer": ["2", "2", "4"]}}


def test_the_environment_gets_the_whole_row(tokenizer):
    """``agent.env``'s ``reset(row)`` gets the prompt and every other column of its row (a plain
    task prompt: the prompt alone)."""
    from agent_helpers import RowRecordingEnv, ScriptedPolicy, ScriptedPool

    from rlhf_ray.engines.sampling import SamplingSpec
    from rlhf_ray.stages.agent_rollout import MultiTurnRollouts

    cfg = load_config(None, ["agent.env=agent_helpers:RowRecordingEnv", "data.task=arithmetic"])
    rollouts = MultiTurnRollouts(cfg, tokenizer)
    RowRecordingEnv.rows.clear()
    try:
        pool = ScriptedPool(ScriptedPolicy(tokenizer, lambda text: "1"))
        rollouts.sample(pool, [Prompt("1+1=", {"answer": "2", "id": 3}), "2+2="], SamplingSpec(max_new_tokens=4), 1)
    finally:
        rollouts.close()
    assert RowRecordingEnv.rows == [{"answer": "2", "id": 3, "prompt": "1+1="}, {"prompt": "2+2="}]


# --- a whole run on a user's own data --------------------------------------------------------------
def id_matches_prompt(prompts, responses, id, **kwargs):
    """Each response's ``id`` column must be the id its prompt was written with: a row column that
    drifted from its prompt (a shuffle, a group, a round of dynamic sampling, an engine, a resume)
    fails the run. Pays the share of digits, so groups differ and dynamic sampling has work."""
    wrong = [(p, i) for p, i in zip(prompts, id) if not p.startswith(f"[{i}] ")]
    if wrong:
        raise AssertionError(f"row columns out of line with their prompts: {wrong[:3]}")
    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


def _id_rows(n: int, start: int) -> list[dict]:
    return [{"prompt": f"[{i}] {i % 7}+{i % 5}=", "id": i, "answer": str(i % 7 + i % 5)} for i in range(start, start + n)]


@pytest.mark.slow
def test_row_columns_stay_with_their_prompts_through_groups_dynamic_sampling_overlap_two_engines_and_a_resume(
        ray_session, tmp_path):
    """A reward function defined here (shipped to the reward actor by value) reads the ``id``
    column of each response's row and checks it against the id in the prompt: with GRPO groups and
    two engines throughout, DAPO's dynamic sampling for two iterations, then a resume from their
    checkpoint that samples overlapped (the two cannot run together), and a held-out evaluation (no
    data.task) scored by the same function."""
    from rlhf_ray.stages.ppo import PPOTrainer
    from rlhf_ray.tracking import read_metrics

    train = write_jsonl(tmp_path / "train.jsonl", _id_rows(24, 0))
    held = write_jsonl(tmp_path / "held.jsonl", _id_rows(6, 100))
    run_dir = tmp_path / "run"

    def config(iterations: int, *more: str):
        cfg = load_config(None, [
            f"run_dir={run_dir}", "model.tiny_hidden_size=64", f"data.prompts={train}", f"data.eval_prompts={held}",
            "rollout.max_new_tokens=6", "rollout.max_model_len=64", "data.max_prompt_tokens=32",
            "rollout.gpu_memory_utilization=0.05", "rollout.engine=hf", "rollout.num_engines=2",
            "rollout.samples_per_prompt=2",
            "ppo.advantage_estimator=grpo", "ppo.dynamic_sampling_rounds=2", "ppo.prompts_per_iteration=4", f"ppo.iterations={iterations}", "ppo.eval_every=2",
            "policy.num_ranks=1", "policy.micro_batch_size=16", "checkpoint.every=1", "checkpoint.save_final=false",
            "logging.samples_per_iteration=8", "logging.trackers=[]", "sync.parity_every=0", "scorers.reward_functions=[]",
            *more])
        cfg.scorers.reward_functions = [id_matches_prompt]  # the Python API: the function itself
        return cfg

    for cfg in (config(2, "ppo.dynamic_sampling=true"), config(4, "ppo.overlap=true", "checkpoint.resume=auto")):
        trainer = PPOTrainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    rows = read_metrics(run_dir)
    trained = [r for r in rows if "reward_mean" in r]
    assert [r["iteration"] for r in trained] == [1, 2, 3, 4]
    assert [("dynamic/rounds" in r, r["policy_lag"]) for r in trained] == [(True, 0), (True, 0), (False, 0), (False, 1)]
    held_out = [r for r in rows if "eval/id_matches_prompt" in r]
    assert [r["iteration"] for r in held_out] == [0, 2, 4]  # before the first, every 2nd and after the last
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 8
    for s in samples:  # what people read: each sample's row beside its prompt
        assert s["prompt"].startswith(f"[{s['columns']['id']}] ") and s["columns"]["answer"]


@pytest.mark.slow
def test_the_python_api_example_trains_with_the_reward_function_defined_in_it(ray_session, tmp_path, monkeypatch):
    """examples/own_task.py as a user runs it, its config built in Python and its reward function
    a plain function of the script (so shipped by value), cut by dotted overrides to one GRPO step
    of the tiny model on a file with an ``answer`` column, evaluated on a held-out file."""
    from rlhf_ray.tracking import read_metrics

    train, held = _own_task_files(tmp_path)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "own_task.py", f"run_dir={run_dir}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64",
        f"data.prompts={train}", f"data.eval_prompts={held}", "data.max_prompt_tokens=32", "rollout.engine=hf",
        "rollout.max_new_tokens=4", "rollout.max_model_len=64", "rollout.samples_per_prompt=2",
        "ppo.prompts_per_iteration=4", "ppo.iterations=1", "ppo.eval_every=1", "policy.lr=1e-4",
        "checkpoint.save_final=false", "logging.trackers=[]"])
    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "own_task.py"), run_name="__main__")
    rows = read_metrics(run_dir)
    (step,) = [r for r in rows if "reward_mean" in r]
    assert "reward/last_number_is_answer_mean" in step and 0 <= step["reward_mean"] <= 1
    assert [r["iteration"] for r in rows if "eval/last_number_is_answer" in r] == [0, 1]


def test_config_check_of_a_plan_on_hub_data_reads_no_model_and_no_dataset(capsys):
    """A GPU plan is checked where its hub model and dataset are out of reach (this machine has no
    hub): its reward functions are imported and their signatures checked, their columns are not."""
    plan = Path(__file__).parent.parent / "configs" / "qwen2.5_1.5b_1gpu_gsm8k_grpo.yaml"
    assert main(["config", "check", "--config", str(plan)]) == 0
    assert capsys.readouterr().out.strip() == "config ok"
    assert main(["config", "check", "--config", str(plan), "scorers.reward_functions=[nope_mod:f]"]) == 2
    assert "scorers.reward_functions[0]: reward function 'nope_mod:f' cannot be loaded" in capsys.readouterr().err
