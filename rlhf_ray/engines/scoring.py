"""Forward passes over a ``RolloutBatch`` (one process, no Ray): per-token log-probs and entropy
of the responses, per-token values. Shared by the learners, the reference and the parity check."""

from __future__ import annotations

import torch

from rlhf_ray.algo import entropy_from_logits, token_logprobs
from rlhf_ray.data.batch import RolloutBatch


def response_logits(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token: ``[B, R, V]``, divided by the sampling temperature
    so log-probs match those of the distribution vLLM sampled from."""
    out = model(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids(),
        use_cache=False,
    )
    P = batch.prompt_len
    logits = out.logits[:, P - 1 : -1].float()
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False):
    logits = response_logits(model, batch, temperature)
    logprobs = token_logprobs(logits, batch.responses) * batch.response_mask
    if not with_entropy:
        return logprobs
    return logprobs, entropy_from_logits(logits) * batch.response_mask


def response_values(value_model, batch: RolloutBatch) -> torch.Tensor:
    """Values of the states before each response token: ``[B, R]``."""
    values = value_model(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids(),
    )
    P = batch.prompt_len
    return values[:, P - 1 : -1].float() * batch.response_mask


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, micro_batch_size: int, temperature: float = 1.0):
    """(log-probs, entropy) ``[B, R]`` each, computed in micro-batches without gradients."""
    parts = [
        response_logprobs(model, batch.select(slice(i, i + micro_batch_size)), temperature, with_entropy=True)
        for i in range(0, batch.size, micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def batched_values(value_model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    return torch.cat([
        response_values(value_model, batch.select(slice(i, i + micro_batch_size)))
        for i in range(0, batch.size, micro_batch_size)
    ])
