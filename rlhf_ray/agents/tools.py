"""Tools the policy may call: plain Python functions with a JSON-schema description, and the
parser of tool calls in the policy's text.

The call format is the one the Hermes and Qwen chat templates teach their models::

    <tool_call>{"name": "calc", "arguments": {"expr": "12*34"}}</tool_call>

one JSON object per tag pair, any number of pairs in a message. A tag pair whose content is not
such an object (bad JSON, no name, arguments not an object, an unknown tool) becomes a
``ToolCallError``: the policy is told what was wrong, as an observation, and the run goes on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """A function the policy may call by ``name`` with keyword ``arguments``. ``function`` must be
    importable by reference (a module-level function): it runs in a tool process, not here.
    ``parameters`` is the JSON schema of its arguments, as chat templates announce tools."""

    name: str
    function: Callable
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def schema(self) -> dict:
        """The OpenAI-style function description chat templates take in their ``tools`` argument."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallError:
    """A tag pair that is not a valid call; ``text`` is what stood between the tags."""

    text: str
    error: str


def parse_tool_calls(message: str, known: set[str] | None = None) -> list[ToolCall | ToolCallError]:
    """Every ``<tool_call>...</tool_call>`` of ``message`` in order (an unclosed last tag reaches
    the end of the message: the turn ran out of tokens mid-call). With ``known``, a call to a
    tool not in it is an error."""
    calls: list[ToolCall | ToolCallError] = []
    for match in _CALL.finditer(message):
        text = match.group(1).strip()
        if not match.group(0).endswith(CALL_CLOSE):
            calls.append(ToolCallError(text, f"unclosed {CALL_OPEN}"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            calls.append(ToolCallError(text, f"not JSON: {e.msg} at character {e.pos}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCallError(text, 'a tool call is {"name": ..., "arguments": {...}}'))
        elif not isinstance(obj.get("arguments", {}), dict):
            calls.append(ToolCallError(text, "arguments must be a JSON object"))
        elif known is not None and obj["name"] not in known:
            calls.append(ToolCallError(text, f"unknown tool {obj['name']!r}; tools: {', '.join(sorted(known))}"))
        else:
            calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
    return calls
