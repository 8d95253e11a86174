"""PPO losses, loss aggregation, the alignment-tax terms and the Bradley-Terry loss against loop
references and hand-worked answers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.algo import (
    aggregate_loss,
    bradley_terry_loss,
    kl_penalty_loss,
    language_model_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_accuracy,
    truncated_is_weights,
)

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -7.0]


def ref_aggregate(per_token, mask, agg):
    """per_token: list of rows of floats, only read where mask is set."""
    rows = [
        [v for v, m in zip(row, mrow, strict=True) if m]
        for row, mrow in zip(per_token, mask, strict=True)
    ]
    if agg == "token-mean":
        flat = [v for row in rows for v in row]
        return sum(flat) / len(flat)
    if agg == "seq-mean-token-sum":
        return sum(sum(row) for row in rows) / len(rows)
    return sum(sum(row) / len(row) if row else 0.0 for row in rows) / len(rows)


def ref_policy_loss(lp, old, adv, mask, eps, agg):
    per_token, clipped_count, kl_sum, n = [], 0, 0.0, 0
    for b in range(len(mask)):
        row = []
        for t in range(len(mask[b])):
            if not mask[b][t]:
                row.append(None)
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            unclipped = -adv[b][t] * ratio
            clipped = -adv[b][t] * min(max(ratio, 1 - eps), 1 + eps)
            row.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            kl_sum += (ratio - 1) - math.log(ratio)
            n += 1
        per_token.append(row)
    return ref_aggregate(per_token, mask, agg), clipped_count / n, kl_sum / n


def ref_value_loss(v, old, ret, mask, eps, agg):
    per_token, clipped_count, n = [], 0, 0
    for b in range(len(mask)):
        row = []
        for t in range(len(mask[b])):
            if not mask[b][t]:
                row.append(None)
                continue
            v_clipped = old[b][t] + min(max(v[b][t] - old[b][t], -eps), eps)
            unclipped = (v[b][t] - ret[b][t]) ** 2
            clipped = (v_clipped - ret[b][t]) ** 2
            row.append(0.5 * max(unclipped, clipped))
            clipped_count += clipped > unclipped
            n += 1
        per_token.append(row)
    return ref_aggregate(per_token, mask, agg), clipped_count / n


def random_batch(seed, batch=4, time=6):
    gen = torch.Generator().manual_seed(seed)
    new = -torch.rand(batch, time, generator=gen, dtype=torch.float64) * 2
    old = new + 0.3 * torch.randn(batch, time, generator=gen, dtype=torch.float64)
    other = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, time, generator=gen) < 0.6
    mask[:, 0] = True
    return new, old, other, mask


def test_aggregate_loss_hand_worked():
    per_token = torch.tensor([[1.0, 2.0, 50.0], [3.0, float("nan"), -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(2.0)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx(3.0)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_loss_matches_loop(agg, seed):
    _, _, per_token, mask = random_batch(seed)
    got = aggregate_loss(per_token, mask, agg)
    assert got.item() == pytest.approx(ref_aggregate(per_token.tolist(), mask.tolist(), agg))


def test_unknown_agg_names_valid_modes():
    with pytest.raises(ValueError, match=r"'mean'.*token-mean, seq-mean-token-sum"):
        aggregate_loss(torch.zeros(1, 2), torch.ones(1, 2), "mean")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        ppo_value_loss(*[torch.zeros(1, 2)] * 3, torch.ones(1, 2), 0.2, "sum")


def test_policy_loss_hand_worked():
    ratios = [1.5, 0.5, 1.1, 1.5]
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -3.0]])
    lp = old + torch.log(torch.tensor([ratios + [1e6]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1e9]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, agg="token-mean")
    # per token: clip binds at -1.2 (ratio 1.5, A > 0); -0.5 and 1.5 keep the pessimistic
    # unclipped term although the ratio is outside [0.8, 1.2]; 1.1 is inside the range.
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 1.5) / 4)
    assert out.clip_fraction.item() == pytest.approx(0.25)
    want_kl = sum((r - 1) - math.log(r) for r in ratios) / 4
    assert out.approx_kl.item() == pytest.approx(want_kl, rel=1e-5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    out = ppo_policy_loss(lp, lp.clone(), adv, torch.ones(1, 3), 0.2, "token-mean")
    assert out.loss.item() == pytest.approx(-0.5)
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_matches_loop(agg, seed):
    new, old, adv, mask = random_batch(seed)
    out = ppo_policy_loss(new, old, adv, mask, 0.2, agg)
    loss, clip_fraction, approx_kl = ref_policy_loss(
        new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, agg
    )
    assert out.loss.item() == pytest.approx(loss)
    assert out.clip_fraction.item() == pytest.approx(clip_fraction)
    assert out.approx_kl.item() == pytest.approx(approx_kl)
    assert 0.0 < clip_fraction < 1.0  # the random batch exercises both branches


def test_policy_gradient_vanishes_exactly_where_the_clip_binds():
    new, old, adv, mask = random_batch(7)
    new.requires_grad_(True)
    out = ppo_policy_loss(new, old, adv, mask, 0.2, "token-mean")
    (grad,) = torch.autograd.grad(out.loss, new)
    ratio = (new - old).exp().detach()
    n = mask.sum().item()
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            r, a = ratio[b, t].item(), adv[b, t].item()
            binds = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
            want = 0.0 if (not mask[b, t] or binds) else -a * r / n
            assert grad[b, t].item() == pytest.approx(want, abs=1e-12)


def test_value_loss_hand_worked():
    values = torch.tensor([[1.0, 2.0, 0.0, 1e30]])
    old = torch.tensor([[0.5, 1.0, 0.0, -1e30]])
    returns = torch.tensor([[2.0, 0.0, 1.0, float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_value_loss(values, old, returns, mask, clip_eps=0.2, agg="token-mean")
    # t0: clipped value 0.7, 0.5 * max(1, 1.69); t1: 0.5 * max(4, 1.44); t2: 0.5 * 1
    assert out.loss.item() == pytest.approx((0.845 + 2.0 + 0.5) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_value_loss_matches_loop(agg, seed):
    values, old, returns, mask = random_batch(seed)
    out = ppo_value_loss(values, old, returns, mask, 0.2, agg)
    loss, clip_fraction = ref_value_loss(
        values.tolist(), old.tolist(), returns.tolist(), mask.tolist(), 0.2, agg
    )
    assert out.loss.item() == pytest.approx(loss)
    assert out.clip_fraction.item() == pytest.approx(clip_fraction)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    extra=st.integers(1, 3),
    garbage=st.sampled_from(GARBAGE),
    agg=st.sampled_from(AGGS),
)
def test_padding_columns_never_change_losses_or_gradients(seed, extra, garbage, agg):
    a, b, c, mask = random_batch(seed, batch=3, time=4)
    junk = torch.full((3, extra), garbage, dtype=torch.float64)

    def pad(x, fill=junk):
        return torch.cat([x, fill], 1)

    mask_pad = torch.cat([mask, torch.zeros(3, extra, dtype=torch.bool)], 1)
    for loss_fn in (ppo_policy_loss, ppo_value_loss):
        x = a.clone().requires_grad_(True)
        x_pad = pad(a).requires_grad_(True)
        out = loss_fn(x, b, c, mask, 0.2, agg)
        out_pad = loss_fn(x_pad, pad(b), pad(c, -junk), mask_pad, 0.2, agg)
        for got, want in zip(out_pad, out, strict=True):
            assert torch.allclose(got, want)
        (grad,) = torch.autograd.grad(out.loss, x)
        (grad_pad,) = torch.autograd.grad(out_pad.loss, x_pad)
        assert torch.allclose(grad_pad[:, :4], grad)
        assert torch.equal(grad_pad[:, 4:], torch.zeros(3, extra, dtype=torch.float64))


def test_bradley_terry_hand_worked():
    equal = torch.tensor([0.3, -2.0])
    assert bradley_terry_loss(equal, equal).item() == pytest.approx(math.log(2.0))
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # mean of log(1 + e^-1) and log 2
    want = 0.5 * (math.log1p(math.exp(-1.0)) + math.log(2.0))
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(want)
    # hinge relu(0.5 - diff): 0 for diff 1, 0.5 for diff 0 -> mean 0.25, weighted by 2
    got = bradley_terry_loss(chosen, rejected, margin=0.5, margin_weight=2.0)
    assert got.item() == pytest.approx(want + 0.5)
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(want)


def test_bradley_terry_matches_loop_and_gradient_prefers_chosen():
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(8, generator=gen, dtype=torch.float64)
    loss = bradley_terry_loss(chosen, rejected, margin=1.0, margin_weight=0.5)
    want = 0.0
    for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
        want += -math.log(1 / (1 + math.exp(-(c - r)))) + 0.5 * max(0.0, 1.0 - (c - r))
    assert loss.item() == pytest.approx(want / 8)
    (grad,) = torch.autograd.grad(loss, chosen)
    assert (grad < 0).all()  # descending the loss raises every chosen score


def test_preference_accuracy_counts_ties_as_wrong():
    chosen = torch.tensor([1.0, 0.0, 2.0, -1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0, -2.0])
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(0.5)


def test_dpo_accuracy_ignores_the_float_noise_of_two_batchings_but_counts_a_real_gap():
    """The policy as its own reference, scored in two batchings: summed log-probs that differ in
    their last bits (as packed and padded passes do, ~1e-6 relative) are ties, not wins; a gap of
    0.01 of reward is a win."""
    from rlhf_ray import algo

    g = torch.Generator().manual_seed(0)
    ref_c, ref_r = -torch.rand(16, generator=g) * 200, -torch.rand(16, generator=g) * 200
    jitter = lambda x: x * (1 + 4e-6 * (torch.rand(16, generator=g) * 2 - 1))
    out = algo.dpo_loss(jitter(ref_c), jitter(ref_r), ref_c, ref_r, beta=0.1)
    assert (out.chosen_rewards > out.rejected_rewards).any()  # the exact comparison sees "wins"
    assert preference_accuracy(out.chosen_rewards, out.rejected_rewards, out.reward_noise).item() == 0.0
    ahead = algo.dpo_loss(ref_c + 0.1, ref_r, ref_c, ref_r, beta=0.1)  # a reward gap of 0.01 each
    assert preference_accuracy(ahead.chosen_rewards, ahead.rejected_rewards, ahead.reward_noise).item() == 1.0


def test_truncated_is_weights_known_values():
    # pi_train / pi_sampling per token: e^0 = 1, e^-1, e^0.5, e^2 (capped at 2), padding -> 0.
    train = torch.tensor([[0.0, -1.0, 0.5], [2.0, float("nan"), 0.0]])
    sampling = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = truncated_is_weights(train, sampling, mask, cap=2.0)
    expected = torch.tensor([[1.0, math.exp(-1.0), math.exp(0.5)], [2.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad


def test_is_weights_scale_each_tokens_policy_loss_and_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(2, 4, requires_grad=True)
    old, adv = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    weights = torch.tensor([[0.5, 2.0, 1.0, 9.0], [0.0, 1.5, 3.0, 3.0]])
    weighted = ppo_policy_loss(logprobs, old, adv, mask, 0.2, "seq-mean-token-sum", token_weights=weights)
    # The same loss by hand: per-token clipped surrogate times its weight, summed per row, row mean.
    ratio = torch.exp(logprobs - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * weights * mask
    torch.testing.assert_close(weighted.loss, per_token.sum(-1).mean())
    (g_weighted,) = torch.autograd.grad(weighted.loss, logprobs)
    (g_plain,) = torch.autograd.grad(ppo_policy_loss(logprobs, old, adv, mask, 0.2, "seq-mean-token-sum").loss,
                                     logprobs)
    torch.testing.assert_close(g_weighted, g_plain * weights * mask)


def test_language_model_loss_is_mean_nll_over_real_tokens_and_exp_is_perplexity():
    # Probabilities 1/2, 1/4 on row 0 and 1/8 on row 1; padding holds garbage.
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 7.0], [0.125, 1e-30, 3.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = (math.log(2) + math.log(4) + math.log(8)) / 3  # = 2 ln 2
    loss = language_model_loss(logprobs, mask)
    assert loss.item() == pytest.approx(want)
    assert loss.exp().item() == pytest.approx(4.0)  # perplexity: geometric mean of 2, 4, 8


def test_kl_penalty_loss_hand_worked():
    # One token: policy 1/2, reference 1/4. log_ratio = ln 2.
    lp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    mask = torch.ones(1, 1)
    assert kl_penalty_loss(lp, ref, mask, "k2", "token-mean").item() == pytest.approx(0.5 * math.log(2) ** 2)
    # k3 = e^r - 1 - r with r = ln(1/4) - ln(1/2) = -ln 2: 1/2 - 1 + ln 2
    assert kl_penalty_loss(lp, ref, mask, "k3", "token-mean").item() == pytest.approx(math.log(2) - 0.5)
    same = kl_penalty_loss(lp, lp.clone(), mask, "k3", "token-mean")
    assert same.item() == 0.0


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_penalty_gradient_pulls_the_policy_towards_the_reference(kind):
    lp = torch.log(torch.tensor([[0.5, 0.1, 0.3]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.4, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0]])
    (grad,) = torch.autograd.grad(kl_penalty_loss(lp, ref, mask, kind, "token-mean"), lp)
    # Descending the loss lowers the log-prob where the policy is above the reference and raises
    # it where it is below; the padded column gets no gradient.
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and grad[0, 2] == 0
    # k2: d/dlp 0.5 (lp - ref)^2 = lp - ref, over 2 real tokens. k3: (1 - p_ref / p) / 2.
    want = (lp - ref) / 2 if kind == "k2" else (1 - ref.exp() / lp.exp()) / 2
    assert torch.allclose(grad[0, :2], want[0, :2].detach())


@pytest.mark.parametrize("agg", AGGS)
def test_kl_penalty_loss_matches_loop_and_ignores_padding(agg):
    lp, old, _adv, mask = random_batch(5)
    lp, old = lp.clone(), old.clone()
    lp[~mask.bool()] = float("nan")  # garbage in padding must not leak
    loss = kl_penalty_loss(lp, old, mask, "k2", agg)
    per_token = [[0.5 * (a - b) ** 2 for a, b in zip(ra, rb, strict=True)]
                 for ra, rb in zip(lp.tolist(), old.tolist(), strict=True)]
    assert loss.item() == pytest.approx(ref_aggregate(per_token, mask.tolist(), agg))
