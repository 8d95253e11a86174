"""SFT, reward model and the whole pipeline on tiny data, with the real stack."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.tracking import read_metrics

pytestmark = pytest.mark.slow

REDUCED = [
    "data.task=arithmetic", "model.tiny_hidden_size=64", "data.num_sft_examples=640", "data.num_preference_pairs=1280",
    "data.num_eval_prompts=16", "sft.epochs=3", "sft.lr=3e-3", "sft.batch_size=32", "rm.epochs=3", "rm.lr=1e-3",
    "rm.batch_size=32",
    "policy.num_ranks=1", "critic.num_ranks=1", "policy.micro_batch_size=16", "critic.micro_batch_size=16",
    "rollout.num_engines=1", "rollout.max_new_tokens=4", "rollout.max_model_len=64", "data.max_prompt_tokens=32",
    "rollout.gpu_memory_utilization=0.05", "ppo.iterations=2", "ppo.prompts_per_iteration=8",
    "eval.max_new_tokens=4", "eval.samples=2",
]


@pytest.fixture(scope="module")
def pipeline_run(ray_session, tmp_path_factory):
    from rlhf_ray.stages.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, [f"run_dir={root}", *REDUCED])
    return root, run_pipeline(cfg)


def test_every_stage_writes_checkpoint_summary_and_metrics(pipeline_run):
    root, summary = pipeline_run
    for stage in ("sft", "rm", "ppo"):
        assert (root / stage / "metrics.jsonl").exists(), stage
        assert (root / stage / "config.yaml").exists(), stage
    assert json.loads((root / "sft" / "summary.json").read_text())["stage"] == "sft"
    assert json.loads((root / "rm" / "summary.json").read_text())["stage"] == "rm"
    assert json.loads((root / "summary.json").read_text()) == summary
    assert set(summary["held_out_gold_score"]) == {"base", "sft", "ppo"}
    assert all(0.0 <= v <= 1.0 for v in summary["held_out_gold_score"].values())


def test_eval_at_the_end_measures_the_alignment_tax(pipeline_run):
    root, summary = pipeline_run
    report = json.loads((root / "eval.json").read_text())
    assert report == summary["eval"]
    assert report["compare_to"] == ["base", "sft"] and report["reference_texts"] == 64  # held-out demos
    models = report["models"]
    assert list(models) == ["base", "sft", "ppo"]
    for name, row in models.items():
        assert set(row) == {"checkpoint", "gold_score", "gold_score_sampled", "gold_score_pass@2", "perplexity",
                            "reward", "change_pct"}, name
        # eval.samples=2: the mean of two samples per prompt, and the share of prompts one of them got right
        assert 0 <= row["gold_score_sampled"] <= row["gold_score_pass@2"] <= 1
        assert set(row["change_pct"]) == {"vs_base", "vs_sft"}
        assert math.isfinite(row["perplexity"]) and row["perplexity"] >= 1.0 and math.isfinite(row["reward"])
    assert models["base"]["change_pct"]["vs_base"]["perplexity"] == 0.0
    # SFT trained on the demonstrations: held-out ones are far more likely than under the untrained
    # base, whose perplexity is near the vocabulary size.
    assert models["sft"]["perplexity"] < 0.5 * models["base"]["perplexity"], models
    assert models["sft"]["change_pct"]["vs_base"]["perplexity"] < -50.0


def test_sft_lowers_held_out_loss_and_its_checkpoint_loads(pipeline_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, summary = pipeline_run
    sft = summary["sft"]
    assert sft["held_out_loss"] < sft["held_out_loss_before"] - 0.5, sft
    model_dir = root / "sft" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("3+4=", return_tensors="pt")["input_ids"]
    logits = model(prompt).logits[0, -1]
    # After SFT on addition, the next token after "=" is a digit, not an arbitrary character.
    assert tok.decode([int(logits.argmax())]).isdigit()


def test_reward_model_separates_pairs_and_is_calibrated(pipeline_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.models.heads import RewardModel

    root, summary = pipeline_run
    rm = summary["rm"]
    # Mostly near misses (off by one to three): well above chance after a few seconds of training.
    assert rm["held_out_accuracy"] > 0.65, rm
    member = rm["members"][0]
    assert member["held_out_accuracy"] >= member["accuracy_before"]
    path = root / "rm" / "reward_model-0"
    norm = json.loads((path / "reward_norm.json").read_text())
    assert norm["std"] > 0
    model = RewardModel.from_pretrained(path).eval()
    # Saved in transformers' own format: plain AutoModelForSequenceClassification gives its scores.
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["3+4=7", "3+4=8"], return_tensors="pt")  # same length: no padding
    with torch.no_grad():
        plain = AutoModelForSequenceClassification.from_pretrained(path).eval()(**ids).logits[:, 0]
        torch.testing.assert_close(plain, model(ids["input_ids"], ids["attention_mask"]), rtol=0, atol=1e-5)
    rows = read_metrics(root / "rm")
    assert any("eval_accuracy" in r for r in rows) and any("rm_loss" in r for r in rows)


def test_ppo_stage_pays_the_reward_model_and_logs_gold(pipeline_run):
    root, _ = pipeline_run
    rows = read_metrics(root / "ppo")
    assert len(rows) == 2
    assert "reward/rm0_mean" in rows[0] and "reward/gold_reward_mean" in rows[0]
    assert (root / "ppo" / "policy" / "model.safetensors").exists()


def test_collect_judges_pairs_that_rm_can_read(pipeline_run, tmp_path):
    from rlhf_ray.data.formats import load_preferences
    from rlhf_ray.stages.collect import run_collect
    from rlhf_ray.tasks.arithmetic import ArithmeticTask

    root, _ = pipeline_run
    cfg = load_config(None, [f"run_dir={tmp_path}", f"model.policy={root / 'sft' / 'model'}", *REDUCED,
                             "collect.num_prompts=24", "collect.responses_per_prompt=4", "collect.judge=gold"])
    summary = run_collect(cfg)
    assert summary["pairs"] + summary["ties_left_out"] == 24
    rows = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["responses"]) == 4 and len(r["scores"]) == 4 for r in rows)
    pairs, report = load_preferences(str(tmp_path / "preferences.jsonl"))
    assert len(pairs) == summary["pairs"] and report.n_skipped == 0
    for pair in pairs:
        assert ArithmeticTask.gold_score(pair.prompt, pair.chosen) > ArithmeticTask.gold_score(pair.prompt, pair.rejected)
