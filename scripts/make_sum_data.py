"""Writes the two-digit addition prompts of the shipped SmolLM2 config, in the layout of a user's
own data: JSONL rows of an id, a chat-message prompt and the gold ``answer`` column that reward
functions receive (``configs/data/sums_train.jsonl``, ``configs/data/sums_heldout.jsonl``).

    python scripts/make_sum_data.py [--train 512] [--heldout 100] [--seed 0]

Seeded, so the committed files are reproducible. No question is in both files, nor its operands
swapped (27 + 82 in one, 82 + 27 in the other).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "configs" / "data"
QUESTION = "What is {a} + {b}? Reply with just the number."


def sum_rows(pairs: list[tuple[int, int]], id_prefix: str) -> list[dict]:
    return [{"id": f"{id_prefix}-{i:04d}",
             "prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}],
             "answer": str(a + b)}
            for i, (a, b) in enumerate(pairs, start=1)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    operand_sets = [(a, b) for a in range(10, 100) for b in range(a, 100)]  # each unordered pair once
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in rng.sample(operand_sets, args.train + args.heldout)]
    write_jsonl(args.out_dir / "sums_train.jsonl", sum_rows(pairs[: args.train], "sum"))
    write_jsonl(args.out_dir / "sums_heldout.jsonl", sum_rows(pairs[args.train :], "sum-heldout"))


if __name__ == "__main__":
    main()
