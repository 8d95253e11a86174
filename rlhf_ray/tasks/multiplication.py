"""A built-in task that needs its tool: two-digit multiplication with a calculator.

A tiny model cannot multiply 37 by 58 in its head, but it can learn to ask: the policy writes
``<tool_call>{"name": "calc", "arguments": {"expr": "37*58"}}</tool_call>``, reads
``<tool_response>2146</tool_response>`` and answers ``2146``. The gold scorer reads the last line
of the response (the final answer), so it scores a whole multi-turn conversation or a bare answer
alike. Demonstrations mostly use the tool; some are imperfect (a mistyped operand, a miscopied
result) and some answer without it, as real data does, so PPO starts from a policy that sometimes
calls the tool and has something to learn.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from dataclasses import dataclass

from rlhf_ray.agents.env import Environment, Step
from rlhf_ray.agents.tools import CALL_CLOSE, CALL_OPEN, Tool

_PROMPT = re.compile(r"^\s*(\d+)\*(\d+)=\s*$")
_INT = re.compile(r"^\s*(-?\d+)\s*$")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def calc(expr: str) -> int | float:
    """The calculator tool: +, -, *, /, //, % and parentheses over numbers (no names, no powers:
    nothing a policy could turn into a slow or unsafe computation)."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    result = value(ast.parse(str(expr), mode="eval").body)
    return int(result) if isinstance(result, float) and result.is_integer() else result


CALC = Tool("calc", calc, "Evaluates an arithmetic expression (+ - * / // % and parentheses).",
            {"type": "object", "properties": {"expr": {"type": "string", "description": "e.g. 37*58"}},
             "required": ["expr"]})


def call_text(expr: str) -> str:
    """The policy's turn that asks the calculator for ``expr``."""
    return CALL_OPEN + json.dumps({"name": CALC.name, "arguments": {"expr": expr}}) + CALL_CLOSE


def final_answer(response: str) -> str:
    """The last line of a response: the answer after any tool turns."""
    return response.rstrip("\n").rsplit("\n", 1)[-1]


@dataclass(frozen=True)
class MultiplicationTask:
    low: int = 10
    high: int = 99
    seed: int = 0

    def _pairs(self, n: int, salt: int) -> list[tuple[int, int]]:
        rng = random.Random(self.seed * 1000003 + salt)
        return [(rng.randint(self.low, self.high), rng.randint(self.low, self.high)) for _ in range(n)]

    def prompts(self, n: int, split: str = "train") -> list[str]:
        salt = {"train": 11, "eval": 12}[split]
        return [f"{a}*{b}=" for a, b in self._pairs(n, salt)]

    def turns(self, a: int, b: int, expr: str | None = None, answer: int | None = None) -> list[dict]:
        """A demonstration after its prompt, as messages: the policy's call, the tool's result, the
        policy's answer. ``expr``/``answer`` override what is asked and what is answered (imperfect
        demonstrations)."""
        expr = expr or f"{a}*{b}"
        result = calc(expr)
        return [{"role": "assistant", "content": call_text(expr)},
                {"role": "tool", "name": CALC.name, "content": str(result)},
                {"role": "assistant", "content": str(result if answer is None else answer)}]

    def transcript(self, a: int, b: int, expr: str | None = None, answer: int | None = None) -> str:
        """``turns`` as one text: the call, ``</s>`` (the policy's turn ends at its end token), the
        tool's result and the answer, laid out as the rollout lays them out (``PlainFormat``)."""
        call, result, final = (m["content"] for m in self.turns(a, b, expr, answer))
        return f"{call}</s>\n<tool_response>{result}</tool_response>\n{final}"

    def sft_examples(self, n: int, error_rate: float = 0.1, no_tool_rate: float = 0.25) -> list[dict]:
        """Demonstrations: most call the tool and copy its result; ``error_rate`` of them go wrong
        (a mistyped operand, or a result miscopied) and ``no_tool_rate`` answer without the tool
        (a guess: the right leading digits, wrong last ones). Rows that call the tool carry their
        ``turns`` too: SFT lays them out as a trajectory and trains on the policy's turns only."""
        rng = random.Random(self.seed * 7 + 13)
        rows = []
        for a, b in self._pairs(n, salt=13):
            kind = rng.random()
            if kind < no_tool_rate:
                rows.append({"prompt": f"{a}*{b}=", "response": str(a * b + rng.choice([-1, 1]) * rng.randint(1, 9))})
                continue
            if kind < no_tool_rate + error_rate / 2:
                mistake = {"expr": f"{a}*{b + rng.choice([-1, 1])}"}
            elif kind < no_tool_rate + error_rate:
                mistake = {"answer": a * b + rng.choice([-10, -1, 1, 10])}
            else:
                mistake = {}
            rows.append({"prompt": f"{a}*{b}=", "response": self.transcript(a, b, **mistake),
                         "turns": self.turns(a, b, **mistake)})
        return rows

    def preference_pairs(self, n: int) -> list[dict]:
        """Chosen uses the tool and answers right; rejected answers wrong, with or without it."""
        rng = random.Random(self.seed * 11 + 17)
        rows = []
        for a, b in self._pairs(n, salt=14):
            wrong = a * b + rng.choice([-10, -1, 1, 10])
            rejected = self.transcript(a, b, answer=wrong) if rng.random() < 0.5 else str(wrong)
            rows.append({"prompt": f"{a}*{b}=", "chosen": self.transcript(a, b), "rejected": rejected})
        return rows

    @staticmethod
    def gold_score(prompt: str, response: str) -> float:
        """1 for the exact product as the final answer, 0 otherwise (no partial credit: a near
        miss of a four-digit product is a wrong answer)."""
        p, r = _PROMPT.match(prompt), _INT.match(final_answer(response))
        if p is None:
            raise ValueError(f"not a multiplication prompt: {prompt!r}")
        return float(r is not None and int(r.group(1)) == int(p.group(1)) * int(p.group(2)))


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold scorer in the rule-reward signature (``module:function``)."""
    return [MultiplicationTask.gold_score(p, r) for p, r in zip(prompts, responses)]


class CalculatorEnv(Environment):
    """The task as an environment: the calculator is the tool; the first message that calls no
    tool is the answer, scored by the gold scorer."""

    tools = [CALC]  # noqa: RUF012

    def reset(self, row: dict) -> str:
        self.prompt = row["prompt"]
        return self.prompt

    def step(self, message: str) -> Step:
        return Step(reward=MultiplicationTask.gold_score(self.prompt, message), done=True)
