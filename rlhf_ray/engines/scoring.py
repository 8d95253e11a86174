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


def _by_sorted_micro_batches(forward, batch: RolloutBatch, micro_batch_size: int) -> list[torch.Tensor]:
    """``forward`` (a tuple of ``[b, r]`` per-token or ``[b]`` per-sequence tensors) over
    length-sorted, padding-trimmed micro-batches, put back in row order: per-token outputs are
    ``[B, R]`` with zeros past each micro-batch's width, as the full-width pass gives on padding."""
    outputs: list[torch.Tensor] = []
    for rows, mb in batch.length_sorted_micro_batches(micro_batch_size):
        for k, part in enumerate(forward(mb)):
            if len(outputs) == k:
                shape = (batch.size, batch.response_mask.shape[1]) if part.dim() == 2 else (batch.size,)
                outputs.append(part.new_zeros(shape))
            if part.dim() == 2:
                outputs[k][rows, : part.shape[1]] = part
            else:
                outputs[k][rows] = part
    return outputs


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, micro_batch_size: int, temperature: float = 1.0):
    """(log-probs, entropy) ``[B, R]`` each, computed in micro-batches without gradients."""
    logprobs, entropy = _by_sorted_micro_batches(
        lambda mb: response_logprobs(model, mb, temperature, with_entropy=True), batch, micro_batch_size)
    return logprobs, entropy


@torch.no_grad()
def batched_values(value_model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    return _by_sorted_micro_batches(lambda mb: (response_values(value_model, mb),), batch, micro_batch_size)[0]


@torch.no_grad()
def batched_scores(reward_model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    """One scalar per row ``[B]`` from a ``RewardModel`` (read at each row's last real token)."""
    return _by_sorted_micro_batches(
        lambda mb: (reward_model(input_ids=mb.sequences, attention_mask=mb.attention_mask,
                                 position_ids=mb.position_ids()).float(),),
        batch, micro_batch_size)[0]
