"""What the supervised stages (sft, rm, dpo) share: the preference pairs rm and dpo read, their
encoding, and the epoch loop (shuffled batches, held-out evaluation before training and after each
epoch, metrics and a progress bar)."""

from __future__ import annotations

import random
from collections.abc import Callable

from tqdm import tqdm

from rlhf_ray.config import RunConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.tokenize import encode_pairs
from rlhf_ray.errors import BadInputError
from rlhf_ray.tracking import MetricsWriter


def load_preference_data(cfg: RunConfig, tokenizer, stage: str):
    """(train, held-out) lists of ``PreferencePair`` from data.preferences or the built-in task.
    ``stage`` measures its progress on the held-out pairs: data that leaves none is refused."""
    from rlhf_ray.data import formats

    if cfg.data.preferences:
        pairs, report = formats.load_preferences(cfg.data.preferences, cfg.data.fields, cfg.data.on_bad_row,
                                                 tokenizer, subset=cfg.data.subset, split=cfg.data.split)
        pairs = formats.apply_prompt_limit(pairs, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow, report)
        if report.eventful:
            print(report.summary())
    elif cfg.data.task:
        from rlhf_ray.tasks import get_task

        pairs = formats.task_preferences(get_task(cfg.data.task, cfg.seed), cfg.data.num_preference_pairs)
    else:
        raise BadInputError(f"{stage}: no preference pairs: give data.preferences (or data.task for the built-in "
                            f"task's pairs)")
    train, held_out = formats.split_holdout(pairs, cfg.data.eval_fraction, cfg.seed)
    if not held_out:
        raise BadInputError(f"{stage}: no held-out pairs (data.eval_fraction is 0 or the data is tiny); "
                            f"preference accuracy cannot be measured")
    return train, held_out


def encode_side(cfg: RunConfig, tokenizer, pairs: list, side: str) -> RolloutBatch:
    """The pairs' prompts with their ``side`` ("chosen" or "rejected") responses, row-aligned
    with the other side's."""
    return encode_pairs(tokenizer, [p.prompt for p in pairs], [getattr(p, side) for p in pairs],
                        cfg.data.max_prompt_tokens, cfg.data.max_seq_len)


def train_epochs(name: str, n_rows: int, epochs: int, batch_size: int, seed: int,
                 train_step: Callable[[list[int]], dict[str, float]], evaluate: Callable[[], dict[str, float]],
                 metrics: MetricsWriter, progress: tuple[str, ...], tags: dict | None = None
                 ) -> tuple[list[dict[str, float]], int]:
    """``epochs`` passes over ``n_rows`` training rows in a seeded random order, in batches of
    ``batch_size`` row indices (each pass leaves out the remainder): ``train_step(rows)`` returns a
    step's stats, ``evaluate()`` the held-out metrics, measured before the first step and after
    every epoch. Both go to ``metrics`` with ``tags``, step and epoch; the tqdm bar ``name`` shows
    the ``progress`` stats. Returns the evaluations (the one before training first) and the steps."""
    tags = tags or {}
    rng = random.Random(seed)
    steps_per_epoch = max(1, n_rows // batch_size)
    evaluations = [evaluate()]
    metrics.write({**tags, "step": 0, "epoch": 0, **evaluations[0]})
    step = 0
    with tqdm(total=epochs * steps_per_epoch, desc=name, unit="step") as bar:
        for epoch in range(1, epochs + 1):
            order = list(range(n_rows))
            rng.shuffle(order)
            for i in range(steps_per_epoch):
                stats = train_step(order[i * batch_size:(i + 1) * batch_size])
                step += 1
                metrics.write({**tags, "step": step, "epoch": epoch, **stats})
                bar.update()
                bar.set_postfix({key: f"{stats[key]:.3f}" for key in progress})
            evaluations.append(evaluate())
            metrics.write({**tags, "step": step, "epoch": epoch, **evaluations[-1]})
            print(f"{name} epoch {epoch}: held-out "
                  + ", ".join(f"{key.removeprefix('eval_')} {value:.3f}" for key, value in evaluations[-1].items()))
    return evaluations, step
