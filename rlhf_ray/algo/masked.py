"""Masked reductions over [batch, time] response tokens.

``mask`` marks real tokens (bool or 0/1 float). Padded positions are selected away with
``torch.where`` rather than multiplied by 0, so garbage there (even inf/NaN) never leaks
into a result or, through the backward pass, into a gradient.
"""

from __future__ import annotations

import torch


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (broadcast to the mask's shape) with every padded position set to 0."""
    return torch.where(mask.bool(), x, 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over real tokens, over all elements (``dim=None``) or along ``dim``."""
    kept = zero_padding(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over real tokens; a slice with no real token gives 0, not NaN."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all real tokens.

    With ``unbiased`` the Bessel correction n/(n-1) is applied; fewer than two real tokens
    give variance 0 instead of inf/NaN.
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered.square(), mask)
    if unbiased:
        count = mask.bool().sum().to(x.dtype)
        var = var * count / (count - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over real tokens (padding set to 0).

    Used on PPO advantages (and optionally rewards) so the step size does not depend on the
    reward scale. With ``shift_mean=False`` only the scale changes: the mean is added back.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)
