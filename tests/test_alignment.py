"""The alignment tax: its mitigations in PPO (pretraining-mix loss, KL-to-reference distillation)
and ``rlhf-ray eval`` measuring it (gold score, perplexity, reward; % change vs base and SFT).

The slow tests share one short PPO run with both mitigations and multi-criteria rewards on, then
one eval of its policy against the untrained base, on the real stack."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.formats import DataError, load_texts
from rlhf_ray.stages.eval import changes, format_table, percent_change

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


def test_load_texts_reads_lines_text_rows_and_sft_rows(tmp_path):
    txt = tmp_path / "ref.txt"
    txt.write_text("first line\n\n  \nsecond line\n")
    assert load_texts(str(txt))[0] == ["first line", "second line"]
    rows = tmp_path / "ref.jsonl"
    rows.write_text('{"text": "plain"}\n{"prompt": "1+2=", "response": "3"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert load_texts(str(rows))[0] == ["plain", "1+2=3", "User: hi\nAssistant: yo"]
    rows.write_text('{"text": "plain"}\n{"text": 7}\n')
    with pytest.raises(DataError, match=r"ref.jsonl row 2, field 'text': wrong type"):
        load_texts(str(rows))
    assert load_texts(str(rows), on_bad_row="skip")[0] == ["plain"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(str(tmp_path / "missing.txt"))


def test_encode_texts_predicts_every_token_after_the_first(tiny_model_dir):
    from rlhf_ray.data.tokenize import encode_texts
    from rlhf_ray.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    batch = encode_texts(tok, ["12+3=15", "7"], max_seq_len=6)
    ids = tok(["12+3=15", "7"], add_special_tokens=True)["input_ids"]
    assert batch.prompt_token_lists() == [ids[0][:1], ids[1][:1]]
    assert batch.response_token_lists() == [ids[0][1:6], [*ids[1][1:], tok.eos_token_id]]
    assert batch.response_mask.sum().item() == 5 + len(ids[1])


def test_alignment_tax_config_is_checked_by_key():
    cfg = load_config(None, ["ppo.ptx_coef=0.5", "ppo.distill_coef=0.1", "eval.models={base: a, sft: b}",
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
COMMON = ["model.policy=builtin:tiny", "model.tiny_hidden_size=64", "data.task=arithmetic",
          "data.num_eval_prompts=16", "rollout.num_engines=1", "rollout.max_new_tokens=8",
          "rollout.max_model_len=64", "rollout.gpu_memory_utilization=0.05", f"scorers.criteria={CRITERIA}"]


@pytest.fixture(scope="module")
def aligned_run(ray_session, tmp_path_factory):
    from rlhf_ray.models.heads import RewardModel
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.eval import run_eval
    from rlhf_ray.stages.ppo import PPOTrainer
    from rlhf_ray.tracking import read_metrics

    root = tmp_path_factory.mktemp("align")
    cfg = load_config(None, [
        f"run_dir={root / 'ppo'}", *COMMON, "ppo.iterations=2", "ppo.advantage_estimator=grpo",
        "rollout.samples_per_prompt=4", "ppo.prompts_per_iteration=8", "ppo.epochs=2", "ppo.minibatches=2",
        "policy.num_ranks=2", "policy.micro_batch_size=16", "policy.lr=3e-3",
        "ppo.ptx_coef=1.0", "ppo.distill_coef=0.1"])  # ptx_data: the task's SFT demonstrations
    trainer = PPOTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    base = trainer.policy_path
    # An untrained reward model is still a reward model: eval must score with it.
    rm_dir = root / "rm"
    RewardModel.from_base(base).save_pretrained(rm_dir, tokenizer=load_tokenizer(base))
    eval_cfg = load_config(None, [
        f"run_dir={root / 'eval'}", *COMMON, f"model.reward=[{rm_dir}]", "eval.max_new_tokens=4",
        "eval.max_reference_texts=64",
        f"eval.models={{base: {base}, sft: {base}, rlhf: {root / 'ppo' / 'policy'}}}"])
    report = run_eval(eval_cfg)
    return read_metrics(root / "ppo"), report, root


@pytest.mark.slow
def test_ppo_logs_finite_positive_ptx_and_distill_losses_and_each_criterion(aligned_run):
    rows, _, _ = aligned_run
    assert len(rows) == 2
    for row in rows:
        for key in ("ptx_loss", "distill_loss", "policy_loss", "reward_mean",
                    "reward/criterion/digits_mean", "reward/criterion/brevity_mean"):
            assert key in row and math.isfinite(row[key]), (key, row)
        assert row["ptx_loss"] > 0 and row["distill_loss"] > 0
    # The LM loss on the demonstrations falls as PPO trains: the ptx term reaches the weights.
    assert rows[1]["ptx_loss"] < rows[0]["ptx_loss"] - 0.1, rows
    # The policy moved away from the reference, which the distillation term measures.
    assert rows[1]["distill_loss"] > rows[0]["distill_loss"]


@pytest.mark.slow
def test_eval_compares_models_with_percent_changes_and_ptx_lowers_perplexity(aligned_run):
    _, report, root = aligned_run
    assert json.loads((root / "eval" / "eval.json").read_text()) == report
    assert report["compare_to"] == ["base", "sft"] and report["reference_texts"] == 64
    models = report["models"]
    assert list(models) == ["base", "sft", "rlhf"]
    for name, row in models.items():
        assert set(row) == {"checkpoint", "gold_score", "perplexity", "reward", "change_pct"}, name
        assert set(row["change_pct"]) == {"vs_base", "vs_sft"}
        assert 0.0 <= row["gold_score"] <= 1.0 and math.isfinite(row["reward"])
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
    assert models["base"]["change_pct"]["vs_base"]["perplexity"] == 0.0
    assert models["sft"]["perplexity"] == models["base"]["perplexity"]  # the same checkpoint
    # PPO with the pretraining mix on the task's demonstrations: held-out demonstrations get far
    # more likely than under the untrained base (whose perplexity is near the vocabulary size).
    assert models["rlhf"]["perplexity"] < 0.7 * models["base"]["perplexity"], models
    assert models["rlhf"]["change_pct"]["vs_base"]["perplexity"] < -30.0
