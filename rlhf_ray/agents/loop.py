"""The multi-turn rollout: many trajectories advancing independently through generation, tool
calls and the environment's replies.

Trajectories ready for their next turn are sent to the engines together (split over them, so
vLLM batches them); the others are waiting on tools meanwhile, in the tool processes. Whatever
finishes first, a generation or a tool call, is handled first: a trajectory whose tool is slow
holds up no other one. The sampler is anything with ``engines`` (how many calls to split a batch
into) and ``submit(prompt_ids, spec) -> Future[list[Generation]]``: the rollout pool's engines
(``rlhf_ray.actors.rollout_pool.PoolSampler``) or one engine in this process (``EngineSampler``).
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from rlhf_ray.agents.env import Environment
from rlhf_ray.agents.runner import TIMEOUT, ToolResult, ToolRunner
from rlhf_ray.agents.tools import ToolCall, parse_tool_calls
from rlhf_ray.agents.trajectory import DONE, MAX_TOKENS, MAX_TURNS, Limits, Trajectory
from rlhf_ray.engines.sampling import Generation, SamplingSpec

BAD_CALL = "bad_call"  # Turn.error of a tool call that could not be parsed


class EngineSampler:
    """One engine of this process (``VLLMEngine`` or ``HFEngine``), called from one thread."""

    engines = 1

    def __init__(self, engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="engine")

    def submit(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Future:
        return self._thread.submit(self.engine.generate, prompt_ids, spec)


@dataclass
class RolloutStats:
    """What the iteration's multi-turn rollout did, for ``metrics.jsonl``."""

    finish: Counter = field(default_factory=Counter)
    tool_calls: int = 0
    tool_errors: Counter = field(default_factory=Counter)  # by ToolResult.error or BAD_CALL
    turns: list[int] = field(default_factory=list)
    generated_tokens: int = 0
    observed_tokens: int = 0
    generate_calls: int = 0

    def add(self, trajectory: Trajectory) -> None:
        self.finish[trajectory.finish] += 1
        self.turns.append(trajectory.policy_turns)
        self.generated_tokens += trajectory.generated_tokens
        self.observed_tokens += trajectory.observed_tokens

    def metrics(self) -> dict[str, float]:
        n = max(1, len(self.turns))
        return {"agent/turns_mean": sum(self.turns) / n, "agent/turns_max": max(self.turns, default=0),
                "agent/tool_calls": self.tool_calls, "agent/tool_calls_per_trajectory": self.tool_calls / n,
                "agent/tool_errors": sum(self.tool_errors.values()), "agent/tool_timeouts": self.tool_errors[TIMEOUT],
                "agent/bad_tool_calls": self.tool_errors[BAD_CALL],
                "agent/generated_tokens": self.generated_tokens, "agent/observed_tokens": self.observed_tokens,
                "agent/generate_calls": self.generate_calls,
                **{f"agent/finish_{k}": v / n for k, v in sorted(self.finish.items())}}


class AgentRollout:
    def __init__(self, env_cls: type[Environment], turn_format, tokenizer, runner: ToolRunner, limits: Limits,
                 call_tokens: int = 4096):
        """``turn_format``: ``rlhf_ray.agents.render``'s format for ``tokenizer``; ``runner`` runs the
        tools of ``env_cls`` (the same list). ``call_tokens``: the most prompt tokens one engine call
        carries, so its prompts are prefilled in one engine step (vLLM's default batch budget): a
        seeded request whose prefill vLLM splits over steps crashes vLLM's CPU backend (0.32:
        "CPU Generator does not use offset"), and multi-turn prompts grow long."""
        self.env_cls, self.format, self.tokenizer = env_cls, turn_format, tokenizer
        self.runner, self.limits, self.call_tokens = runner, limits, call_tokens
        self.tool_names = set(runner.tools)
        self.schemas = [t.schema() for t in env_cls.tools]

    def run(self, rows: list[dict], samples_per_prompt: int, spec: SamplingSpec, sampler) -> tuple[list[Trajectory],
                                                                                                   RolloutStats]:
        """``samples_per_prompt`` trajectories per row, row-major, each to its end; ``spec`` gives
        temperature, top-p, stop tokens and the base seed (``max_new_tokens`` and ``n`` are the
        loop's: per turn, per trajectory)."""
        stats, envs, trajectories = RolloutStats(), {}, []
        for i, row in enumerate(rows):
            for _ in range(samples_per_prompt):
                env = self.env_cls()
                trajectory = Trajectory(i, self.format.prompt_ids(env.reset(row), self.schemas))
                envs[id(trajectory)] = env
                trajectories.append(trajectory)
        ready, pending = list(trajectories), {}  # pending: Future -> ("generate", [trajectories]) | ("tool", trajectory)
        waiting: dict[int, list] = {}  # id(trajectory) -> its calls as (tool name, future or result), in call order
        while ready or pending:
            if ready:
                self._generate(ready, spec, sampler, pending, stats)
                ready = []
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                kind, what = pending.pop(future)
                if kind == "generate":
                    for trajectory, generation in zip(what, future.result()):
                        ready += self._after_generation(trajectory, generation, envs[id(trajectory)], pending,
                                                        waiting, stats)
                # The last of a turn's calls to finish hands them all on (several may finish at once).
                elif id(what) in waiting and all(not isinstance(r, Future) or r.done() for _, r in waiting[id(what)]):
                    ready += self._tool_results(what, waiting.pop(id(what)), stats)
        for trajectory in trajectories:
            stats.add(trajectory)
        return trajectories, stats

    def _generate(self, ready: list[Trajectory], spec: SamplingSpec, sampler, pending: dict,
                  stats: RolloutStats) -> None:
        """One engine call per group of trajectories with the same room left, split over the engines
        and cut where its prompts would pass ``call_tokens``."""
        by_room: dict[int, list[Trajectory]] = {}
        for trajectory in ready:
            by_room.setdefault(trajectory.room(self.limits), []).append(trajectory)
        for room, group in by_room.items():
            size = math.ceil(len(group) / sampler.engines)
            for part in self._within_budget([group[start: start + size] for start in range(0, len(group), size)]):
                seed = None if spec.seed is None else spec.seed + stats.generate_calls * 10_007
                call = replace(spec, n=1, max_new_tokens=room, seed=seed)
                pending[sampler.submit([t.tokens for t in part], call)] = ("generate", part)
                stats.generate_calls += 1

    def _within_budget(self, parts: list[list[Trajectory]]) -> list[list[Trajectory]]:
        """``parts`` cut into consecutive runs of at most ``call_tokens`` prompt tokens (a longer
        prompt goes alone)."""
        out = []
        for part in parts:
            run, tokens = [], 0
            for trajectory in part:
                if run and tokens + len(trajectory.tokens) > self.call_tokens:
                    out.append(run)
                    run, tokens = [], 0
                run.append(trajectory)
                tokens += len(trajectory.tokens)
            out.append(run)
        return out

    def _after_generation(self, trajectory: Trajectory, generation: Generation, env: Environment, pending: dict,
                          waiting: dict, stats: RolloutStats) -> list[Trajectory]:
        """Appends the policy's turn and starts what follows it; returns the trajectory if it is
        ready for its next turn already."""
        text = self.tokenizer.decode(generation.response_ids, skip_special_tokens=True)
        trajectory.add_generation(generation.response_ids, generation.logprobs, text)
        if generation.finish_reason == "length":  # cut mid-message: nothing to act on
            trajectory.truncated = True
            trajectory.end(MAX_TOKENS)
            return []
        calls = parse_tool_calls(text, self.tool_names)
        last_turn = trajectory.policy_turns >= self.limits.max_turns
        if calls:
            if last_turn:  # no turn left to read the results in
                trajectory.end(MAX_TURNS)
                return []
            stats.tool_calls += len(calls)
            started = [(c.name, self.runner.submit(c)) if isinstance(c, ToolCall)
                       else ("", ToolResult(f"error: {c.error}", BAD_CALL)) for c in calls]
            for _, result in started:
                if isinstance(result, Future):
                    pending[result] = ("tool", trajectory)
            if not any(isinstance(r, Future) for _, r in started):  # only unparsable calls: answered now
                return self._tool_results(trajectory, started, stats)
            waiting[id(trajectory)] = started
            return []
        step = env.step(text)
        if step.reward is not None:
            trajectory.reward = step.reward
        if step.done or last_turn:
            trajectory.end(DONE if step.done else MAX_TURNS)
            return []
        return self._observe(trajectory, [{"role": "user", "content": step.observation}], "user")

    def _tool_results(self, trajectory: Trajectory, calls: list[tuple[str, Future | ToolResult]],
                      stats: RolloutStats) -> list[Trajectory]:
        """The results of a turn's tool calls ((tool name, result) in call order), as one observation."""
        results = [(name, r.result() if isinstance(r, Future) else r) for name, r in calls]
        errors = [r.error for _, r in results if r.error]
        stats.tool_errors.update(errors)
        return self._observe(trajectory, [{"role": "tool", "name": name, "content": r.content} for name, r in results],
                             "tool", tool=",".join(name for name, _ in results), error=",".join(errors))

    def _observe(self, trajectory: Trajectory, messages: list[dict], role: str, tool: str = "",
                 error: str = "") -> list[Trajectory]:
        """Appends what came back and the next generation prompt, if the policy then has room to answer."""
        last = trajectory.turns[-1]
        ids = self.format.observation_ids(messages, trajectory.response_ids[last.start: last.end])
        if len(trajectory.response_ids) + len(ids) >= self.limits.max_tokens:
            trajectory.end(MAX_TOKENS)
            return []
        trajectory.add_observation(ids, role, self.tokenizer.decode(ids, skip_special_tokens=True), tool, error)
        return [trajectory]
