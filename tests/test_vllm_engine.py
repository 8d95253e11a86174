"""The vLLM rollout engine on the tiny model: generation, log-probs against HF, ordering, finish
reasons. One engine for the module, in this process (engines/ has no Ray)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf_ray.engines.sampling import SamplingSpec
from rlhf_ray.engines.vllm_engine import VLLMEngine

pytestmark = pytest.mark.slow

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)]


def test_generate_logprobs_match_hf(engine, hf_model):
    gens = engine.generate(PROMPTS, SamplingSpec(temperature=1.0, max_new_tokens=12, n=2, seed=3))
    assert len(gens) == 2 * len(PROMPTS)
    for g in gens:
        assert len(g.logprobs) == len(g.response_ids) > 0
        ref = hf_logprobs(hf_model, g.prompt_ids, g.response_ids)
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-3
    # score() recomputes the same numbers from the tokens alone.
    scored = engine.score([g.prompt_ids for g in gens], [g.response_ids for g in gens])
    for g, s in zip(gens, scored):
        assert max(abs(a - b) for a, b in zip(g.logprobs, s)) < 1e-3


def test_n_samples_are_prompt_major_and_seeded(engine):
    spec = SamplingSpec(temperature=1.0, max_new_tokens=8, n=3, seed=7)
    gens = engine.generate(PROMPTS, spec)
    assert [g.prompt_index for g in gens] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(g.prompt_ids == PROMPTS[g.prompt_index] for g in gens)
    assert [g.response_ids for g in engine.generate(PROMPTS, spec)] == [g.response_ids for g in gens]
    # Distinct streams per (prompt, sample): no two rows of a random model sample the same text.
    assert len({tuple(g.response_ids) for g in gens}) == len(gens)


def test_seeded_sampling_over_more_prefill_than_one_step_runs_in_step_sized_calls(engine):
    """vLLM 0.32's CPU backend crashes ("CPU Generator does not use offset") when it splits a seeded
    request's prefill over steps: prompts go in calls whose prefill fits one step, and each prompt
    keeps its seed, so a prompt's samples are those it gets alone."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    n, prompt = 4, [1, *(10 + i % 20 for i in range(199))]
    prompts = [prompt] * (budget // (len(prompt) * n) + 2)  # more than one step's prefill in all
    calls = engine._prefill_sized_calls(prompts, n)
    assert len(calls) >= 2 and [i for c in calls for i in c] == list(range(len(prompts)))
    assert all(len(c) * len(prompt) * n <= budget for c in calls)
    spec = SamplingSpec(temperature=1.0, max_new_tokens=4, n=n, seed=11)
    gens = engine.generate(prompts, spec)
    assert len(gens) == n * len(prompts)
    last = len(prompts) - 1  # in the last call: its seed is still its index's
    alone = engine.generate([prompt], replace(spec, seed=spec.seed + last * n))
    assert [g.response_ids for g in gens[last * n:]] == [g.response_ids for g in alone]


def test_finish_reasons(engine):
    gens = engine.generate(PROMPTS, SamplingSpec(max_new_tokens=5, seed=0))
    assert all(g.finish_reason == "length" and len(g.response_ids) == 5 for g in gens)

    greedy = engine.greedy(PROMPTS[:1], 6)[0]
    stop = greedy[2]
    stopped = engine.generate(
        PROMPTS[:1], SamplingSpec(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,))
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == greedy[: greedy.index(stop) + 1]
    assert engine.greedy(PROMPTS[:1], 6, stop_token_ids=(stop,))[0] == stopped.response_ids


def test_min_new_tokens_holds_every_stop_back_until_the_floor(engine):
    """As the HF engine's twin test: with every token but one a stop token, only the floor makes
    responses longer than a few tokens."""
    stops = tuple(t for t in range(engine.llm.llm_engine.model_config.get_vocab_size()) if t != 10)
    spec = SamplingSpec(max_new_tokens=10, n=2, seed=1, stop_token_ids=stops)
    assert max(len(g.response_ids) for g in engine.generate(PROMPTS, spec)) < 5
    floored = engine.generate(PROMPTS, replace(spec, min_new_tokens=5))
    assert all(len(g.response_ids) > 5 and g.response_ids[:5] == [10] * 5 for g in floored)


def test_greedy_matches_hf_generate(engine, hf_model):
    out = engine.greedy(PROMPTS, 10)
    for prompt, tokens in zip(PROMPTS, out):
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
        assert tokens == ref.tolist()



def test_engine_is_not_pinned_to_one_core(engine):
    """vLLM's default binding pins every engine's worker to the same core; the platform turns it
    off so engines, learners and scorers share the cores Ray hands out. The model runs in this
    process (no worker process on CPU with one worker), so this process must keep its cores."""
    import os

    import psutil

    allowed = os.sched_getaffinity(os.getppid())
    assert os.sched_getaffinity(0) == allowed
    assert not [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")]
    assert len(engine.generate(PROMPTS[:1], SamplingSpec(temperature=1.0, max_new_tokens=4, n=1, seed=0))) == 1


def test_multi_turn_rollout_hands_the_learner_the_engines_tokens_position_for_position(engine, hf_model,
                                                                                      tiny_model_dir):
    """Trajectories through vLLM, turn after turn: the learner's batch row is the prompt, then each
    turn's tokens exactly as vLLM sampled them and as the environment's reply was encoded; the
    learner's log-probs of the generated tokens are vLLM's sampling log-probs."""
    from agent_helpers import MoreEnv, RecordingSampler

    from rlhf_ray.agents import Limits, ToolRunner
    from rlhf_ray.agents.loop import AgentRollout
    from rlhf_ray.agents.render import PlainFormat
    from rlhf_ray.engines import scoring
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.prepare import batch_from_trajectories

    tokenizer = load_tokenizer(tiny_model_dir)
    reply = PlainFormat(tokenizer).observation_ids([{"role": "user", "content": "more"}], [])
    sampler = RecordingSampler(engine)
    stop = tuple(range(2, 60))  # a random model's turns end within a few tokens: several turns fit
    with ToolRunner([]) as runner:
        trajectories, stats = AgentRollout(MoreEnv, PlainFormat(tokenizer), tokenizer, runner,
                                           Limits(max_turns=3, max_tokens=48, max_new_tokens=8)).run(
            [{"prompt": "12+7="}, {"prompt": "3+4="}], 2, SamplingSpec(seed=5, stop_token_ids=stop), sampler)
    assert stats.metrics()["agent/turns_mean"] > 1.5 and stats.observed_tokens > 0
    batch, logprobs, _ = batch_from_trajectories(trajectories, tokenizer.pad_token_id)
    for row, t in enumerate(trajectories):
        expected, generated = list(t.prompt_ids), []
        for turn in t.turns:
            if turn.role == "assistant":
                [made] = [g for g in sampler.outputs if g.prompt_ids == expected and
                          g.response_ids == t.response_ids[turn.start: turn.end]]
                expected += made.response_ids
                generated += [1] * len(made.response_ids)
            else:
                expected += reply
                generated += [0] * len(reply)
        assert batch.sequences[row][batch.attention_mask[row].bool()].tolist() == expected
        assert batch.response_mask[row, : len(generated)].tolist() == generated
    learner = scoring.response_logprobs(hf_model, batch)
    policy = batch.response_mask.bool()
    assert (learner - logprobs)[policy].abs().max() < 1e-3
