"""Forward passes over a ``RolloutBatch`` (one process, no Ray): per-token log-probs and entropy
of the responses, per-token values. Shared by the learners, the reference and the parity check."""

from __future__ import annotations

import torch

from rlhf_ray.algo import entropy_from_logits, token_logprobs
from rlhf_ray.data.batch import RolloutBatch


def _response_outputs(forward, model, batch: RolloutBatch) -> torch.Tensor:
    """``forward(input_ids, attention_mask, position_ids)``'s per-position outputs at the positions
    that predict each response token, ``[B, R, ...]``. Packed (:func:`packed_layout`: the rows'
    real tokens laid end to end, positions restarting at each sequence, no padding computed but a
    short tail per packed row) when the model passed ``packs_exactly``; else over the padded rows."""
    P, R = batch.prompt_len, batch.response_mask.shape[1]
    if not packs_exactly(model, forward):
        return forward(batch.sequences, batch.attention_mask, batch.position_ids())[:, P - 1 : -1]
    ids, positions, starts = packed_layout(batch)
    out = forward(ids, None, positions).flatten(0, 1)
    # Row i's first response token is predicted at its last prompt token.
    first = starts + batch.attention_mask[:, :P].sum(-1) - 1
    index = first[:, None] + torch.arange(R, device=first.device)
    return out[torch.where(batch.response_mask.bool(), index, 0)]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the row indices that share each packed row of ``capacity`` tokens."""
    packed, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, room in enumerate(free) if lengths[i] <= room), None)
        if slot is None:
            packed.append([i])
            free.append(capacity - lengths[i])
        else:
            packed[slot].append(i)
            free[slot] -= lengths[i]
    return packed


def packed_layout(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids ``[N, C]``, position ids ``[N, C]``, where each row starts in the flattened
    ``[N * C]``) of the batch's real tokens packed into N rows as wide as its longest sequence.
    One row holding every sequence would cost attention quadratic in the whole batch's token
    count; rows of the longest sequence's width cost no more attention than the padded batch and
    compute almost no padding. Tail positions are 0, which starts a new sequence: real tokens
    never attend to them."""
    lengths = batch.attention_mask.sum(-1)
    capacity = int(lengths.max())
    packed = pack_rows(lengths.tolist(), capacity)
    starts = torch.empty_like(lengths)
    for b, rows in enumerate(packed):
        offsets = torch.tensor([0, *lengths[rows].tolist()]).cumsum(0)[:-1]
        starts[rows] = b * capacity + offsets
    real = batch.attention_mask.bool()
    # Destination of every real token (row-major, so each row's tokens are contiguous).
    row_of_token = torch.repeat_interleave(torch.arange(batch.size, device=lengths.device), lengths)
    within_row = torch.arange(len(row_of_token), device=lengths.device) - (lengths.cumsum(0) - lengths)[row_of_token]
    dest = starts[row_of_token] + within_row
    ids = batch.sequences.new_zeros(len(packed) * capacity)
    positions = torch.zeros_like(ids)
    ids[dest] = batch.sequences[real]
    positions[dest] = batch.position_ids()[real]
    return ids.view(len(packed), capacity), positions.view(len(packed), capacity), starts


def packs_exactly(model, forward) -> bool:
    """Whether ``model`` computes packed sequences as it computes them padded: attention must read
    the sequence boundaries from the position ids when no mask is given (transformers does for
    Llama-like models with sdpa, eager and flash attention; custom code may not). Checked once per
    model on a two-sequence probe; ``disable_packing`` turns it off."""
    known = getattr(model, "_rlhf_ray_packs", None)
    if known is None:
        probe = RolloutBatch.from_token_lists([[1, 2, 3, 4, 5], [6, 7]], [[8, 9], [1, 2, 3]], pad_id=0)
        real = probe.attention_mask.bool()
        with torch.no_grad():
            padded = forward(probe.sequences, probe.attention_mask, probe.position_ids())[real].float()
            packed = forward(probe.sequences[real][None], None, probe.position_ids()[real][None])[0].float()
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2  # half precision: looser
        known = bool(torch.allclose(packed, padded, atol=tol * max(1.0, padded.abs().max().item()), rtol=0))
        model._rlhf_ray_packs = known
    return known


def disable_packing(model) -> None:
    """Forward passes of ``model`` run over padded rows from now on (for comparisons)."""
    model._rlhf_ray_packs = False


def _lm_forward(model):
    def forward(ids, mask, pos):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

    return forward


def _value_forward(value_model):
    def forward(ids, mask, pos):
        return value_model(input_ids=ids, attention_mask=mask, position_ids=pos)

    return forward


def response_logits(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token: ``[B, R, V]``, divided by the sampling temperature
    so log-probs match those of the distribution vLLM sampled from."""
    logits = _response_outputs(_lm_forward(model), model, batch).float()
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False):
    logits = response_logits(model, batch, temperature)
    logprobs = token_logprobs(logits, batch.responses) * batch.response_mask
    if not with_entropy:
        return logprobs
    return logprobs, entropy_from_logits(logits) * batch.response_mask


def sequence_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """Each row's log-likelihood of its whole response (its tokens' log-probs summed): ``[B]``,
    DPO's sequence log-probs."""
    return response_logprobs(model, batch).sum(-1)  # padding is already 0


def response_values(value_model, batch: RolloutBatch) -> torch.Tensor:
    """Values of the states before each response token: ``[B, R]``."""
    return _response_outputs(_value_forward(value_model), value_model, batch).float() * batch.response_mask


def device_of(model) -> torch.device:
    """Where ``model``'s weights live (its first parameter's device)."""
    return next(model.parameters()).device


def _by_sorted_micro_batches(forward, batch: RolloutBatch, micro_batch_size: int,
                             device: torch.device) -> list[torch.Tensor]:
    """``forward`` (a tuple of ``[b, r]`` per-token or ``[b]`` per-sequence tensors) over
    length-sorted, padding-trimmed micro-batches, put back in row order: per-token outputs are
    ``[B, R]`` with zeros past each micro-batch's width, as the full-width pass gives on padding.
    Each micro-batch goes to ``device`` (the model's) and each answer comes back to host memory:
    results travel to a driver that may have no accelerator at all."""
    outputs: list[torch.Tensor] = []
    for rows, mb in batch.length_sorted_micro_batches(micro_batch_size):
        for k, part in enumerate(forward(mb.to(device))):
            part = part.cpu()
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
        lambda mb: response_logprobs(model, mb, temperature, with_entropy=True), batch, micro_batch_size,
        device_of(model))
    return logprobs, entropy


@torch.no_grad()
def batched_sequence_logprobs(model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    """:func:`sequence_logprobs` ``[B]`` computed in micro-batches without gradients."""
    return _by_sorted_micro_batches(lambda mb: (sequence_logprobs(model, mb),), batch, micro_batch_size,
                                    device_of(model))[0]


@torch.no_grad()
def batched_values(value_model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    return _by_sorted_micro_batches(lambda mb: (response_values(value_model, mb),), batch, micro_batch_size,
                                    device_of(value_model))[0]


@torch.no_grad()
def batched_scores(reward_model, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    """One scalar per row ``[B]`` from a ``RewardModel`` (read at each row's last real token)."""
    return _by_sorted_micro_batches(
        lambda mb: (reward_model(input_ids=mb.sequences, attention_mask=mb.attention_mask,
                                 position_ids=mb.position_ids()).float(),),
        batch, micro_batch_size, device_of(reward_model))[0]
