"""Safeguards: detectors, diversity metrics and regularisers on batches worked out by hand."""

import json
import math

import pytest
import torch

from rlhf_ray.safeguards import (
    CollapseThresholds,
    OverOptimisationMonitor,
    collapse_flag,
    distinct_n,
    diversity_bonus,
    diversity_metrics,
    format_gaming_rate,
    group_by_prompt,
    keyword_stuffing_rate,
    length_penalty,
    lexical_diversity,
    mean_pairwise_similarity,
    mean_phrase_count,
    ngram_diversity,
    repeated_ngram_share,
    repetition_penalty,
    verbosity_correlation,
)

# --- reward hacking ---------------------------------------------------------------------------


def test_verbosity_correlation_known_values():
    assert verbosity_correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert verbosity_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # xc = (-1.5, -.5, .5, 1.5), yc = (-1.5, .5, -.5, 1.5): sum xc*yc = 4, sum xc^2 = sum yc^2 = 5
    assert verbosity_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert verbosity_correlation(torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == (
        pytest.approx(0.8)
    )


def test_verbosity_correlation_undefined_is_zero():
    assert verbosity_correlation([7, 7, 7], [0.1, 0.5, 0.9]) == 0.0  # constant lengths
    assert verbosity_correlation([1, 2, 3], [0.1, 0.1, 0.1]) == 0.0  # constant rewards
    assert verbosity_correlation([4], [1.0]) == 0.0
    assert verbosity_correlation([], []) == 0.0
    with pytest.raises(ValueError):
        verbosity_correlation([1, 2], [1.0, 2.0, 3.0])


PHRASES = ["happy to help", "Let me help"]
STUFFING = [
    "Happy to help! happy to help.",  # one phrase twice: stuffed; 2 occurrences
    "happy to help",  # 1 occurrence
    "Let me help. Happy to help.",  # two phrases once each: not stuffed; 2 occurrences
]


def test_keyword_stuffing_rate():
    assert keyword_stuffing_rate(STUFFING, PHRASES, min_count=2) == pytest.approx(1 / 3)
    assert keyword_stuffing_rate(STUFFING, PHRASES, min_count=1) == 1.0
    assert keyword_stuffing_rate([], PHRASES) == 0.0
    assert keyword_stuffing_rate(STUFFING, []) == 0.0
    with pytest.raises(ValueError):
        keyword_stuffing_rate(STUFFING, ["ok", ""])


def test_mean_phrase_count():
    assert mean_phrase_count(STUFFING, PHRASES) == pytest.approx((2 + 1 + 2) / 3)
    assert mean_phrase_count(["", "nothing here"], PHRASES) == 0.0
    assert mean_phrase_count([], PHRASES) == 0.0


def test_format_gaming_rate():
    responses = [
        "- a\n- b",  # 2 items
        "Steps:\n1. x\n  2) y",  # 2 items, the second indented
        "• one",  # 1 item
        "-5 is negative",  # no space after the marker: not an item
        "1.5 apples",
        "**bold** claim",
        "- ",  # marker without text
        "plain text",
    ]
    assert format_gaming_rate(responses) == pytest.approx(3 / 8)
    assert format_gaming_rate(responses, min_items=2) == pytest.approx(2 / 8)
    assert format_gaming_rate([]) == 0.0
    assert format_gaming_rate([""]) == 0.0


def feed(monitor, proxy, gold):
    return [monitor.update(p, g) for p, g in zip(proxy, gold)]


def test_monitor_flags_proxy_up_gold_down():
    monitor = OverOptimisationMonitor(window=5, min_proxy_gain=0.1, max_gold_gain=0.0)
    flags = feed(monitor, [0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.45, 0.4, 0.35, 0.3])
    assert flags == [False, False, False, False, True]  # nothing until the window is full
    assert monitor.gains == pytest.approx((0.4, -0.2))


def test_monitor_quiet_when_both_rise_or_proxy_flat():
    rising = OverOptimisationMonitor(window=5)
    assert not any(feed(rising, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.55, 0.6, 0.65, 0.7, 0.75]))
    flat_proxy = OverOptimisationMonitor(window=5)
    assert not any(feed(flat_proxy, [1.0] * 5, [0.5, 0.4, 0.3, 0.2, 0.1]))


def test_monitor_uses_least_squares_not_endpoints():
    monitor = OverOptimisationMonitor(window=5, min_proxy_gain=0.1)
    # x - 2 = (-2, -1, 0, 1, 2): slope = (-0.2 + 0.3) / 10 = 0.01, gain 4 * 0.01 = 0.04 < 0.1,
    # although the proxy spans 0.3 inside the window.
    assert feed(monitor, [0.0, 0.2, 0.1, 0.3, 0.0], [0.5] * 5)[-1] is False
    assert monitor.gains == pytest.approx((0.04, 0.0))


def test_monitor_window_slides():
    monitor = OverOptimisationMonitor(window=3, min_proxy_gain=0.1)
    assert feed(monitor, [0.0, 0.1, 0.2, 0.3], [0.5, 0.4, 0.3, 0.9]) == [False, False, True, False]


def test_monitor_state_dict_round_trip():
    proxy, gold = [0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.45, 0.4, 0.35, 0.3]
    first = OverOptimisationMonitor(window=5)
    feed(first, proxy[:4], gold[:4])
    resumed = OverOptimisationMonitor(window=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    assert resumed.update(proxy[4], gold[4]) is first.update(proxy[4], gold[4]) is True
    assert resumed.gains == first.gains

    smaller = OverOptimisationMonitor(window=3)
    smaller.load_state_dict(first.state_dict())
    assert smaller.state_dict() == {"proxy": proxy[2:], "gold": gold[2:]}


def test_monitor_rejects_bad_input():
    with pytest.raises(ValueError):
        OverOptimisationMonitor(window=1)
    with pytest.raises(ValueError):
        OverOptimisationMonitor().load_state_dict({"proxy": [1.0], "gold": []})


# --- mode collapse ----------------------------------------------------------------------------


def test_distinct_n_words():
    assert distinct_n(["a a", "a b"], 1) == 2 / 4
    assert distinct_n(["a a", "a b"], 2) == 2 / 2  # (a, a), (a, b): bigrams stay inside a response
    assert math.isnan(distinct_n(["a a", "a b"], 3))  # no trigram at all
    assert distinct_n(["x y z", "x y z"], 3) == 1 / 2


def test_distinct_n_chars():
    # chars 1 9 9 1 1 9 -> 2 types / 6; bigrams 19, 91, 19 -> 2 / 3
    assert distinct_n(["19", "91", "19"], 1, unit="char") == 2 / 6
    assert distinct_n(["19", "91", "19"], 2, unit="char") == 2 / 3
    assert distinct_n([" 7 ", "7"], 1, unit="char") == 1 / 2  # surrounding whitespace dropped


def test_distinct_n_edge_cases():
    assert math.isnan(distinct_n([], 1))
    assert math.isnan(distinct_n(["", "   "], 1))
    assert distinct_n(["only"], 1) == 1.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)
    with pytest.raises(ValueError):
        distinct_n(["a"], 1, unit="byte")


def test_ngram_diversity_is_product_of_defined_orders():
    # distinct-1 = 4/6 (a b c a b d), distinct-2 = 3/4 (ab bc ab bd), distinct-3 = 2/2
    assert ngram_diversity(["a b c", "a b d"]) == pytest.approx(4 / 6 * 3 / 4 * 1)
    assert ngram_diversity(["a a", "a b"], max_n=3) == pytest.approx(0.5 * 1.0)  # no trigram: skipped
    assert math.isnan(ngram_diversity([""]))


def test_lexical_diversity_is_type_token_ratio():
    assert lexical_diversity(["the cat", "the dog"]) == 3 / 4
    assert lexical_diversity(["19", "91"], unit="char") == 2 / 4


def test_mean_pairwise_similarity():
    # difflib ratio = 2 * matched units / total units
    assert mean_pairwise_similarity([["19", "19"]], unit="char") == 1.0
    assert mean_pairwise_similarity([["19", "91"]], unit="char") == 0.5
    assert mean_pairwise_similarity([["the cat sat", "the cat ran"]]) == pytest.approx(4 / 6)
    assert mean_pairwise_similarity([["ab", "ab", "cd"]], unit="char") == pytest.approx(1 / 3)
    # groups weigh equally whatever their size; the single-response group is skipped
    assert mean_pairwise_similarity([["a", "a"], ["a", "b", "c"], ["z"]]) == pytest.approx(0.5)


def test_mean_pairwise_similarity_undefined():
    assert math.isnan(mean_pairwise_similarity([]))
    assert math.isnan(mean_pairwise_similarity([["x"], []]))


def test_group_by_prompt():
    assert group_by_prompt(["p", "q", "p"], ["a", "b", "c"]) == [["a", "c"], ["b"]]
    with pytest.raises(ValueError):
        group_by_prompt(["p"], ["a", "b"])


def test_diversity_bonus():
    responses, prompts = ["ab", "ab", "cd", "z"], ["p", "p", "p", "q"]
    bonus = diversity_bonus(responses, prompts, weight=0.5, unit="char")
    # "ab": similarities to the others (1, 0) -> mean 0.5 -> 0.5 * 0.5; "cd": (0, 0) -> 0.5 * 1;
    # "z" is alone with its prompt -> 0
    assert bonus == pytest.approx([0.25, 0.25, 0.5, 0.0])
    # a group's mean bonus is weight * (1 - its mean pairwise similarity)
    group_sim = mean_pairwise_similarity([responses[:3]], unit="char")
    assert sum(bonus[:3]) / 3 == pytest.approx(0.5 * (1 - group_sim))
    # interleaved prompts: the bonus stays aligned with the responses
    assert diversity_bonus(["1", "2", "3"], ["p", "q", "p"], weight=1.0, unit="char") == [1.0, 0.0, 1.0]
    assert diversity_bonus([], [], weight=1.0) == []
    with pytest.raises(ValueError):
        diversity_bonus(["a"], [], weight=1.0)


def test_diversity_metrics_and_collapse_flag():
    collapsed = ["the same answer"] * 4
    metrics = diversity_metrics(collapsed, [collapsed])
    assert set(metrics) == {"distinct_1", "distinct_2", "distinct_3", "ngram_diversity",
                            "lexical_diversity", "pairwise_similarity"}
    assert metrics["distinct_1"] == metrics["lexical_diversity"] == 3 / 12
    assert metrics["distinct_2"] == 2 / 8
    assert metrics["distinct_3"] == 1 / 4
    assert metrics["ngram_diversity"] == pytest.approx(3 / 12 * 2 / 8 * 1 / 4)
    assert metrics["pairwise_similarity"] == 1.0
    assert collapse_flag(metrics)

    varied = ["one two three", "four five six"]
    assert not collapse_flag(diversity_metrics(varied, [varied]))


def test_collapse_flag_thresholds():
    t = CollapseThresholds(min_distinct_1=0.3, max_pairwise_similarity=0.9)
    assert collapse_flag({"distinct_1": 0.2, "pairwise_similarity": 0.5}, t)
    assert collapse_flag({"distinct_1": 0.5, "pairwise_similarity": 0.95}, t)
    assert not collapse_flag({"distinct_1": 0.5, "pairwise_similarity": 0.5}, t)
    assert not collapse_flag({"distinct_1": 0.5, "pairwise_similarity": math.nan}, t)  # no groups
    assert not collapse_flag({"distinct_1": 0.1, "pairwise_similarity": 0.5}, CollapseThresholds(None, 0.9))
    assert not collapse_flag({"distinct_1": 0.5, "pairwise_similarity": 1.0}, CollapseThresholds(0.3, None))


# --- regularisers -----------------------------------------------------------------------------


def test_length_penalty_lists():
    out = length_penalty([1.0, 1.0, 1.0], [5, 10, 15], threshold=10, coef=0.01)
    assert out == [1.0, 1.0, 1.0 - 0.01 * 5]  # only the 5 units past the threshold cost
    assert length_penalty([], [], threshold=10, coef=0.01) == []


def test_length_penalty_tensor_keeps_type_and_input():
    scores = torch.tensor([2.0, 0.0])
    out = length_penalty(scores, torch.tensor([3, 1]), threshold=1, coef=0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([1.0, 0.0]))
    assert torch.equal(scores, torch.tensor([2.0, 0.0]))


def test_length_penalty_rejects_bad_input():
    with pytest.raises(ValueError):
        length_penalty([1.0], [20], threshold=10, coef=-0.1)
    with pytest.raises(ValueError):
        length_penalty([1.0, 2.0], [20], threshold=10, coef=0.1)


def test_repeated_ngram_share():
    assert repeated_ngram_share("a b a b a b", n=2) == pytest.approx(1 - 2 / 5)  # ab ba ab ba ab
    assert repeated_ngram_share("a b a b a b", n=1) == pytest.approx(1 - 2 / 6)
    assert repeated_ngram_share("1111", n=3, unit="char") == 0.5  # 111, 111
    assert repeated_ngram_share("a b", n=3) == 0.0  # too short to repeat
    assert repeated_ngram_share("", n=1) == 0.0


def test_repetition_penalty():
    out = repetition_penalty([1.0, 1.0], ["a b a b a b", "a b c"], coef=0.5, n=2)
    assert out == pytest.approx([1.0 - 0.5 * (1 - 2 / 5), 1.0])
    tensor_out = repetition_penalty(torch.tensor([0.0, 0.0], dtype=torch.float64), ["1111", "12"],
                                    coef=1.0, n=3, unit="char")
    assert torch.equal(tensor_out, torch.tensor([-0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        repetition_penalty([1.0], ["a"], coef=-1.0)
    with pytest.raises(ValueError):
        repetition_penalty([1.0], ["a", "b"], coef=1.0)
