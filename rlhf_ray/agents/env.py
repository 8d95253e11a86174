"""The environment API: what a user writes to put the policy in a multi-turn task.

A few lines make one (``agent.env: mypkg.envs:MyEnv`` in the config)::

    class MyEnv(Environment):
        tools = [Tool("calc", mypkg.tools.calc, "evaluates arithmetic", {...json schema...})]

        def reset(self, row):  # a dataset row -> the opening: a prompt text or chat messages
            self.question = row["prompt"]
            return self.question

        def step(self, message):  # the policy's message (one that calls no tool) -> Step
            return Step(reward=score(self.question, message), done=True)

One instance serves one trajectory (``reset`` once, then ``step`` per policy message). Tool calls
are the rollout's business, not the environment's: a policy message with ``<tool_call>`` tags is
answered with the tools' results and the policy goes on; ``step`` sees the messages that call no
tool. A ``Step`` without a reward leaves the score to the run's reward sources (rule functions,
reward models, an HTTP endpoint), which see the whole conversation after the prompt as the response.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from rlhf_ray.agents.tools import Tool


@dataclass(frozen=True)
class Step:
    observation: str = ""  # the environment's reply, shown to the policy as a user message ("" when done)
    reward: float | None = None  # None: scored by the run's reward sources
    done: bool = False


class Environment:
    tools: list[Tool] = []  # noqa: RUF012 (a class-level default users override with their list)

    def reset(self, row: dict) -> str | list[dict]:
        raise NotImplementedError

    def step(self, message: str) -> Step:
        """By default a message that calls no tool is the final answer, left to the reward sources."""
        return Step(done=True)


def load_environment(spec: str) -> type[Environment]:
    """The environment class named ``module:Class`` (``agent.env``); raises ``ValueError`` (or
    ``TypeError`` for something that is not an environment class) saying what is wrong."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"agent.env: {spec!r} is not module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"agent.env: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise TypeError(f"agent.env: {spec!r} is not a class with reset(row) and step(message)")
    return cls
