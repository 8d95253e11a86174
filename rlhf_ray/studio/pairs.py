"""Annotation input -> pairs to label.

Two input shapes, both read through ``rlhf_ray.data.formats``:

* what ``rlhf-ray collect`` writes: ``{"prompt": str, "responses": [str, ...], "scores"?: [...]}``
  (a ``responses`` field of two or more texts). Several responses to one prompt become pairs:
  ``pairing="adjacent"`` (the default) gives responses (1,2), (2,3), ... — n-1 pairs that still
  link every response into one ranking — and ``pairing="all"`` gives every n(n-1)/2 pair.
  Responses that are empty or repeat an earlier one word for word are dropped first.
* any preference dataset ``load_preferences`` reads (``{prompt, chosen, rejected}``, messages,
  HH-RLHF dialogues): one pair per row. The dataset's own chosen/rejected label is *not* shown to
  annotators nor used as gold; pass the file as ``--gold`` to use it as the known answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from rlhf_ray.data.formats import DataError, LoadReport, _Row, load_preferences, read_rows, render_prompt

Pairing = Literal["adjacent", "all"]


@dataclass
class Pair:
    prompt: str
    response_1: str
    response_2: str
    gold: str | None = None  # "r1" / "r2" when the better response is known
    source: str = ""
    meta: dict = field(default_factory=dict)


def _pairs_of(n: int, pairing: Pairing) -> list[tuple[int, int]]:
    if pairing == "adjacent":
        return [(i, i + 1) for i in range(n - 1)]
    if pairing == "all":
        return list(combinations(range(n), 2))
    raise ValueError(f"pairing must be 'adjacent' or 'all', got {pairing!r}")


def load_pairs(source: str, pairing: Pairing = "adjacent", on_bad_row: str = "error",
               fields: dict[str, str] | None = None) -> tuple[list[Pair], LoadReport]:
    """Pairs to label from ``source`` (see the module docstring), and the load report."""
    rows, name = read_rows(source)
    first = next((row.value for row in rows if isinstance(row.value, dict)), None)
    if first is None or "responses" not in first:
        prefs, report = load_preferences(source, fields=fields, on_bad_row=on_bad_row)  # type: ignore[arg-type]
        return [Pair(p.prompt, p.chosen, p.rejected, source=f"{name}") for p in prefs], report
    report = LoadReport(source=name, rows_read=len(rows))
    out: list[Pair] = []
    for where, number, raw in rows:  # where: the file of the row (a shard's, in a folder of shards)
        try:
            row = _Row(where, number, raw, dict(fields or {}))
            prompt_value = row.raw("prompt")
            prompt = render_prompt(row.messages("prompt")) if isinstance(prompt_value, list) else row.text("prompt")
            responses = row.raw("responses") if "responses" in row.row else None
            if not isinstance(responses, list):
                raise DataError(where, number, "responses", "wrong type", "expected a list of texts")
            texts: list[str] = []
            for i, r in enumerate(responses, start=1):
                if not isinstance(r, str):
                    raise DataError(where, number, "responses", "wrong type", f"response {i}")
                # A policy may answer nothing; such an answer cannot be the chosen or rejected
                # text of the preference format `rlhf-ray rm` reads, so it is dropped like a repeat.
                if r.strip() and r.strip() not in {t.strip() for t in texts}:
                    texts.append(r)
            if len(texts) < 2:
                raise DataError(where, number, "responses", "chosen equals rejected",
                                "fewer than two different responses")
            scores = raw.get("scores") if isinstance(raw.get("scores"), list) else None
            for i, j in _pairs_of(len(texts), pairing):
                meta = {"row": number, "responses": [i, j]}
                if scores is not None and len(scores) == len(responses):
                    meta["scores"] = [scores[responses.index(texts[i])], scores[responses.index(texts[j])]]
                out.append(Pair(prompt, texts[i], texts[j], source=where, meta=meta))
        except DataError as err:
            if on_bad_row == "error":
                raise
            report._skip(err)
    report.rows_kept = report.rows_read - report.n_skipped
    if not out:
        raise DataError(name, None, None, "empty text", f"no usable pairs: {report.summary()}")
    return out, report


def load_gold(source: str, on_bad_row: str = "error") -> list[Pair]:
    """Gold items: a preference dataset whose ``chosen`` is known to be the better answer."""
    prefs, _ = load_preferences(source, on_bad_row=on_bad_row)  # type: ignore[arg-type]
    return [Pair(p.prompt, p.chosen, p.rejected, gold="r1", source=source) for p in prefs]
