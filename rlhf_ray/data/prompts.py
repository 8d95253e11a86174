"""Prompt sources for PPO: a built-in task or a dataset file, served in shuffled epochs."""

from __future__ import annotations

import random

from rlhf_ray.config import DataConfig


def run_prompts(data: DataConfig, seed: int, tokenizer=None) -> list[str]:
    """PPO prompts from ``data.prompts`` (a file, folder or hub dataset, read with ``data.fields``,
    ``data.on_bad_row``, ``data.subset`` and ``data.split``) or else from the built-in ``data.task``.

    With a tokenizer, prompts over ``data.max_prompt_tokens`` are truncated from the left or dropped
    (``data.prompt_overflow``), and chat-message prompts use its chat template. The load report is
    printed when rows were skipped, truncated or dropped.
    """
    from rlhf_ray.data import formats

    if data.prompts:
        prompts, report = formats.load_prompts(data.prompts, data.fields, data.on_bad_row, tokenizer,
                                               subset=data.subset, split=data.split)
    elif data.task:
        from rlhf_ray.tasks import get_task

        prompts = get_task(data.task, seed).prompts(data.num_prompts)
        report = formats.LoadReport(source=f"task {data.task}", rows_read=len(prompts), rows_kept=len(prompts))
    else:
        raise ValueError("data: give data.prompts (a file or dataset) or data.task (a built-in task)")
    if tokenizer is not None:
        prompts = formats.apply_prompt_limit(prompts, tokenizer, data.max_prompt_tokens, data.prompt_overflow,
                                             report)
    if report.eventful:
        print(f"data.prompts {report.summary()}")
    if not prompts:
        raise ValueError(f"data.prompts: no prompts left: {report.summary()}")
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
