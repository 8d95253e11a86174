"""The PPO driver's safeguards as configured (rlhf_ray.stages.guards): each ``safeguards.*`` key
changes what it should, against numbers worked out in the test."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.stages.guards import RolloutGuards

PROMPTS = ["a", "a", "b", "b"]
RESPONSES = ["one two three", "one two three", "four five six seven", "eight nine ten"]


def guards(*overrides) -> RolloutGuards:
    return RolloutGuards(load_config(None, list(overrides)).safeguards)


def test_by_default_scores_pass_through_unchanged():
    scores = torch.tensor([1.0, 0.5, -0.5, 2.0])
    assert torch.equal(guards().regularise(scores, PROMPTS, RESPONSES, torch.tensor([3, 3, 4, 3])), scores)


def test_length_penalty_charges_each_token_over_the_threshold():
    g = guards("safeguards.length_penalty_threshold=3", "safeguards.length_penalty_coef=0.25")
    out = g.regularise(torch.zeros(4), PROMPTS, RESPONSES, torch.tensor([2, 3, 5, 7]))
    assert out.tolist() == [0.0, 0.0, -0.5, -1.0]


def test_repetition_penalty_charges_repeated_ngrams():
    g = guards("safeguards.repetition_penalty_coef=1.0", "safeguards.repetition_ngram=1")
    responses = ["x x x x", "a b c d", "a b c d", "y y z z"]
    out = g.regularise(torch.zeros(4), PROMPTS, responses, torch.tensor([4, 4, 4, 4]))
    # Share of repeated unigrams: 3 of 4, none, none, 2 of 4.
    assert out.tolist() == pytest.approx([-0.75, 0.0, 0.0, -0.5])


def test_diversity_bonus_pays_responses_unlike_their_group():
    g = guards("safeguards.diversity_bonus=1.0")
    out = g.regularise(torch.zeros(4), PROMPTS, RESPONSES, torch.tensor([3, 3, 4, 3]))
    # Prompt "a": two identical answers earn nothing; prompt "b": two disjoint answers earn the bonus.
    assert out.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_inspect_flags_collapse_and_counts_keyword_stuffing():
    g = guards("safeguards.collapse_min_distinct_1=0.9", "safeguards.hacking_phrases=[\"one two\"]")
    m = g.inspect(PROMPTS, RESPONSES, torch.tensor([3, 3, 4, 3]), torch.zeros(4), None)
    assert m["flag/mode_collapse"] == 1.0  # distinct-1 is 10 of 13 words, under 0.9
    assert m["hacking/keyword_stuffing_rate"] == 0.0  # the phrase occurs, but once per response
    stuffed = ["one two one two", "one two", "x", "y"]
    m = g.inspect(PROMPTS, stuffed, torch.tensor([4, 2, 1, 1]), torch.zeros(4), None)
    assert m["hacking/keyword_stuffing_rate"] == 0.25
    assert "gold_score_mean" not in m
    relaxed = guards("safeguards.collapse_max_pairwise_similarity=1.0")
    assert relaxed.inspect(PROMPTS, RESPONSES, torch.tensor([3, 3, 4, 3]), torch.zeros(4), None)["flag/mode_collapse"] == 0.0


def test_early_stop_on_kl_above_the_bound():
    assert guards().stop_reason({"kl_to_ref": 50.0}) is None  # max_kl 0: never
    g = guards("safeguards.max_kl=2.5")
    assert g.stop_reason({"kl_to_ref": 2.0}) is None
    assert g.stop_reason({"kl_to_ref": float("nan")}) is None
    assert g.stop_reason({"kl_to_ref": 3.0}) == "KL to the reference 3.000 exceeds safeguards.max_kl=2.5"


def test_early_stop_when_the_proxy_rises_and_gold_does_not():
    g = guards("safeguards.stop_on_overoptimisation=true", "safeguards.overopt_window=3",
               "safeguards.overopt_min_proxy_gain=0.2", "safeguards.overopt_max_gold_gain=0.0")
    lengths, gold = torch.tensor([3, 3, 4, 3]), torch.full((4,), 0.5)
    records = [g.inspect(PROMPTS, RESPONSES, lengths, torch.full((4,), proxy), gold) for proxy in (0.0, 0.1, 0.3)]
    assert [r["flag/over_optimisation"] for r in records] == [0.0, 0.0, 1.0]
    assert g.stop_reason(records[1]) is None
    assert g.stop_reason(records[2]).startswith("over-optimisation: proxy reward rose by 0.300")
    # The monitor's window survives a checkpoint.
    restored = guards("safeguards.stop_on_overoptimisation=true", "safeguards.overopt_window=3")
    restored.load_state_dict(g.state_dict())
    assert restored.overopt.gains == g.overopt.gains
    # Not asked to stop: the flag is still measured, the run goes on.
    watch = guards("safeguards.overopt_window=3", "safeguards.overopt_min_proxy_gain=0.2")
    flags = [watch.inspect(PROMPTS, RESPONSES, lengths, torch.full((4,), p), gold) for p in (0.0, 0.1, 0.3)]
    assert flags[-1]["flag/over_optimisation"] == 1.0 and watch.stop_reason(flags[-1]) is None
