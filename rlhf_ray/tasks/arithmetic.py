"""The built-in task: small-number addition, with a gold scorer.

A tiny model learns it within minutes on 2 CPU cores, and the gold scorer says how right a
response really is, so true progress and reward hacking can be measured apart from the learned
reward model. Prompts look like ``"12+7="``; the ideal response is ``"19"`` then EOS.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")
_INT = re.compile(r"^\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class ArithmeticTask:
    max_operand: int = 9
    seed: int = 0

    def _pairs(self, n: int, salt: int) -> list[tuple[int, int]]:
        rng = random.Random(self.seed * 1000003 + salt)
        return [(rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)) for _ in range(n)]

    def prompts(self, n: int, split: str = "train") -> list[str]:
        salt = {"train": 1, "eval": 2}[split]
        return [f"{a}+{b}=" for a, b in self._pairs(n, salt)]

    def sft_examples(self, n: int, error_rate: float = 0.1) -> list[dict]:
        """Demonstrations; ``error_rate`` of them are deliberately wrong, as real data is."""
        rng = random.Random(self.seed * 7 + 3)
        rows = []
        for a, b in self._pairs(n, salt=3):
            answer = a + b
            if rng.random() < error_rate:
                answer += rng.choice([-2, -1, 1, 2])
            rows.append({"prompt": f"{a}+{b}=", "response": str(answer)})
        return rows

    def preference_pairs(self, n: int) -> list[dict]:
        """Chosen is the right sum. Rejected is mostly a near miss (off by 1 to 3: the
        reward model must learn arithmetic, not just format), otherwise a far miss, a truncated
        answer or a malformed one, so the reward model has seen the ways a policy goes wrong."""
        rng = random.Random(self.seed * 11 + 5)
        rows = []
        for a, b in self._pairs(n, salt=4):
            right = a + b
            kind = rng.random()
            if kind < 0.6:  # off by one twice as often: the hardest and most common slip
                candidates = [str(right + d) for d in (-3, -2, -1, -1, 1, 1, 2, 3) if right + d >= 0]
            elif kind < 0.8:
                candidates = [str(v) for v in range(2 * self.max_operand + 1)]
            else:
                candidates = [f"{right}{right}", f"{a}{b}", f"{a}+{b}", str(right)[:-1] or "", str(right) + "0"]
            # "0"+"5" reads as 5: keep only candidates that really are wrong.
            wrong = rng.choice([c for c in candidates if c and self.gold_score(f"{a}+{b}=", c) < 1.0])
            rows.append({"prompt": f"{a}+{b}=", "chosen": str(right), "rejected": wrong})
        return rows

    @staticmethod
    def gold_score(prompt: str, response: str) -> float:
        """1 for the exact sum, partial credit for a near miss, 0 for anything else."""
        p, r = _PROMPT.match(prompt), _INT.match(response)
        if p is None:
            raise ValueError(f"not an arithmetic prompt: {prompt!r}")
        if r is None:
            return 0.0
        error = abs(int(r.group(1)) - (int(p.group(1)) + int(p.group(2))))
        return 1.0 if error == 0 else max(0.0, 0.5 - 0.1 * error)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold scorer in the rule-reward signature (``module:function``)."""
    return [ArithmeticTask.gold_score(p, r) for p, r in zip(prompts, responses)]
