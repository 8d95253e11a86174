"""Multi-turn rollouts with tools: environments, tools and their runner, and trajectories built
token in, token out (``docs/agents.md``). No Ray here: the rollout pool drives this from
``rlhf_ray.actors``, and every part runs and is tested in one process."""

from rlhf_ray.agents.env import Environment, Step, load_environment
from rlhf_ray.agents.runner import ToolResult, ToolRunner
from rlhf_ray.agents.tools import Tool, ToolCall, ToolCallError, parse_tool_calls
from rlhf_ray.agents.trajectory import Limits, Trajectory, Turn

__all__ = ["Environment", "Limits", "Step", "Tool", "ToolCall", "ToolCallError", "ToolResult", "ToolRunner",
           "Trajectory", "Turn", "load_environment", "parse_tool_calls"]
