"""Packed forward passes and length-sorted, padding-trimmed micro-batches give the padded
full-width computation's numbers: log-probs, entropy, values, reward scores and the PPO loss with
its gradients (pure torch, no Ray)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray import algo
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring


@pytest.fixture(scope="module")
def uneven_batch(tiny_model_dir):
    """Prompts of 1..13 tokens, responses of 0..23 tokens: most of the padded batch is padding."""
    g = torch.Generator().manual_seed(0)
    prompt_lens, response_lens = [1, 13, 2, 7, 12, 3, 1, 9], [23, 0, 1, 17, 2, 23, 5, 11]
    prompts = [torch.randint(3, 30, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(3, 30, (n,), generator=g).tolist() for n in response_lens]
    batch = RolloutBatch.from_token_lists(prompts, responses, pad_id=0)
    waste = 1 - batch.attention_mask.float().mean().item()
    assert waste > 0.4, waste
    return batch


def test_trimmed_micro_batches_shed_padding_and_cover_every_row(uneven_batch):
    parts = uneven_batch.length_sorted_micro_batches(3)
    assert len(parts) == 3  # ceil(8 / 3), as unsorted slicing gives
    assert sorted(torch.cat([rows for rows, _ in parts]).tolist()) == list(range(8))
    positions = sum(mb.sequences.numel() for _, mb in parts)
    unsorted = sum(uneven_batch.select(slice(i, i + 3)).trimmed().sequences.numel() for i in range(0, 8, 3))
    assert positions < unsorted < uneven_batch.sequences.numel()
    for rows, mb in parts:
        assert mb.attention_mask.sum() == uneven_batch.attention_mask[rows].sum()  # no real token lost
        assert mb.attention_mask[:, 0].any() and mb.response_mask[:, -1].any()  # no all-padding edge column


def _twins(load):
    """Two copies of the same model: one that packs (it passes the probe), one kept padded."""
    torch.manual_seed(0)
    packed = load().eval()
    torch.manual_seed(0)
    padded = load().eval()
    scoring.disable_packing(padded)
    return packed, padded


def test_packed_sorted_trimmed_scoring_equals_the_padded_pass(tiny_model_dir, uneven_batch):
    from rlhf_ray.models.heads import RewardModel, ValueModel
    from rlhf_ray.models.loading import load_causal_lm

    policy, padded_policy = _twins(lambda: load_causal_lm(tiny_model_dir))
    lp, ent = scoring.batched_logprobs(policy, uneven_batch, 3, temperature=0.7)
    assert policy._rlhf_ray_packs  # the probe found packing exact for the tiny Llama (sdpa)
    with torch.no_grad():
        ref_lp, ref_ent = scoring.response_logprobs(padded_policy, uneven_batch, 0.7, with_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)

    critic, padded_critic = _twins(lambda: ValueModel.from_base(tiny_model_dir))
    with torch.no_grad():
        ref_values = scoring.response_values(padded_critic, uneven_batch)
    torch.testing.assert_close(scoring.batched_values(critic, uneven_batch, 3), ref_values, atol=1e-5, rtol=1e-5)
    assert critic._rlhf_ray_packs

    reward = RewardModel.from_base(tiny_model_dir).eval()
    with torch.no_grad():
        ref_scores = reward(input_ids=uneven_batch.sequences, attention_mask=uneven_batch.attention_mask)
    torch.testing.assert_close(scoring.batched_scores(reward, uneven_batch, 3), ref_scores, atol=1e-5, rtol=1e-5)


def test_the_probe_refuses_packing_when_attention_ignores_sequence_boundaries(tiny_model_dir):
    from rlhf_ray.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()

    def full_attention(ids, mask, pos):  # a model that lets every token see the whole packed row
        mask = torch.ones_like(ids) if mask is None else mask
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    assert not scoring.packs_exactly(model, full_attention)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_trimmed_training_micro_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, uneven_batch, agg):
    from rlhf_ray.models.loading import load_causal_lm

    policy, padded_policy = _twins(lambda: load_causal_lm(tiny_model_dir).train())
    mask = uneven_batch.response_mask
    old = torch.randn(mask.shape) * mask - 2.0
    batch = uneven_batch.with_extras(old_logprobs=old, advantages=torch.randn(mask.shape), rank=torch.arange(8.0))

    def loss_and_grads(model, mb: RolloutBatch):
        model.zero_grad()
        logprobs = scoring.response_logprobs(model, mb)
        loss = algo.ppo_policy_loss(logprobs, mb.extras["old_logprobs"], mb.extras["advantages"],
                                    mb.response_mask, 0.2, agg).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    # Rows 2, 4, 6, 7: widest prompt 12 of 13, widest response 11 of 23, so both sides get cut.
    half = batch.select(torch.tensor([2, 4, 6, 7]))
    trimmed = half.trimmed()
    assert (trimmed.prompt_len, trimmed.response_mask.shape[1]) == (12, 11)
    assert trimmed.extras["old_logprobs"].shape == (4, 11)
    assert torch.equal(trimmed.extras["rank"], half.extras["rank"])  # per-sequence extras kept whole
    for mb in (batch, half):
        loss, grads = loss_and_grads(padded_policy, mb)
        loss_t, grads_t = loss_and_grads(policy, mb.trimmed())
        torch.testing.assert_close(loss_t, loss, atol=1e-5, rtol=1e-5)
        for g, g_t in zip(grads, grads_t):
            torch.testing.assert_close(g_t, g, atol=1e-5, rtol=1e-4)
    assert policy._rlhf_ray_packs


def test_first_fit_decreasing_fills_rows_without_overflowing_them():
    lengths = [10, 3, 7, 3, 1, 2, 9, 5]
    packed = scoring.pack_rows(lengths, 10)
    assert sorted(i for row in packed for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for row in packed)
    assert len(packed) == 4  # 40 tokens in rows of 10: nothing wasted here


def test_packed_rows_are_as_wide_as_the_longest_sequence_and_hold_every_real_token(uneven_batch):
    lengths = uneven_batch.attention_mask.sum(-1)
    ids, positions, starts = scoring.packed_layout(uneven_batch)
    width = int(lengths.max())
    assert ids.shape[1] == width and ids.shape[0] < uneven_batch.size  # short rows share packed rows
    assert ids.numel() < uneven_batch.sequences.numel()
    real = uneven_batch.attention_mask.bool()
    for i in range(uneven_batch.size):
        n, s = int(lengths[i]), int(starts[i])
        assert s // width == (s + n - 1) // width  # a sequence never straddles two packed rows
        assert ids.flatten()[s : s + n].tolist() == uneven_batch.sequences[i][real[i]].tolist()
        assert positions.flatten()[s : s + n].tolist() == list(range(n))


def test_packing_keeps_attention_within_the_padded_batch_s_cost(tiny_model_dir):
    """Many same-length rows: one packed row of all of them would cost attention quadratic in the
    whole batch; rows as wide as the longest sequence cost what the padded batch costs."""
    from rlhf_ray.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    batch = RolloutBatch.from_token_lists([[5, 6, 7]] * 16, [[8, 9, 10, 11]] * 16, pad_id=0)
    shapes = []
    forward = scoring._lm_forward(model)

    def recording(ids, mask, pos):
        shapes.append(tuple(ids.shape))
        return forward(ids, mask, pos)

    assert scoring.packs_exactly(model, recording)
    shapes.clear()
    with torch.no_grad():
        packed = scoring._response_outputs(recording, model, batch)
        padded = forward(batch.sequences, batch.attention_mask, batch.position_ids())[:, 2:-1]
    assert shapes == [(16, 7)]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_a_batch_moves_to_the_model_device_whole_and_answers_come_back_to_the_host(tiny_model_dir, uneven_batch):
    """The GPU path's two moves, checked where CPU allows: a batch (extras included) goes to
    another device whole (``meta`` here: shapes without data), and the scoring passes hand their
    answers back in host memory, in batch order, whatever device the model is on."""
    from transformers import AutoModelForCausalLM

    batch = uneven_batch.with_extras(advantages=torch.ones_like(uneven_batch.response_mask))
    moved = batch.to("meta")
    tensors = [moved.sequences, moved.attention_mask, moved.response_mask, *moved.extras.values()]
    assert all(t.device.type == "meta" for t in tensors) and moved.prompt_len == batch.prompt_len
    assert batch.to("cpu") is batch  # already there: no copy
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert scoring.device_of(model) == torch.device("cpu")
    logprobs, entropy = scoring.batched_logprobs(model, batch, 4)
    assert logprobs.device.type == entropy.device.type == "cpu" and logprobs.shape == batch.response_mask.shape
