"""The DPO stage: sequence log-probs, the learner's loss on a tiny model, the config, the reference
cache, bad input, the pipeline's routing (all without Ray), and one short real run."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.formats import task_preferences
from rlhf_ray.engines import scoring

BETA = 0.1


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf_ray.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _pairs(tokenizer, n: int) -> tuple[RolloutBatch, RolloutBatch]:
    """The arithmetic task's first ``n`` preference pairs, encoded as the stage encodes them."""
    from rlhf_ray.stages.supervised import encode_side

    cfg, pairs = load_config(), task_preferences("arithmetic", n)
    return encode_side(cfg, tokenizer, pairs, "chosen"), encode_side(cfg, tokenizer, pairs, "rejected")


def test_sequence_logprobs_sum_each_rows_response_tokens(tiny_model_dir, tokenizer):
    """Against a plain loop: each row alone, unpadded, its response tokens' log-probs summed."""
    from rlhf_ray.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    chosen, _ = _pairs(tokenizer, 7)
    assert len(set(chosen.response_mask.sum(-1).tolist())) > 1  # ragged responses, padded
    expected = []
    with torch.no_grad():
        for prompt, response in zip(chosen.prompt_token_lists(), chosen.response_token_lists()):
            logits = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            expected.append(sum(logits[len(prompt) - 1 + t, token].item() for t, token in enumerate(response)))
    got = scoring.batched_sequence_logprobs(model, chosen, 3)  # sorted, trimmed, packed micro-batches
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(scoring.sequence_logprobs(model, chosen), got, atol=1e-5, rtol=1e-5)


def test_the_learners_dpo_loss_starts_at_log_2_and_its_steps_raise_the_margin(tiny_model_dir, tokenizer):
    """``dpo_pair_loss`` is what every learner rank minimises; here on the tiny model itself."""
    from rlhf_ray.actors.learner import dpo_pair_loss
    from rlhf_ray.models.loading import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir).eval()
    chosen, rejected = _pairs(tokenizer, 16)
    chosen, rejected = (b.with_extras(ref_logps=scoring.batched_sequence_logprobs(model, b, 8)) for b in (chosen, rejected))
    # The policy is its own reference: every implicit reward is 0.
    loss, stats = dpo_pair_loss(model, chosen, rejected, BETA, "sigmoid", 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats["dpo_accuracy"] == 0.0 and stats["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    ipo, _ = dpo_pair_loss(model, chosen, rejected, BETA, "ipo", 0.0)
    assert ipo.item() == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-4)  # IPO's target gap 1/(2 beta), missed by all of it

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(5):
        loss, stats = dpo_pair_loss(model, chosen, rejected, BETA, "sigmoid", 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, stats = dpo_pair_loss(model, chosen, rejected, BETA, "sigmoid", 0.0)
    assert loss.item() < math.log(2) - 0.05, stats
    assert stats["dpo_accuracy"] >= 0.9 and stats["dpo_margin"] > 0.3, stats
    assert stats["dpo_margin"] == pytest.approx(stats["dpo_chosen_reward"] - stats["dpo_rejected_reward"], abs=1e-5)


def test_every_rank_scores_an_equal_shard(tokenizer):
    """ZeRO-3 ranks must run as many forward passes: 7 rows over 4 ranks go as 8 (the last row
    repeated), and the answer is the 7 rows' in order."""
    from rlhf_ray.stages.dpo import sequence_logprobs

    class Ranks:  # WorkerGroup's contiguous shards; each rank answers its rows' token-id sums
        def __init__(self, n: int):
            self.n, self.shard_sizes = n, []

        def __len__(self) -> int:
            return self.n

        def gather(self, verb: str, batch: RolloutBatch) -> torch.Tensor:
            assert verb == "sequence_logprobs"
            shards = batch.chunk(self.n)
            self.shard_sizes.append([shard.size for shard in shards])
            return torch.cat([shard.sequences.sum(-1).float() for shard in shards])

    chosen, _ = _pairs(tokenizer, 7)
    ranks = Ranks(4)
    assert torch.equal(sequence_logprobs(ranks, chosen), chosen.sequences.sum(-1).float())
    assert ranks.shard_sizes == [[2, 2, 2, 2]]
    assert torch.equal(sequence_logprobs(Ranks(7), chosen), chosen.sequences.sum(-1).float())


@pytest.mark.parametrize("override,expected", [
    ("dpo.beta=0", "dpo.beta: must be > 0"),
    ("dpo.kind=kto", "dpo.kind must be one of sigmoid, ipo; got 'kto'"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing: must be in [0, 0.5)"),
    ("dpo.kind=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing: applies to dpo.kind=sigmoid only"),
    ("dpo.epochs=0", "dpo.epochs: must be >= 1"),
    ("dpo.lr=0", "dpo.lr: must be in (0, 1]"),
    ("dpo.batch_size=0", "dpo.batch_size: must be >= 1"),
    ("dpo.batch_size=3 policy.num_ranks=4", "dpo.batch_size: 3 pairs cannot split over policy.num_ranks=4"),
    ("dpo.bta=0.1", "unknown config key dpo.bta; did you mean dpo.beta?"),
    ("pipeline.method=grpo", "pipeline.method must be one of ppo, dpo; got 'grpo'"),
])
def test_bad_dpo_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert expected in str(e.value)


def test_reference_logps_are_reused_only_for_the_same_model_numerics_and_pairs(tmp_path, tokenizer):
    from rlhf_ray.stages.dpo import REF_CACHE, reference_fingerprint, reference_logps

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    chosen, rejected = _pairs(tokenizer, 6)
    pairs = {"train_chosen": chosen, "train_rejected": rejected}
    cfg = load_config()
    computed = []

    def compute(batch: RolloutBatch) -> torch.Tensor:
        computed.append(batch.size)
        return torch.randn(batch.size)

    fingerprint = reference_fingerprint(cfg, str(model), pairs)
    first = reference_logps(tmp_path / REF_CACHE, pairs, fingerprint, compute)
    assert computed == [6, 6] and (tmp_path / REF_CACHE).exists()
    again = reference_logps(tmp_path / REF_CACHE, pairs, reference_fingerprint(cfg, str(model), pairs), compute)
    assert computed == [6, 6]  # read back, not recomputed
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    other_pairs = {"train_chosen": rejected, "train_rejected": chosen}
    other_dtype = load_config(None, ["model.dtype=bfloat16"])
    assert len({fingerprint, reference_fingerprint(cfg, str(model), other_pairs),
                reference_fingerprint(other_dtype, str(model), pairs)}) == 3
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # retrained in place
    retrained = reference_fingerprint(cfg, str(model), pairs)
    assert retrained != fingerprint
    recomputed = reference_logps(tmp_path / REF_CACHE, pairs, retrained, compute)
    assert computed == [6, 6, 6, 6] and not torch.equal(recomputed["train_chosen"], first["train_chosen"])


@pytest.mark.parametrize("overrides,expected", [
    (["data.eval_fraction=0"],
     (r"^rlhf-ray: dpo: no held-out pairs \(data\.eval_fraction is 0 or the data is tiny\); preference accuracy "
      r"cannot be measured$")),
    (["data.preferences={tmp}/missing.jsonl"], r"^rlhf-ray: data file .*/missing\.jsonl does not exist$"),
    (["data.task=", "scorers.reward_functions=[m:f]"],
     r"^rlhf-ray: dpo: no preference pairs: give data\.preferences \(or data\.task for the built-in task's pairs\)$"),
    (["dpo.beta=-1"], r"^rlhf-ray: invalid config \(defaults\):\n  dpo\.beta: must be > 0$"),
])
def test_bad_input_stops_rlhf_ray_dpo_before_ray_starts(overrides, expected, tmp_path, capsys, monkeypatch):
    from rlhf_ray.stages import dpo

    def tripwire(*args, **kwargs):
        raise AssertionError("bad input was not caught before Ray or the learners started")

    monkeypatch.setattr(dpo, "begin", tripwire)
    argv = ["dpo", f"run_dir={tmp_path / 'run'}", "model.tiny_hidden_size=32", "model.tiny_layers=1", "data.task=arithmetic",
            *(o.format(tmp=tmp_path) for o in overrides)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("rlhf-ray: ") == 1 and "Traceback" not in err, err
    assert re.search(expected, err[err.index("rlhf-ray: "):].strip()), err


@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_pipeline_method_picks_the_preference_stage_and_the_eval_compares_its_model(method, tmp_path, monkeypatch):
    """Stages replaced by recorders: which ones run, on which model, and what the eval compares."""
    from rlhf_ray.stages import common, dpo, eval, pipeline, ppo, rm, sft

    calls = []

    def stage(name, result):
        def run(cfg):
            calls.append((name, cfg.model.policy, list(cfg.model.reward), cfg.run_dir))
            return result(cfg) if callable(result) else result
        return run

    monkeypatch.setattr(common, "init_ray", lambda cfg: None)  # no Ray
    monkeypatch.setattr(sft, "run_sft", stage("sft", {"model": "SFT"}))
    monkeypatch.setattr(dpo, "run_dpo", stage("dpo", lambda cfg: {"model": f"{cfg.run_dir}/policy"}))
    monkeypatch.setattr(rm, "run_rm", stage("rm", {"models": ["RM"], "held_out_accuracy": 0.9}))
    monkeypatch.setattr(ppo, "run_ppo", stage("ppo", [{"reward_mean": 0.1, "kl_to_ref": 0.0},
                                                      {"reward_mean": 0.5, "kl_to_ref": 0.2}]))
    monkeypatch.setattr(eval, "eval_data", lambda cfg, tokenizer: (["1+1="], []))

    def compare(cfg, models, run_dir, prompts, references):
        calls.append(("eval", models, list(cfg.model.reward)))
        return {"models": {name: {"gold_score": 0.5} for name in models}}

    monkeypatch.setattr(eval, "compare_checkpoints", compare)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"pipeline.method={method}", "data.task=arithmetic", "model.tiny_hidden_size=32",
                             "model.tiny_layers=1"])
    summary = pipeline.run_pipeline(cfg)

    base = str(tmp_path / "base_model")
    if method == "dpo":
        assert calls == [("sft", base, [], str(tmp_path / "sft")),
                         ("dpo", "SFT", [], str(tmp_path / "dpo")),  # DPO's reference: the SFT model
                         ("eval", {"base": base, "sft": "SFT", "dpo": f"{tmp_path / 'dpo'}/policy"}, [])]
        assert set(summary) == {"sft", "dpo", "held_out_gold_score", "eval"}
    else:
        assert [c[0] for c in calls] == ["sft", "rm", "ppo", "eval"]
        assert calls[2][1:3] == ("SFT", ["RM"])
        assert calls[3] == ("eval", {"base": base, "sft": "SFT", "ppo": str(tmp_path / "ppo" / "policy")}, ["RM"])
        assert summary["ppo"]["reward_last"] == 0.5 and summary["rm_held_out_accuracy"] == 0.9
    assert set(summary["held_out_gold_score"]) == {"base", "sft", method}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


# --- one short real run (Ray, two DeepSpeed ranks) ------------------------------------------------

@pytest.mark.slow
def test_dpo_raises_held_out_reward_accuracy_and_margin_and_saves_a_loadable_policy(ray_session, tiny_model_dir,
                                                                                     tmp_path):
    """From the random tiny model (the arithmetic task's near misses are learnable by format and
    digits alone), on one ZeRO-2 rank (the equal shards of several ranks are tested without Ray)."""
    from safetensors.torch import load_file

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ray.stages.dpo import REF_CACHE, run_dpo
    from rlhf_ray.stages.supervised import encode_side, load_preference_data
    from rlhf_ray.tracking import read_metrics

    cfg = load_config(None, [
        f"run_dir={tmp_path}", f"model.policy={tiny_model_dir}", "data.task=arithmetic", "data.num_preference_pairs=640",
        "data.eval_fraction=0.25", "dpo.epochs=3", "dpo.lr=1e-3", "dpo.batch_size=32", f"dpo.beta={BETA}", "policy.num_ranks=1",
        "policy.micro_batch_size=16", "logging.trackers=[]"])
    summary = run_dpo(cfg)

    before, after = summary["held_out_before"], summary["held_out"]
    # Before the first step the policy is the reference: the same numbers, so no reward at all.
    assert before["eval_dpo_margin"] == 0.0 and before["eval_dpo_accuracy"] == 0.0, before
    assert after["eval_dpo_accuracy"] > 0.55 and after["eval_dpo_margin"] > 0.05, after
    assert after["eval_dpo_loss"] < math.log(2) - 0.01, after
    assert summary["train_pairs"] == 480 and summary["held_out_pairs"] == 160 and summary["steps"] == 45
    steps = [r for r in read_metrics(tmp_path) if "dpo_loss" in r]
    assert len(steps) == 45 and steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(k in steps[-1] for k in ("dpo_accuracy", "dpo_margin", "dpo_chosen_reward", "dpo_rejected_reward"))
    assert (tmp_path / "metrics.png").exists() and json.loads((tmp_path / "summary.json").read_text()) == summary

    # The saved policy is the trained one: reloaded, it prefers the held-out chosen answers over the
    # cached reference as the run measured at its end.
    ref = load_file(str(tmp_path / REF_CACHE))
    assert set(ref) == {"train_chosen", "train_rejected", "held_out_chosen", "held_out_rejected"}
    policy, tokenizer = load_causal_lm(summary["model"]).eval(), load_tokenizer(summary["model"])
    _, held_out = load_preference_data(cfg, tokenizer, "dpo")
    logps = {side: scoring.batched_sequence_logprobs(policy, encode_side(cfg, tokenizer, held_out, side), 32)
             for side in ("chosen", "rejected")}
    margin = BETA * ((logps["chosen"] - ref["held_out_chosen"]) - (logps["rejected"] - ref["held_out_rejected"]))
    assert margin.mean().item() == pytest.approx(after["eval_dpo_margin"], abs=1e-3)
