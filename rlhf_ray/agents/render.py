"""How messages become tokens in a trajectory: the first prompt, and after each policy turn the
observation (tool results, the environment's reply) together with the next generation prompt.

Only new messages are ever encoded; the policy's turns stay the tokens it generated.

- ``ChatTemplateFormat``: the tokenizer's chat template, tools announced through its ``tools``
  argument. An observation's tokens are what the template adds after a finished assistant turn:
  rendered behind a fixed stand-in conversation and cut out of it, then the rest of the
  template's end of the assistant turn that the policy did not generate itself (Qwen's newline
  after ``<|im_end|>``) is put in front.
- ``PlainFormat``: for tokenizers without a template (the tiny character model): the prompt
  as text, each tool result as ``<tool_response>...</tool_response>`` on its own line, an
  environment reply on its own line.

``demonstration`` lays out a written conversation (SFT's multi-turn demonstrations) with the same
format, so SFT sees exactly the tokens and the policy mask a rollout's trajectory would have.
"""

from __future__ import annotations

from rlhf_ray.agents.trajectory import Trajectory
from rlhf_ray.data.formats import ChatPrompt

# A stand-in assistant message: the template's text around it is what a real turn gets.
_STAND_IN = "\ue000"
_BASE = [{"role": "user", "content": "-"}, {"role": "assistant", "content": _STAND_IN}]


def _messages(opening: str | list[dict]) -> list[dict]:
    """The opening as messages. A prompt from a chat file (``ChatPrompt``) is the text its messages
    were already rendered to: its messages, not that text inside another user turn."""
    if isinstance(opening, ChatPrompt):
        return opening.messages
    return [{"role": "user", "content": opening}] if isinstance(opening, str) else opening


class PlainFormat:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt_ids(self, opening: str | list[dict], tools: list[dict]) -> list[int]:
        """The first prompt: the opening messages' contents, one per line (``tools`` are not
        announced: the plain format has no place for them; the demonstrations teach them)."""
        text = "\n".join(m["content"] for m in _messages(opening))
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def observation_ids(self, messages: list[dict], policy_ids: list[int]) -> list[int]:
        parts = [f"\n<tool_response>{m['content']}</tool_response>" if m["role"] == "tool" else f"\n{m['content']}"
                 for m in messages]
        return self.tokenizer("".join(parts) + "\n", add_special_tokens=False)["input_ids"]


class ChatTemplateFormat:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        before = self._render(_BASE, generation_prompt=False)
        # The template's end of an assistant turn (e.g. "<|im_end|>\n"): the policy generates
        # its first token (the end-of-turn token); the rest is observed.
        self.turn_end = before[before.index(_STAND_IN) + len(_STAND_IN):]
        self._before = before

    def _render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def prompt_ids(self, opening: str | list[dict], tools: list[dict]) -> list[int]:
        text = self._render(_messages(opening), generation_prompt=True, tools=tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def observation_ids(self, messages: list[dict], policy_ids: list[int]) -> list[int]:
        after = self._render(_BASE + messages, generation_prompt=True)
        if not after.startswith(self._before):
            raise ValueError("the chat template renders earlier turns differently once later ones follow; "
                             "observations cannot be appended token in, token out")
        generated_end = self.tokenizer.decode(policy_ids[-1:]) if policy_ids else ""
        rest_of_turn = (self.turn_end[len(generated_end):] if generated_end and self.turn_end.startswith(generated_end)
                        else self.turn_end)
        return self.tokenizer(rest_of_turn + after[len(self._before):], add_special_tokens=False)["input_ids"]


def turn_format(tokenizer) -> PlainFormat | ChatTemplateFormat:
    """The tokenizer's chat template where it has one, else the plain format."""
    return ChatTemplateFormat(tokenizer) if getattr(tokenizer, "chat_template", None) else PlainFormat(tokenizer)


def demonstration(layout: PlainFormat | ChatTemplateFormat, tokenizer, opening: str | list[dict],
                  turns: list[dict], tools: list[dict] | None = None) -> Trajectory:
    """A written conversation as the trajectory the rollout would have built of it: ``opening``
    as the first prompt; each assistant message of ``turns`` as the policy's turn, its text's
    tokens and the end token (EOS) the policy ends a turn with; each run of other messages (tool
    results, an environment's replies) as one observation, encoded by ``layout`` after the turn
    before it. Only the assistant turns are marked the policy's (``policy_mask``); the log-probs
    are 0 (nobody sampled them)."""
    if not turns or turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
        raise ValueError(f"a demonstration's turns must start and end with the assistant's, got "
                         f"{[m['role'] for m in turns]}")
    trajectory = Trajectory(0, layout.prompt_ids(opening, tools or []))
    observed: list[dict] = []
    for message in turns:
        if message["role"] != "assistant":
            observed.append(message)
            continue
        if observed:
            last = trajectory.turns[-1]
            ids = layout.observation_ids(observed, trajectory.response_ids[last.start: last.end])
            role = "tool" if all(m["role"] == "tool" for m in observed) else "user"
            trajectory.add_observation(ids, role, tokenizer.decode(ids, skip_special_tokens=True))
            observed = []
        ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        trajectory.add_generation(ids, [0.0] * len(ids), message["content"])
    return trajectory
