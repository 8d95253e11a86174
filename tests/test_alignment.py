"""The alignment tax: ``rlhf-ray eval`` measuring it (gold score, perplexity, reward; % change vs
base and SFT) and its mitigations in PPO (pretraining-mix loss, KL-to-reference distillation).

The slow tests share one short PPO run on the real stack with both mitigations and multi-criteria
rewards on. The eval of real checkpoints runs at the end of the pipeline (tests/test_pipeline.py)."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.formats import DataError, SFTExample, load_lm_examples
from rlhf_ray.stages.eval import changes, format_table, percent_change, run_eval

RESULTS = {"gold_score": {"base": 0.0, "sft": 0.5, "rlhf": 0.8},
           "perplexity": {"base": 40.0, "sft": 5.0, "rlhf": 6.0}}


def test_percent_changes_against_base_and_sft():
    pct = changes(RESULTS, ["base", "sft"])
    assert pct["base"]["gold_score"] == {"base": None, "sft": None, "rlhf": None}  # baseline 0: undefined
    assert pct["base"]["perplexity"] == {"base": 0.0, "sft": -87.5, "rlhf": -85.0}
    assert pct["sft"]["gold_score"]["rlhf"] == pytest.approx(60.0)
    assert pct["sft"]["perplexity"]["rlhf"] == pytest.approx(20.0)  # the alignment tax on perplexity
    assert percent_change(-0.5, -1.0) == pytest.approx(50.0)  # a negative baseline: up is positive


def test_table_has_a_value_and_a_change_column_per_metric_and_reference():
    lines = format_table(RESULTS).splitlines()
    assert lines[0].split() == ["model", "gold_score", "vs", "base", "vs", "sft",
                                "perplexity", "vs", "base", "vs", "sft"]
    assert [line.split()[0] for line in lines[1:]] == ["base", "sft", "rlhf"]
    assert lines[3].split()[1:] == ["0.800", "n/a", "+60.0%", "6.000", "-85.0%", "+20.0%"]
    only_base = format_table({"gold_score": {"base": 0.2, "ppo": 0.4}}).splitlines()
    assert only_base[0].split() == ["model", "gold_score", "vs", "base"]
    assert only_base[2].split() == ["ppo", "0.400", "+100.0%"]


def test_lm_examples_from_lines_text_rows_and_sft_rows(tmp_path):
    txt = tmp_path / "ref.txt"
    txt.write_text("first line\n\n  \nsecond line\n")
    assert load_lm_examples(str(txt))[0] == [SFTExample("", "first line"), SFTExample("", "second line")]
    rows = tmp_path / "ref.jsonl"
    rows.write_text('{"text": "plain"}\n{"prompt": "1+2=", "response": "3"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert load_lm_examples(str(rows))[0] == [SFTExample("", "plain"), SFTExample("1+2=", "3"),
                                              SFTExample("User: hi\nAssistant: ", "yo")]
    rows.write_text('{"text": "plain"}\n{"text": 7}\n')
    with pytest.raises(DataError, match=r"ref.jsonl row 2, field 'text': wrong type"):
        load_lm_examples(str(rows))
    assert load_lm_examples(str(rows), on_bad_row="skip")[0] == [SFTExample("", "plain")]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_lm_examples(str(tmp_path / "missing.txt"))


def test_plain_text_predicts_every_token_after_the_first(tiny_model_dir):
    from rlhf_ray.data.tokenize import encode_pairs
    from rlhf_ray.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)  # adds no BOS: an empty prompt encodes to nothing
    assert tok("", add_special_tokens=True)["input_ids"] == []
    batch = encode_pairs(tok, ["", "3+4="], ["12+3=15", "7"], max_prompt_tokens=8, max_seq_len=6)
    text, prompt, answer = (tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=15", "3+4=", "7"))
    assert batch.prompt_token_lists() == [text[:1], prompt]
    assert batch.response_token_lists() == [text[1:6], [*answer, tok.eos_token_id]]


def test_eval_refuses_missing_checkpoints_and_nothing_to_measure(tmp_path, tiny_model_dir):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"eval.models={{base: {tiny_model_dir}, rlhf: {tmp_path / 'no'}}}"])
    with pytest.raises(FileNotFoundError, match="eval.models.rlhf: .*does not exist"):
        run_eval(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"eval.models={{base: {tiny_model_dir}}}",
                             f"scorers.criteria={{helpful: 'rm:{tmp_path / 'rm'}'}}"])
    with pytest.raises(FileNotFoundError, match="scorers.criteria.helpful: .*does not exist"):
        run_eval(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"eval.models={{base: {tiny_model_dir}}}", "data.task=",
                             "scorers.reward_functions=[a:b]", "data.prompts=p.jsonl"])
    with pytest.raises(ValueError, match="eval has nothing to measure"):
        run_eval(cfg)
    assert not (tmp_path / "eval.json").exists()


def test_alignment_tax_config_is_checked_by_key():
    cfg = load_config(None, ["data.task=arithmetic", "ppo.ptx_coef=0.5", "ppo.distill_coef=0.1", "eval.models={base: a, sft: b}",
                             "eval.compare_to=[sft]"])
    assert cfg.ppo.ptx_coef == 0.5 and cfg.ppo.distill_kl_estimator == "k2"
    with pytest.raises(ConfigError, match="ppo.ptx_data: ppo.ptx_coef > 0 needs text"):
        load_config(None, ["ppo.ptx_coef=0.5", "data.task=", "scorers.reward_functions=[a:b]",
                           "data.prompts=p.jsonl"])
    with pytest.raises(ConfigError, match="ppo.distill_coef: must be >= 0"):
        load_config(None, ["ppo.distill_coef=-1"])
    with pytest.raises(ConfigError, match="eval.compare_to: 'rlhf' is not one of eval.models"):
        load_config(None, ["eval.models={base: a}", "eval.compare_to=[rlhf]"])
    with pytest.raises(ConfigError, match="ppo.distill_kl_estimator"):
        load_config(None, ["ppo.distill_kl_estimator=k1"])


# --- one PPO run with both mitigations and criteria, then eval (real stack) -----------------------

CRITERIA = "{digits: 'rlhf_ray.tasks.rewards:digit_fraction', brevity: 'rlhf_ray.tasks.rewards:brevity'}"


@pytest.fixture(scope="module")
def aligned_run(ray_session, tmp_path_factory):
    from rlhf_ray.stages.ppo import PPOTrainer
    from rlhf_ray.tracking import read_metrics

    run_dir = tmp_path_factory.mktemp("align")
    cfg = load_config(None, [
        f"run_dir={run_dir}", "model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
        "rollout.num_engines=1", "rollout.max_new_tokens=8", "rollout.max_model_len=64", "data.max_prompt_tokens=32",
        "rollout.gpu_memory_utilization=0.05", f"scorers.criteria={CRITERIA}",
        "ppo.iterations=2", "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
        "ppo.prompts_per_iteration=8", "ppo.epochs=2", "ppo.minibatches=2", "policy.num_ranks=2",
        "policy.zero_stage=3", "policy.micro_batch_size=16", "policy.lr=3e-3", "checkpoint.save_final=false",
        "ppo.ptx_coef=1.0", "ppo.distill_coef=0.1",  # ptx data: the task's SFT demonstrations
        "ppo.is_correction=mis", "ppo.is_level=sequence"])  # sampler/learner mismatch masked per sequence
    trainer = PPOTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return read_metrics(run_dir)


@pytest.mark.slow
def test_ppo_logs_finite_positive_ptx_and_distill_losses_and_each_criterion(aligned_run):
    rows = aligned_run
    assert len(rows) == 2
    for row in rows:
        for key in ("ptx_loss", "distill_loss", "policy_loss", "reward_mean",
                    "reward/criterion/digits_mean", "reward/criterion/brevity_mean"):
            assert key in row and math.isfinite(row[key]), (key, row)
        assert row["ptx_loss"] > 0 and row["distill_loss"] > 0
        # Criteria combined by weight 1 each; the task's gold scorer is logged, unpaid.
        paid = row["reward/criterion/digits_mean"] + row["reward/criterion/brevity_mean"]
        assert row["reward_mean"] == pytest.approx(paid, abs=1e-5)
    # The LM loss on the demonstrations falls as PPO trains: the ptx term reaches the weights.
    assert rows[1]["ptx_loss"] < rows[0]["ptx_loss"] - 0.1, rows
    # The policy moves away from the reference, which the distillation term measures.
    assert rows[1]["distill_loss"] > rows[0]["distill_loss"]
    # MIS on every iteration: vLLM and the learner hold the same weights, so the mismatch is
    # numerical noise, far below the cap, and no sequence leaves the loss.
    for row in rows:
        assert 0 <= row["is/sampler_learner_kl"] < 1e-3 and row["is/affected_fraction"] == 0.0, row
