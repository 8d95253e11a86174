"""GAE and critic-free group advantages against loop references and hand-worked numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.algo import broadcast_to_tokens, gae, group_advantages

GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -7.0]


def prefix_mask(lengths, time):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(time)] for n in lengths])


def ref_gae(rewards, values, lengths, gamma, lam):
    advantages, returns = [], []
    for b, n in enumerate(lengths):
        adv_row = [0.0] * len(rewards[b])
        ret_row = [0.0] * len(rewards[b])
        running = 0.0
        for t in range(n - 1, -1, -1):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv_row[t] = running
            ret_row[t] = running + values[b][t]
        advantages.append(adv_row)
        returns.append(ret_row)
    return advantages, returns


def test_gae_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, -99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: deltas 0.04, 0.03, 0.3; A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1
    # row 1: deltas 0.9, 1.0 (value after the last real token is 0)
    assert torch.allclose(advantages, torch.tensor([[0.21712, 0.246, 0.3], [1.62, 1.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.71712, 0.846, 1.0], [2.62, 2.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert returns.tolist() == [[10.0, 9.0, 7.0, 4.0]]
    assert advantages.tolist() == [[9.5, 10.0, 5.0, 4.0]]


@pytest.mark.parametrize("seed", range(4))
def test_gae_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 8, (5,), generator=gen).tolist()
    rewards = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = prefix_mask(lengths, 7).bool()
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    want_adv, want_ret = ref_gae(rewards.tolist(), values.tolist(), lengths, 0.97, 0.9)
    assert torch.allclose(advantages, torch.tensor(want_adv, dtype=torch.float64))
    assert torch.allclose(returns, torch.tensor(want_ret, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    extra=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    garbage=st.sampled_from(GARBAGE),
)
def test_gae_padding_columns_never_change_results(lengths, extra, seed, garbage):
    batch, time = len(lengths), 5
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, time, generator=gen)
    values = torch.randn(batch, time, generator=gen)
    mask = prefix_mask(lengths, time)
    # garbage also inside each row's padding, not only in the new columns
    rewards = torch.where(mask.bool(), rewards, garbage)
    junk = torch.full((batch, extra), garbage)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.95)
    adv_pad, ret_pad = gae(
        torch.cat([rewards, junk], 1),
        torch.cat([values, junk], 1),
        torch.cat([mask, torch.zeros(batch, extra)], 1),
        0.9,
        0.95,
    )
    assert torch.equal(adv_pad[:, :time], advantages)
    assert torch.equal(ret_pad[:, :time], returns)
    assert torch.equal(adv_pad[:, time:], torch.zeros(batch, extra))
    assert torch.equal(ret_pad[:, time:], torch.zeros(batch, extra))
    assert torch.equal(advantages[~mask.bool()], torch.zeros(int((mask == 0).sum())))


def ref_group_advantages(scores, group_size, kind, eps):
    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for i, s in enumerate(scores):
        if kind == "reinforce_pp":
            out.append((s - mean(scores)) / (std(scores) + eps))
            continue
        start = i // group_size * group_size
        group = scores[start : start + group_size]
        if kind == "grpo":
            out.append((s - mean(group)) / (std(group) + eps))
        else:
            others = group[: i - start] + group[i - start + 1 :]
            out.append(s - mean(others))
    return out


def test_group_advantages_hand_worked():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    grpo = group_advantages(scores, 3, "grpo")
    assert torch.allclose(grpo, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5)
    rloo = group_advantages(scores, 3, "rloo")
    assert rloo.tolist() == [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]
    pairs = group_advantages(torch.tensor([1.0, 0.0]), 2, "rloo")
    assert pairs.tolist() == [1.0, -1.0]
    # batch mean 5, unbiased std 1 (sum of squares 2, n - 1 = 2); groups are irrelevant
    rpp = group_advantages(torch.tensor([4.0, 5.0, 6.0]), 1, "reinforce_pp", eps=0.0)
    assert rpp.tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_group_advantages_match_loop(kind, group_size):
    gen = torch.Generator().manual_seed(group_size)
    scores = torch.randn(3 * group_size, generator=gen, dtype=torch.float64)
    got = group_advantages(scores, group_size, kind)
    want = ref_group_advantages(scores.tolist(), group_size, kind, 1e-6)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, rloo, reinforce_pp"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="batch of 5 scores.*group_size=2"):
        group_advantages(torch.zeros(5), 2, "grpo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="group_size=0"):
        group_advantages(torch.zeros(4), 0, "reinforce_pp")


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    got = broadcast_to_tokens(torch.tensor([2.0, -1.0, 7.0]), mask)
    assert got.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
