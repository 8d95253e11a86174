"""What the multi-turn tests share: an environment that keeps the conversation going (a random
tiny model never calls a tool, but it answers), one that records the rows it is given, an engine
sampler that keeps what the engine returned, to compare trajectories with, and a scripted policy
(with the rollout pool's face) that answers as a script says."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from rlhf_ray.agents import Environment, Step
from rlhf_ray.agents.loop import EngineSampler
from rlhf_ray.engines.sampling import Generation


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


class ScriptedPolicy:
    """A stand-in for a policy that calls tools (a random tiny model never writes one): the reply
    to a prompt is ``script(prompt_text)``, tokenised, ended with EOS, each token at log-prob -0.5.
    Records when each call was answered."""

    engines = 2

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.answered, self.specs = tokenizer, script, [], []

    def submit(self, prompt_ids, spec):
        self.specs.append(spec)
        future = Future()
        generations = []
        for i, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            reply = self.tokenizer(self.script(text), add_special_tokens=False)["input_ids"] + [2]
            finish = "stop" if len(reply) <= spec.max_new_tokens else "length"
            reply = reply[: spec.max_new_tokens]
            generations += [Generation(i, list(ids), reply, [-0.5] * len(reply), finish)] * spec.n
        self.answered.append((time.monotonic(), [self.tokenizer.decode(ids) for ids in prompt_ids]))
        threading.Timer(0.01, future.set_result, [generations]).start()
        return future


class ScriptedPool:
    """The rollout pool as PPO's held-out evaluation uses it, answering with a scripted policy."""

    def __init__(self, policy):
        self.policy, self.lost_engines = policy, []

    def sampler(self):
        self.policy.dead, self.policy.retried_calls = [], 0
        return self.policy

    def lost(self, dead, iteration):
        self.lost_engines += dead

    def submit(self, prompts, ids, spec, version):
        return self.policy.submit(ids, spec)

    def finish(self, pending, iteration):
        return pending.result()


class RowRecordingEnv(Environment):
    """Ends every trajectory at once; keeps each row its ``reset`` got (in ``rows``, class-wide)."""

    rows: list[dict] = []  # noqa: RUF012 - shared on purpose: the rollout makes the instances

    def reset(self, row):
        RowRecordingEnv.rows.append(dict(row))
        return row["prompt"]

    def step(self, message):
        return Step(reward=0.0, done=True)
