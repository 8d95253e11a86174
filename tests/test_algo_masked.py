"""Masked reductions and whitening against loop-by-loop references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.algo import masked_mean, masked_sum, masked_var, whiten

GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -7.0]


def random_mask(gen, batch, time):
    """Arbitrary (not necessarily contiguous) float mask with at least one real token."""
    mask = (torch.rand(batch, time, generator=gen) < 0.6).double()
    mask[0, 0] = 1.0
    return mask


def real_values(x, mask):
    return [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if mask[b][t]]


def ref_var(vals, unbiased):
    mean = sum(vals) / len(vals)
    ss = sum((v - mean) ** 2 for v in vals)
    return ss / (len(vals) - 1) if unbiased else ss / len(vals)


@pytest.mark.parametrize("seed", range(5))
def test_reductions_match_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 4, 7)
    xs, ms = x.tolist(), mask.tolist()
    vals = real_values(xs, ms)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals))
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    assert masked_var(x, mask).item() == pytest.approx(ref_var(vals, True))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(ref_var(vals, False))
    for dim in (0, 1, -1):
        got_sum = masked_sum(x, mask, dim=dim)
        got_mean = masked_mean(x, mask, dim=dim)
        for i in range(7 if dim == 0 else 4):
            if dim == 0:
                row = [xs[b][i] for b in range(4) if ms[b][i]]
            else:
                row = [xs[i][t] for t in range(7) if ms[i][t]]
            assert got_sum[i].item() == pytest.approx(sum(row))
            assert got_mean[i].item() == pytest.approx(sum(row) / len(row) if row else 0.0)


def test_hand_worked_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == 12.0
    assert masked_mean(x, mask).item() == 3.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 4.5]
    # deviations -2, -1, 0, 3 -> sum of squares 14
    assert masked_var(x, mask).item() == pytest.approx(14 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(3.5)


def test_bool_and_float_masks_agree():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    mask = random_mask(gen, 3, 5)
    for fn in (masked_sum, masked_mean, masked_var, whiten):
        assert torch.equal(fn(x, mask.float()), fn(x, mask.bool()))


def test_empty_slices_give_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    single = torch.tensor([[1, 0], [0, 0]])
    assert masked_var(x, single).item() == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_whiten_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 3, 6)
    xs, ms = x.tolist(), mask.tolist()
    vals = real_values(xs, ms)
    mean, var = sum(vals) / len(vals), ref_var(vals, True)
    for shift_mean in (True, False):
        got = whiten(x, mask, shift_mean=shift_mean)
        for b in range(3):
            for t in range(6):
                if ms[b][t]:
                    want = (xs[b][t] - mean) / math.sqrt(var + 1e-8)
                    want += 0.0 if shift_mean else mean
                else:
                    want = 0.0
                assert got[b, t].item() == pytest.approx(want, abs=1e-9)
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    time=st.integers(1, 6),
    extra=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    garbage=st.sampled_from(GARBAGE),
)
def test_padding_columns_never_change_results(batch, time, extra, seed, garbage):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, time, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, batch, time)
    x_pad = torch.cat([x, torch.full((batch, extra), garbage, dtype=x.dtype)], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(batch, extra, dtype=mask.dtype)], dim=1)
    # allclose, not equal: a different tensor width may change the summation order.
    assert torch.allclose(masked_sum(x_pad, mask_pad), masked_sum(x, mask))
    assert torch.allclose(masked_mean(x_pad, mask_pad), masked_mean(x, mask))
    assert torch.allclose(masked_mean(x_pad, mask_pad, dim=1), masked_mean(x, mask, dim=1))
    assert torch.allclose(masked_var(x_pad, mask_pad), masked_var(x, mask))
    for shift_mean in (True, False):
        got = whiten(x_pad, mask_pad, shift_mean)
        assert torch.allclose(got[:, :time], whiten(x, mask, shift_mean))
        assert torch.equal(got[:, time:], torch.zeros(batch, extra, dtype=x.dtype))
