"""A multi-turn trajectory as one token sequence, built token in, token out.

The sequence is the first prompt followed by every turn's tokens in order: the policy's generated
tokens exactly as the engine sampled them (with their sampling log-probs), then the tokens of what
came back (tool results, the environment's reply) and the next generation prompt. Nothing is ever
re-tokenised: text is decoded from tokens for people and parsers, never encoded back into the
sequence. ``policy_mask`` marks the tokens the policy generated; only those are trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Why a trajectory ended.
DONE, MAX_TURNS, MAX_TOKENS = "done", "max_turns", "max_tokens"


@dataclass(frozen=True)
class Limits:
    """What one trajectory may take: policy turns, response tokens in all (generated and
    observed), tokens per policy turn."""

    max_turns: int = 4
    max_tokens: int = 256
    max_new_tokens: int = 64


@dataclass
class Turn:
    """One stretch of the response: ``tokens`` ``[start, end)`` (offsets into the response)."""

    role: str  # "assistant" (the policy), "tool" (a tool's result) or "user" (the environment's reply)
    text: str
    start: int
    end: int
    tool: str = ""  # tool turns: the tool's name ("" when the call could not be parsed)
    error: str = ""  # tool turns: why there was no result (ToolResult.error, or "bad_call")


@dataclass
class Trajectory:
    prompt_index: int  # the prompt (row) it answers, in the rollout batch
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)  # per response token: 1 if the policy generated it
    logprobs: list[float] = field(default_factory=list)  # per response token: its sampling log-prob (0 if observed)
    turns: list[Turn] = field(default_factory=list)
    reward: float | None = None  # the environment's; None: the run's reward sources score it
    finish: str = ""  # DONE, MAX_TURNS or MAX_TOKENS once ended
    truncated: bool = False  # the last policy turn ran out of tokens before its end token

    @property
    def ended(self) -> bool:
        return bool(self.finish)

    @property
    def tokens(self) -> list[int]:
        """The whole sequence so far: what the engine continues from next."""
        return self.prompt_ids + self.response_ids

    @property
    def policy_turns(self) -> int:
        return sum(t.role == "assistant" for t in self.turns)

    @property
    def generated_tokens(self) -> int:
        return sum(self.policy_mask)

    @property
    def observed_tokens(self) -> int:
        return len(self.policy_mask) - sum(self.policy_mask)

    def room(self, limits: Limits) -> int:
        """Tokens the next policy turn may generate."""
        return min(limits.max_new_tokens, limits.max_tokens - len(self.response_ids))

    def add_generation(self, ids: list[int], logprobs: list[float], text: str) -> None:
        """The policy's turn, its tokens exactly as sampled."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} generated tokens but {len(logprobs)} log-probs")
        self._append("assistant", ids, text, 1, logprobs)

    def add_observation(self, ids: list[int], role: str, text: str, tool: str = "", error: str = "") -> None:
        """Tokens the policy did not generate (a tool's result, the environment's reply, the
        template's turn markers): in the sequence, out of the loss."""
        self._append(role, ids, text, 0, [0.0] * len(ids), tool, error)

    def _append(self, role: str, ids: list[int], text: str, generated: int, logprobs: list[float],
                tool: str = "", error: str = "") -> None:
        start = len(self.response_ids)
        self.response_ids += ids
        self.policy_mask += [generated] * len(ids)
        self.logprobs += logprobs
        self.turns.append(Turn(role, text, start, start + len(ids), tool, error))

    def end(self, finish: str) -> None:
        self.finish = self.finish or finish

    def as_row(self) -> dict:
        """The trajectory for ``samples.jsonl`` and the viewer: each turn as text."""
        return {"turns": [{"role": t.role, "text": t.text, **({"tool": t.tool} if t.tool else {}),
                           **({"error": t.error} if t.error else {})} for t in self.turns],
                "finish": self.finish, "generated_tokens": self.generated_tokens,
                "observed_tokens": self.observed_tokens}
