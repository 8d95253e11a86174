"""KL estimators and KL-shaped rewards against loop references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.algo import kl_estimate, shape_rewards

GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -7.0]


def ref_kl(logprob, ref_logprob, kind):
    if kind == "k1":
        return logprob - ref_logprob
    if kind == "k2":
        return 0.5 * (logprob - ref_logprob) ** 2
    r = ref_logprob - logprob
    return math.exp(r) - r - 1


def ref_shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind):
    out = []
    for b in range(len(mask)):
        row = [0.0] * len(mask[b])
        last = None
        for t in range(len(mask[b])):
            if mask[b][t]:
                row[t] = -kl_coef * ref_kl(logprobs[b][t], ref_logprobs[b][t], kind)
                last = t
        if last is not None:
            row[last] += scores[b]
        out.append(row)
    return out


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_loop(kind):
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    ref = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    got = kl_estimate(lp, ref, kind)
    for b in range(3):
        for t in range(5):
            assert got[b, t].item() == pytest.approx(
                ref_kl(lp[b, t].item(), ref[b, t].item(), kind)
            )


def test_kl_hand_worked_values():
    lp = torch.tensor([-1.0, -2.0, -1.0])
    ref = torch.tensor([-1.0, -1.0, -3.0])
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.0, -1.0, 2.0])
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0.0, 0.5, 2.0])
    # k3 with r = ref - lp: r = 0 -> 0; r = 1 -> e - 2; r = -2 -> e^-2 + 1
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx(
        [0.0, math.e - 2.0, math.exp(-2.0) + 1.0]
    )


def test_k2_and_k3_are_nonnegative_and_zero_only_at_equality():
    gen = torch.Generator().manual_seed(3)
    lp = torch.randn(50, generator=gen)
    ref = torch.randn(50, generator=gen)
    for kind in ("k2", "k3"):
        assert (kl_estimate(lp, ref, kind) > 0).all()
        assert torch.equal(kl_estimate(lp, lp, kind), torch.zeros(50))


def test_unknown_kl_kind_names_valid_kinds():
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        shape_rewards(
            torch.zeros(1),
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.ones(1, 2),
            0.1,
            "kl",
        )


def test_shape_rewards_hand_worked():
    scores = torch.tensor([2.0, -1.0, 5.0])
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 9.0], [-2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    got = shape_rewards(scores, lp, ref, mask, kl_coef=0.1, kind="k1")
    want = torch.tensor(
        [
            [-0.05, 0.1 + 2.0, 0.0],  # score lands on the last real token (t=1)
            [-0.1, 0.0, 0.0 - 1.0],  # mask need not be a prefix: last real token is t=2
            [0.0, 0.0, 0.0],  # no real token: no score
        ]
    )
    assert torch.allclose(got, want)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("seed", range(3))
def test_shape_rewards_matches_loop(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, generator=gen, dtype=torch.float64)
    lp = -torch.rand(5, 6, generator=gen, dtype=torch.float64) * 2
    ref = -torch.rand(5, 6, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(5, 6, generator=gen) < 0.6
    got = shape_rewards(scores, lp, ref, mask, 0.05, kind)
    want = ref_shape_rewards(scores.tolist(), lp.tolist(), ref.tolist(), mask.tolist(), 0.05, kind)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    time=st.integers(1, 6),
    extra=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    garbage=st.sampled_from(GARBAGE),
    kind=st.sampled_from(["k1", "k2", "k3"]),
)
def test_padding_columns_never_change_results(batch, time, extra, seed, garbage, kind):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, generator=gen)
    lp = -torch.rand(batch, time, generator=gen) * 2
    ref = -torch.rand(batch, time, generator=gen) * 2
    mask = torch.rand(batch, time, generator=gen) < 0.7
    junk = torch.full((batch, extra), garbage)
    lp_pad, ref_pad = torch.cat([lp, junk], 1), torch.cat([ref, -junk], 1)
    mask_pad = torch.cat([mask, torch.zeros(batch, extra, dtype=torch.bool)], 1)

    assert torch.equal(kl_estimate(lp_pad, ref_pad, kind)[:, :time], kl_estimate(lp, ref, kind))
    got = shape_rewards(scores, lp_pad, ref_pad, mask_pad, 0.1, kind)
    assert torch.equal(got[:, :time], shape_rewards(scores, lp, ref, mask, 0.1, kind))
    assert torch.equal(got[:, time:], torch.zeros(batch, extra))
