"""Built-in tasks with gold scorers, and rule rewards."""

from rlhf_ray.tasks.arithmetic import ArithmeticTask
from rlhf_ray.tasks.multiplication import MultiplicationTask

TASKS = {"arithmetic": ArithmeticTask, "multiplication": MultiplicationTask}
# The gold scorer of each task, in the rule-reward form the reward actor loads.
GOLD_REWARD = {"arithmetic": "rlhf_ray.tasks.arithmetic:gold_reward",
               "multiplication": "rlhf_ray.tasks.multiplication:gold_reward"}
# The environment of each task that needs tools (``agent.env``'s default for it).
ENVIRONMENTS = {"multiplication": "rlhf_ray.tasks.multiplication:CalculatorEnv"}
# The name a gold scorer's scores carry among the reward components (its function name).
GOLD_COMPONENT = "gold_reward"


def get_task(name: str, seed: int = 0):
    if name not in TASKS:
        raise ValueError(f"unknown data.task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](seed=seed)
