"""The committed two-digit sums (configs/data/sums_*.jsonl): what scripts/make_sum_data.py writes,
disjoint, and read by the prompt loader as chat prompts with their gold answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "configs" / "data"
FILES = ("sums_train.jsonl", "sums_heldout.jsonl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_committed_files_are_what_the_seeded_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sum_data.py"), "--out-dir", str(tmp_path)],
                   check=True)
    for name in FILES:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name


def test_rows_are_two_digit_sums_with_their_answers_and_the_splits_share_no_question():
    train, heldout = (_rows(DATA / name) for name in FILES)
    assert (len(train), len(heldout)) == (512, 100)
    operands = {}
    for row in train + heldout:
        (message,) = row["prompt"]
        a, b = (int(x) for x in message["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert message == {"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a + b)
        operands[row["id"]] = frozenset((a, b))
    assert len(operands) == len(train) + len(heldout)  # ids unique over both files
    assert not {operands[r["id"]] for r in train} & {operands[r["id"]] for r in heldout}


def test_the_prompt_loader_renders_them_with_the_chat_template(bpe_tokenizer):
    from rlhf_ray.data.formats import load_prompts

    prompts, report = load_prompts(str(DATA / "sums_heldout.jsonl"), tokenizer=bpe_tokenizer)
    assert report.rows_kept == 100
    assert prompts[0] == bpe_tokenizer.apply_chat_template(prompts[0].messages, tokenize=False,
                                                           add_generation_prompt=True)
    assert prompts[0].messages == _rows(DATA / "sums_heldout.jsonl")[0]["prompt"]
