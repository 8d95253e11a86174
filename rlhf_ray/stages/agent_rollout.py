"""Multi-turn rollouts in the PPO loop (``agent.env``): the generate phase asks the rollout pool's
engines for trajectories instead of single responses, and this module turns them into what the
rest of the iteration takes: the batch (observed tokens masked out of every loss), rewards (the
environment's where it gave one, else the run's reward sources on the whole conversation),
metrics and ``samples.jsonl`` rows with each turn.
"""

from __future__ import annotations

import torch

from rlhf_ray.agents import Limits, ToolRunner, Trajectory, load_environment
from rlhf_ray.agents.loop import AgentRollout, RolloutStats
from rlhf_ray.agents.render import turn_format
from rlhf_ray.config import RunConfig
from rlhf_ray.data.formats import row_columns
from rlhf_ray.engines.sampling import SamplingSpec
from rlhf_ray.errors import BadInputError
from rlhf_ray.stages import prepare as prep
from rlhf_ray.tasks import ENVIRONMENTS


def environment_class(cfg: RunConfig):
    """``agent.env``'s class, or ``BadInputError`` naming the key (before any actor starts)."""
    name = cfg.agent.env
    if name == "task":
        name = ENVIRONMENTS.get(cfg.data.task, "")
        if not name:
            raise BadInputError(f"agent.env: task: data.task {cfg.data.task!r} has no environment; tasks with one: "
                                f"{', '.join(ENVIRONMENTS)}")
    try:
        return load_environment(name)
    except (ValueError, TypeError) as e:
        raise BadInputError(str(e)) from None


class MultiTurnRollouts:
    def __init__(self, cfg: RunConfig, tokenizer) -> None:
        ag = cfg.agent
        env_cls = environment_class(cfg)
        try:
            self.runner = ToolRunner(env_cls.tools, ag.tool_workers, ag.tool_timeout_s, ag.max_tool_output_chars)
        except ValueError as e:
            raise BadInputError(f"agent.env: {e}") from None
        self.pad_id = tokenizer.pad_token_id
        self.rollout = AgentRollout(env_cls, turn_format(tokenizer), tokenizer, self.runner,
                                    Limits(ag.max_turns, ag.max_tokens, cfg.rollout.max_new_tokens))
        self.stats, self.retried_calls, self.env_metrics = RolloutStats(), 0, {}

    def run(self, pool, prompts: list[str], spec: SamplingSpec, iteration: int) -> list[Trajectory]:
        """``spec.n`` trajectories per prompt, prompt-major, on the pool's engines; engines that died
        meanwhile are replaced (or retired) afterwards, as after a single-turn generate phase."""
        trajectories, self.stats, self.retried_calls = self.sample(pool, prompts, spec, iteration)
        pool.probe = prep.batch_from_trajectories(trajectories[:4], self.pad_id)[0]  # parity probe of new engines
        return trajectories

    def sample(self, pool, prompts: list[str], spec: SamplingSpec, iteration: int) -> tuple[list[Trajectory],
                                                                                            RolloutStats, int]:
        """``run`` without keeping anything for the iteration's record (the held-out evaluation's
        trajectories): the trajectories, their stats and the engine calls sampled again."""
        sampler = pool.sampler()
        # The environment's reset gets the whole data row: the prompt and every other column.
        rows = [{**row_columns(p), "prompt": p} for p in prompts]
        trajectories, stats = self.rollout.run(rows, spec.n, spec, sampler)
        pool.lost(sampler.dead, iteration)
        return trajectories, stats, sampler.retried_calls

    def rewards(self, rewards: dict[str, torch.Tensor], trajectories: list[Trajectory]) -> dict[str, torch.Tensor]:
        """The reward sources' ``rewards`` with the environment's reward as the score wherever it
        gave one (a trajectory cut short by a limit may have none)."""
        given = torch.tensor([float("nan") if t.reward is None else t.reward for t in trajectories])
        has = ~given.isnan()
        self.env_metrics = {"agent/env_rewarded_fraction": has.float().mean().item(),
                            **({"agent/env_reward_mean": given[has].mean().item()} if has.any() else {})}
        return {**rewards, "score": torch.where(has, given, rewards["score"])}

    def metrics(self) -> dict[str, float]:
        return {**self.stats.metrics(), **self.env_metrics, "agent/retried_calls": self.retried_calls}

    @staticmethod
    def with_turns(rows: list[dict], trajectories: list[Trajectory]) -> list[dict]:
        """``samples.jsonl`` rows with each trajectory's turns (the viewer shows them one by one)."""
        return [{**row, **t.as_row()} for row, t in zip(rows, trajectories)]

    def close(self) -> None:
        self.runner.close()
