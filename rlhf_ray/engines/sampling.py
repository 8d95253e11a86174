"""What every rollout engine speaks, vLLM or transformers: how to sample (``SamplingSpec``) and
what comes back (``Generation``), in token ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``n`` responses per prompt, at least ``min_new_tokens`` (end and stop tokens
    are not sampled before that) and at most ``max_new_tokens`` each; ``seed`` makes a call
    reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def to_vllm(self, prompt_index: int = 0):
        """vLLM seeds sample j of a request with seed + j; offsetting each prompt by n more gives
        every (prompt, sample) its own stream (one shared seed would correlate the prompts)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            min_tokens=self.min_new_tokens,
            stop_token_ids=list(self.stop_token_ids),
            seed=None if self.seed is None else self.seed + prompt_index * self.n,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,  # everyone downstream speaks token ids
        )


@dataclass
class Generation:
    """One sampled response to the prompt at ``prompt_index`` of the ``generate`` call."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    # Log-prob of each sampled token. In the default ``raw_logprobs`` mode these are of the model's
    # own distribution (temperature 1, before top-p): compare them with learner log-probs
    # computed at temperature 1.
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) or "length"
