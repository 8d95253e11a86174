"""The transformers rollout engine (``rollout.engine=hf``) on the tiny model: the same contract as
the vLLM engine (prompt-major samples, log-probs of the sampled distribution, finish reasons,
seeding) and a weight sync through the same transport. In this process, no Ray."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring
from rlhf_ray.engines.hf_engine import HFEngine
from rlhf_ray.engines.sampling import SamplingSpec

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(tiny_model_dir, seed=0)


def _learner_logprobs(model, gens, temperature=1.0):
    batch = RolloutBatch.from_token_lists([g.prompt_ids for g in gens], [g.response_ids for g in gens], pad_id=0)
    return scoring.response_logprobs(model, batch, temperature), batch.response_mask


def test_samples_are_prompt_major_seeded_and_scored_as_sampled(engine):
    spec = SamplingSpec(temperature=0.7, max_new_tokens=10, n=3, seed=5, stop_token_ids=(engine.eos_id,))
    gens = engine.generate(PROMPTS, spec)
    assert [g.prompt_index for g in gens] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(g.prompt_ids == PROMPTS[g.prompt_index] for g in gens)
    assert [g.response_ids for g in engine.generate(PROMPTS, spec)] == [g.response_ids for g in gens]
    for g in gens:
        assert 1 <= len(g.response_ids) == len(g.logprobs) <= 10
        stopped = g.response_ids[-1] == engine.eos_id
        assert g.finish_reason == ("stop" if stopped else "length")
        assert engine.eos_id not in g.response_ids[:-1]
    # The log-probs are those of the distribution sampled from: logits / temperature.
    with torch.no_grad():
        lp, _ = _learner_logprobs(engine.model, gens, temperature=0.7)
    for i, g in enumerate(gens):
        assert torch.allclose(lp[i, : len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-4)
    # score() gives temperature-1 log-probs of given tokens, as the parity check compares them.
    scored = engine.score([g.prompt_ids for g in gens], [g.response_ids for g in gens])
    with torch.no_grad():
        lp1, _ = _learner_logprobs(engine.model, gens)
    for i, s in enumerate(scored):
        assert torch.allclose(lp1[i, : len(s)], torch.tensor(s), atol=1e-4)


def test_min_new_tokens_holds_every_stop_back_until_the_floor(engine):
    """With every token but one a stop token, responses end within a few tokens; the floor holds
    every stop back for its first 5 tokens."""
    stops = tuple(t for t in range(engine.model.config.vocab_size) if t != 10)
    spec = SamplingSpec(max_new_tokens=10, n=2, seed=1, stop_token_ids=stops)
    assert max(len(g.response_ids) for g in engine.generate(PROMPTS, spec)) < 5
    floored = engine.generate(PROMPTS, replace(spec, min_new_tokens=5))
    assert all(len(g.response_ids) > 5 and g.response_ids[:5] == [10] * 5 for g in floored)


def test_greedy_matches_transformers_generate(engine):
    greedy = engine.greedy(PROMPTS, 8)
    for prompt, tokens in zip(PROMPTS, greedy):
        out = engine.model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                    eos_token_id=engine.eos_id, pad_token_id=engine.pad_id)
        expected = out[0, len(prompt):].tolist()  # one prompt: no padding, ends at EOS or max_new_tokens
        assert tokens == expected and len(tokens) >= 1


def test_greedy_ends_at_a_stop_token(engine):
    """``rollout.stop`` tokens end greedy responses (eval) as EOS does, the stop token kept."""
    free = engine.greedy(PROMPTS[:1], 8)[0]
    stop = next(t for t in free[1:] if t != free[0])  # not the first token: something must come before
    stopped = engine.greedy(PROMPTS[:1], 8, stop_token_ids=(stop,))[0]
    assert stopped == free[: free.index(stop) + 1] and len(stopped) < len(free)


def test_weight_sync_replaces_every_weight(tiny_model_dir):
    """A sender broadcasts other weights over gloo; the engine's model then holds them exactly."""
    from rlhf_ray.ports import free_port
    from rlhf_ray.sync.manifest import build_manifest
    from rlhf_ray.sync.sender import WeightSender

    engine = HFEngine(tiny_model_dir, seed=0)
    new = {k: v + 0.5 for k, v in engine.model.state_dict().items()}
    manifest = build_manifest([(k, v.dtype, tuple(v.shape)) for k, v in new.items()], 1 << 16)
    port = free_port()
    sender = WeightSender()
    opened = threading.Thread(target=sender.open, args=("127.0.0.1", port, 2, "gloo"))
    opened.start()
    engine.join_weight_sync("127.0.0.1", port, 2, 1, "gloo")
    opened.join()
    sending = threading.Thread(target=sender.send, args=(iter(new.items()), manifest))
    sending.start()
    assert engine.receive_weights(manifest) == manifest["total_bytes"]
    sending.join()
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, new[name]), name
    # bf16 bytes to an fp32 engine: refused, nothing loaded, and the sender is not left hanging.
    bf16 = build_manifest([(k, v.dtype, tuple(v.shape)) for k, v in new.items()], 1 << 16, wire_dtype="bfloat16")
    sending = threading.Thread(target=sender.send, args=(iter({k: v + 1 for k, v in new.items()}.items()), bf16))
    sending.start()
    with pytest.raises(ValueError, match="sends bfloat16 weights to an engine that computes in float32"):
        engine.receive_weights(bf16)
    sending.join(timeout=60)
    assert not sending.is_alive()
    sender.close()
    assert all(torch.equal(t, new[n]) for n, t in engine.model.state_dict().items())
