"""Token log-probs and entropies against per-token python references."""

import math

import pytest
import torch

from rlhf_ray.algo import entropy_from_logits, token_logprobs


def ref_logprob(row_logits, token):
    return row_logits[token] - math.log(sum(math.exp(z) for z in row_logits))


def ref_entropy(row_logits):
    total = sum(math.exp(z) for z in row_logits)
    probs = [math.exp(z) / total for z in row_logits]
    return -sum(p * math.log(p) for p in probs)


@pytest.mark.parametrize("seed", range(3))
def test_token_logprobs_and_entropy_match_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    got_lp = token_logprobs(logits, tokens)
    got_h = entropy_from_logits(logits)
    assert got_lp.shape == got_h.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            row = logits[b, t].tolist()
            assert got_lp[b, t].item() == pytest.approx(ref_logprob(row, tokens[b, t].item()))
            assert got_h[b, t].item() == pytest.approx(ref_entropy(row))


def test_hand_worked_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]]])
    tokens = torch.tensor([[2, 0]])
    lp = token_logprobs(logits, tokens)
    assert lp[0, 0].item() == pytest.approx(-math.log(4.0))  # uniform over 4
    assert lp[0, 1].item() == pytest.approx(math.log(0.75))  # 3 / (3 + 1)
    h = entropy_from_logits(logits)
    assert h[0, 0].item() == pytest.approx(math.log(4.0))
    assert h[0, 1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_half_precision_logits_are_upcast():
    gen = torch.Generator().manual_seed(0)
    logits = 5.0 * torch.randn(2, 3, 50, generator=gen)
    tokens = torch.randint(0, 50, (2, 3), generator=gen)
    bf16 = logits.bfloat16()
    lp = token_logprobs(bf16, tokens)
    h = entropy_from_logits(bf16)
    assert lp.dtype == h.dtype == torch.float32
    # Reference: float64 math on the same bf16-rounded logits; float32 accumulation is close.
    exact = torch.log_softmax(bf16.double(), dim=-1)
    want_lp = exact.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    want_h = -(exact.exp() * exact).sum(-1)
    assert torch.allclose(lp.double(), want_lp, atol=1e-5)
    assert torch.allclose(h.double(), want_h, atol=1e-5)


def test_gradient_matches_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    (grad,) = torch.autograd.grad(token_logprobs(logits, tokens).sum(), logits)
    # d log p_k / d z = onehot(k) - softmax(z)
    want = torch.nn.functional.one_hot(tokens, 7).double() - torch.softmax(logits, -1)
    assert torch.allclose(grad, want.detach())
