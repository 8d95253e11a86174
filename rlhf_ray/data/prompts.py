"""Prompt sources for PPO: a built-in task or a dataset file, served in shuffled epochs."""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_ray.config import DataConfig


def load_prompts(data: DataConfig, seed: int) -> list[str]:
    if data.prompts:
        return _prompts_from_dataset(data.prompts, data.prompt_field)
    if not data.task:
        raise ValueError("data: give data.prompts (a file or dataset) or data.task (a built-in task)")
    from rlhf_ray.tasks import get_task

    return get_task(data.task, seed).prompts(data.num_prompts)


def _prompts_from_dataset(source: str, field: str) -> list[str]:
    from datasets import load_dataset

    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"data.prompts: {path} does not exist")
        kind = "parquet" if path.suffix == ".parquet" else "json"
        ds = load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = load_dataset(source, split="train")
    if field not in ds.column_names:
        raise ValueError(f"data.prompts {source}: no field {field!r} (fields: {', '.join(ds.column_names)}); "
                         f"set data.prompt_field")
    prompts, skipped = [], []
    for i, value in enumerate(ds[field]):
        if isinstance(value, str) and value.strip():
            prompts.append(value)
        else:
            skipped.append(i)
    if skipped:
        print(f"data.prompts {source}: skipped {len(skipped)} rows with an empty or non-text "
              f"{field!r} (first rows: {skipped[:5]})")
    if not prompts:
        raise ValueError(f"data.prompts {source}: no usable prompts in field {field!r}")
    return prompts


class PromptStream:
    """Serves batches from shuffled passes over the prompts; ``position`` makes it resumable."""

    def __init__(self, prompts: list[str], seed: int, shuffle: bool = True):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.position = 0  # prompts served so far, over all epochs

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            epoch, offset = divmod(self.position, len(self.prompts))
            take = min(n - len(out), len(self.prompts) - offset)
            order = self._order(epoch)
            out.extend(self.prompts[i] for i in order[offset : offset + take])
            self.position += take
        return out
