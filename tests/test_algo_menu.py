"""DAPO's clip-higher and overlong shaping, dual clip, GSPO, CISPO and Dr. GRPO, each against a
plain loop-by-loop reference written here from the paper's formula (not from the vectorised code)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray import algo


def _batch(seed: int = 0, b: int = 4, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    new = old + torch.randn(b, t, generator=g) * 0.4  # ratios well beyond 1 +- 0.2 on some tokens
    adv = torch.randn(b, t, generator=g)
    lengths = [6, 3, 1, 4][:b]
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])
    return new, old, adv, mask


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _reference_ppo(new, old, adv, mask, eps_low, eps_high, dual, agg, norm_len=None):
    """Per token: max(-A r, -A clip(r)), then for A < 0 min(that, dual * |A|); aggregated by hand."""
    rows = []
    for i in range(new.shape[0]):
        terms = []
        for j in range(new.shape[1]):
            if mask[i, j] == 0:
                continue
            r, a = math.exp(new[i, j] - old[i, j]), float(adv[i, j])
            term = max(-a * r, -a * _clip(r, 1 - eps_low, 1 + eps_high))
            if dual is not None and a < 0:
                term = min(term, dual * abs(a))
            terms.append(term)
        rows.append(terms)
    return _aggregate(rows, agg, norm_len)


def _aggregate(rows, agg, norm_len=None):
    if agg == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if agg == "seq-mean-token-sum-norm":
        return sum(sum(r) / norm_len for r in rows) / len(rows)
    raise AssertionError(agg)


@pytest.mark.parametrize("eps_high,dual", [(None, None), (0.28, None), (None, 3.0), (0.28, 3.0)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_clip_higher_and_dual_clip_match_the_loop_reference(eps_high, dual, agg):
    new, old, adv, mask = _batch()
    adv[0, 0], new[0, 0] = -2.0, old[0, 0] + 2.0  # ratio e^2 on a negative advantage: dual clip binds
    out = algo.ppo_policy_loss(new, old, adv, mask, 0.2, agg, clip_eps_high=eps_high, dual_clip=dual, norm_len=8)
    want = _reference_ppo(new, old, adv, mask, 0.2, eps_high if eps_high is not None else 0.2, dual, agg, 8)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


def test_clip_higher_moves_only_the_upper_bound():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.7]]))  # r = 1.25 (A > 0) and 0.7 (A < 0)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    sym = algo.ppo_policy_loss(new, old, adv, mask, 0.2, "seq-mean-token-sum")
    high = algo.ppo_policy_loss(new, old, adv, mask, 0.2, "seq-mean-token-sum", clip_eps_high=0.28)
    # Symmetric: -1 * 1.2 + (+1) * 0.8; clip-higher lets 1.25 through: -1.25 + 0.8.
    assert sym.loss.item() == pytest.approx(-1.2 + 0.8) and high.loss.item() == pytest.approx(-1.25 + 0.8)
    assert sym.clip_fraction.item() == 1.0 and high.clip_fraction.item() == 0.5


def test_dual_clip_bounds_a_negative_advantage_token_and_keeps_no_gradient_there():
    old = torch.zeros(1, 1)
    new = torch.tensor([[3.0]], requires_grad=True)  # ratio e^3 ~ 20
    out = algo.ppo_policy_loss(new, old, torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2, "token-mean", dual_clip=3.0)
    assert out.loss.item() == pytest.approx(3.0)  # not e^3
    (grad,) = torch.autograd.grad(out.loss, new)
    assert grad.item() == 0.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        algo.ppo_policy_loss(new, old, torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2, "token-mean", dual_clip=0.5)


@pytest.mark.parametrize("eps_high", [None, 0.3])
def test_gspo_uses_one_length_normalised_ratio_per_sequence(eps_high):
    new, old, _, mask = _batch(1)
    seq_adv = torch.tensor([0.5, -1.0, 2.0, -0.3])
    token_adv = algo.broadcast_to_tokens(seq_adv, mask)
    high = 0.2 if eps_high is None else eps_high
    terms, clipped = [], 0
    for i in range(4):
        n = int(mask[i].sum())
        s = math.exp(sum(float(new[i, j] - old[i, j]) for j in range(n)) / n)
        a = float(seq_adv[i])
        plain, clip = -a * s, -a * _clip(s, 0.8, 1 + high)
        terms.append(max(plain, clip))
        clipped += clip > plain
    for advantages in (seq_adv, token_adv):  # [B] or broadcast [B, T]: the same
        out = algo.gspo_policy_loss(new, old, advantages, mask, 0.2, eps_high)
        assert out.loss.item() == pytest.approx(sum(terms) / 4, rel=1e-5)
        assert out.clip_fraction.item() == pytest.approx(clipped / 4)


def test_gspo_gradient_reaches_every_token_of_an_unclipped_sequence_equally():
    old = torch.zeros(1, 3)
    new = torch.full((1, 3), 0.01, requires_grad=True)
    out = algo.gspo_policy_loss(new, old, torch.tensor([1.0]), torch.ones(1, 3), 0.2)
    (grad,) = torch.autograd.grad(out.loss, new)
    want = -math.exp(0.01) / 3  # d/dx of -exp(mean(x))
    assert grad.tolist() == [[pytest.approx(want)] * 3]


def test_cispo_weights_reinforce_by_the_clipped_ratio_and_drops_no_gradient():
    new, old, adv, mask = _batch(2)
    values = new.clone()  # plain numbers for the reference
    new = new.clone().requires_grad_(True)
    out = algo.cispo_policy_loss(new, old, adv, mask, clip_eps_high=0.2, agg="token-mean")
    terms, changed = [], 0
    for i in range(4):
        for j in range(6):
            if mask[i, j] == 0:
                continue
            r = math.exp(float(values[i, j] - old[i, j]))
            w = min(r, 1.2)
            changed += w != r
            terms.append(-w * float(adv[i, j]) * float(values[i, j]))
    assert out.loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert out.clip_fraction.item() == pytest.approx(changed / len(terms))
    (grad,) = torch.autograd.grad(out.loss, new)
    # Every real token with a non-zero advantage gets a gradient, clipped or not (PPO would drop some):
    # d/dlogp of -w A logp = -w A, with w held fixed.
    n = mask.sum()
    for i in range(4):
        for j in range(6):
            w = min(math.exp(float(values[i, j] - old[i, j])), 1.2)
            expected = -w * float(adv[i, j]) / n if mask[i, j] else 0.0
            assert grad[i, j].item() == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    low = algo.cispo_policy_loss(new, old, adv, mask, clip_eps_high=0.2, agg="token-mean", clip_eps_low=0.1)
    assert low.clip_fraction.item() > out.clip_fraction.item()  # ratios under 0.9 are lifted too


def test_dr_grpo_subtracts_the_group_mean_without_dividing_by_its_std():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 10.0, 20.0])
    out = algo.group_advantages(scores, 2, "dr_grpo")
    assert out.tolist() == [-1.0, 1.0, 0.0, 0.0, -5.0, 5.0]  # GRPO would give +-0.707 for both spread groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_informative_groups_are_those_whose_scores_differ(dtype):
    """DAPO's dynamic-sampling filter against a loop: a group is informative unless every score in
    it equals the first; and exactly those groups get a non-zero GRPO advantage."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 2, (40,), generator=g).to(dtype)  # groups of 4 0/1 rewards: some all equal
    scores[-4:] = 0.7
    expected = [any(scores[i] != scores[k * 4] for i in range(k * 4, k * 4 + 4)) for k in range(10)]
    out = algo.informative_groups(scores, 4)
    assert out.tolist() == expected and 0 < sum(expected) < 10
    moved = algo.group_advantages(scores, 4, "grpo").view(10, 4).abs().amax(-1) > 1e-3
    assert moved.tolist() == expected
    with pytest.raises(ValueError, match="whole number of groups"):
        algo.informative_groups(scores[:-1], 4)


def test_seq_mean_token_sum_norm_has_no_length_bias():
    """Two sequences with the same per-token loss: token-mean and seq-mean-token-mean weigh them by
    length or not at all; the norm mode weighs every token the same across lengths."""
    per_token = torch.ones(2, 4)
    mask = torch.tensor([[1.0, 1, 1, 1], [1.0, 0, 0, 0]])
    assert algo.aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="positive norm_len"):
        algo.aggregate_loss(per_token, mask, "seq-mean-token-sum-norm")


def test_overlong_penalty_is_zero_then_linear_then_flat():
    lengths = torch.tensor([0, 12, 16, 18, 20, 25])
    out = algo.overlong_penalty(lengths, max_len=20, buffer_len=4, factor=1.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer_len"):
        algo.overlong_penalty(lengths, 20, 0, 1.0)


def test_the_policy_loss_spec_dispatches_each_kind():
    new, old, adv, mask = _batch(3)
    for kind, direct in [("ppo", algo.ppo_policy_loss(new, old, adv, mask, 0.2, "token-mean", 0.28)),
                         ("gspo", algo.gspo_policy_loss(new, old, adv, mask, 0.2, 0.28)),
                         ("cispo", algo.cispo_policy_loss(new, old, adv, mask, 0.28, "token-mean"))]:
        spec = algo.PolicyLossSpec(kind=kind, clip_eps=0.2, clip_eps_high=0.28)
        assert algo.policy_loss(spec, new, old, adv, mask).loss.item() == pytest.approx(direct.loss.item())
    with pytest.raises(ValueError, match="unknown policy loss 'trpo'"):
        algo.policy_loss(algo.PolicyLossSpec(kind="trpo"), new, old, adv, mask)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_correction_matches_the_loop_reference(level, mode, dtype):
    new, old, _, mask = _batch(4)
    new, old = new.to(dtype), old.to(dtype)
    cap = 1.5
    out = algo.is_correction(new, old, mask, cap, level, mode)
    affected, units = 0, 0
    for i in range(4):
        n = int(mask[i].sum())
        seq_ratio = math.exp(sum(float(new[i, j] - old[i, j]) for j in range(n)))
        if level == "sequence":
            units, affected = units + 1, affected + (seq_ratio > cap)
        for j in range(6):
            if j >= n:
                assert out.weights[i, j].item() == 0.0
                continue
            r = seq_ratio if level == "sequence" else math.exp(float(new[i, j] - old[i, j]))
            if level == "token":
                units, affected = units + 1, affected + (r > cap)
            want = min(r, cap) if mode == "truncate" else (0.0 if r > cap else r)
            assert out.weights[i, j].item() == pytest.approx(want, rel=1e-5)
    assert out.affected_fraction.item() == pytest.approx(affected / units)
    assert not out.weights.requires_grad and out.weights.dtype == dtype


def test_truncated_is_weights_are_token_level_tis():
    new, old, _, mask = _batch(5)
    assert torch.equal(algo.truncated_is_weights(new, old, mask, 2.0), algo.is_correction(new, old, mask, 2.0).weights)
    with pytest.raises(ValueError, match="level must be one of"):
        algo.is_correction(new, old, mask, 2.0, "batch")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_matches_the_paper_formula(kind, smoothing):
    g = torch.Generator().manual_seed(6)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    beta = 0.1
    out = algo.dpo_loss(pc, pr, rc, rr, beta, kind, smoothing)
    losses = []
    for i in range(5):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        if kind == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h))
    assert out.loss.item() == pytest.approx(sum(losses) / 5, rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx((beta * (pc - rc)).tolist())
    assert out.rejected_rewards.tolist() == pytest.approx((beta * (pr - rr)).tolist())


def test_dpo_prefers_raising_the_chosen_response():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    out = algo.dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2))  # h = 0: sigmoid(0) = 1/2
    gc, gr = torch.autograd.grad(out.loss, [pc, pr])
    assert gc.item() < 0 < gr.item()  # descending the loss raises chosen, lowers rejected
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        algo.dpo_loss(pc, pr, pc, pr, 0.1, "kto")
