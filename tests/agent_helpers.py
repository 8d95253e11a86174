"""What the multi-turn tests share: an environment that keeps the conversation going (a random
tiny model never calls a tool, but it answers), and an engine sampler that keeps what the engine
returned, to compare trajectories with."""

from __future__ import annotations

from rlhf_ray.agents import Environment, Step
from rlhf_ray.agents.loop import EngineSampler


class MoreEnv(Environment):
    """Replies "more" to every message; rewards the share of digits in it (a signal a random policy can climb)."""

    def reset(self, row):
        return row["prompt"]

    def step(self, message):
        return Step(observation="more", reward=sum(c.isdigit() for c in message) / max(1, len(message)))


class RecordingSampler(EngineSampler):
    """An engine of this process whose every generation is kept in ``outputs``."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.outputs = []

    def submit(self, prompt_ids, spec):
        future = super().submit(prompt_ids, spec)
        future.add_done_callback(lambda f: self.outputs.extend(f.result()))
        return future
