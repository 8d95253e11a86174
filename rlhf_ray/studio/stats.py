"""Agreement statistics and the preference-dataset export of an annotation database.

Labels compared are the canonical choices ``r1``, ``r2``, ``tie``, ``bad`` (skips are not labels).
Library code does the statistics: ``sklearn.metrics.cohen_kappa_score`` per annotator pair (on the
items both labelled), ``krippendorff.alpha`` (nominal) over everybody, ``scipy.stats.binomtest``
for position bias.

* agreement with the majority: on items where the *other* annotators have a strict majority label,
  the share where the annotator gave that label (leave-one-out, so nobody votes with themselves);
* gold accuracy: on gold items, the share where the annotator picked the known better response;
* position bias: of the decisive judgements (A or B), the share that picked the left response
  (0.5 = none), with a two-sided binomial test against 0.5;
* items per hour: judgements over active time, where active time sums the gaps between an
  annotator's consecutive judgements, each capped at ``idle_cap_s`` (breaks do not count), plus
  one median gap for the first judgement.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from itertools import combinations, pairwise
from pathlib import Path
from statistics import median

from rlhf_ray.studio.db import Store

LABELS = ("r1", "r2", "tie", "bad")


def _labels(judgements: list[dict]) -> dict[int, dict[str, str]]:
    """item id -> {annotator: canonical label}, skips left out."""
    out: dict[int, dict[str, str]] = defaultdict(dict)
    for j in judgements:
        if j["choice"] in LABELS:
            out[j["item_id"]][j["annotator"]] = j["choice"]
    return out


def _clean(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    if len(a) < 2:
        return None
    if len(set(a) | set(b)) == 1:  # one label only: agreement is perfect but kappa is 0/0
        return None
    return _clean(float(cohen_kappa_score(a, b, labels=list(LABELS))))


def krippendorff_alpha(by_item: dict[int, dict[str, str]], annotators: list[str]) -> float | None:
    import krippendorff
    import numpy as np

    items = [i for i, labs in by_item.items() if len(labs) >= 2]
    if not items:
        return None
    values = {lab: k for k, lab in enumerate(LABELS)}
    data = np.full((len(annotators), len(items)), np.nan)
    for col, item in enumerate(items):
        for row, name in enumerate(annotators):
            if name in by_item[item]:
                data[row, col] = values[by_item[item][name]]
    if len(set(data[~np.isnan(data)].tolist())) < 2:
        return None  # one value in the whole domain: alpha is undefined
    return _clean(float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")))


def compute_stats(store: Store, idle_cap_s: float = 600.0) -> dict:
    from scipy.stats import binomtest

    judgements = store.judgements()
    items = {it["id"]: it for it in store.items()}
    names = [a["name"] for a in store.annotators()]
    by_item = _labels(judgements)

    pairs = []
    for x, y in combinations(names, 2):
        common = [i for i, labs in by_item.items() if x in labs and y in labs]
        a, b = [by_item[i][x] for i in common], [by_item[i][y] for i in common]
        pairs.append({"annotators": [x, y], "items": len(common),
                      "raw_agreement": _clean(sum(p == q for p, q in zip(a, b)) / len(common)) if common else None,
                      "cohen_kappa": cohen_kappa(a, b)})

    per: dict[str, dict] = {}
    for name in names:
        mine = [j for j in judgements if j["annotator"] == name]
        maj_n = maj_hit = gold_n = gold_hit = 0
        for item, labs in by_item.items():
            if name not in labs:
                continue
            others = Counter(v for k, v in labs.items() if k != name).most_common()
            if others and (len(others) == 1 or others[0][1] > others[1][1]):
                maj_n += 1
                maj_hit += labs[name] == others[0][0]
            gold = items[item]["gold"]
            if gold:
                gold_n += 1
                gold_hit += labs[name] == gold
        decisive = [j for j in mine if j["shown_choice"] in ("A", "B")]
        left = sum(j["shown_choice"] == "A" for j in decisive)
        times = sorted(j["created_at"] for j in mine)
        gaps = [min(b - a, idle_cap_s) for a, b in pairwise(times)]
        active = sum(gaps) + (median(gaps) if gaps else 0.0)
        per[name] = {
            "judgements": len(mine),
            "skips": sum(j["choice"] == "skip" for j in mine),
            "choices": dict(Counter(j["choice"] for j in mine)),
            "majority_items": maj_n,
            "majority_agreement": maj_hit / maj_n if maj_n else None,
            "gold_items": gold_n,
            "gold_accuracy": gold_hit / gold_n if gold_n else None,
            "decisive": len(decisive),
            "left_rate": left / len(decisive) if decisive else None,
            "left_rate_p": float(binomtest(left, len(decisive), 0.5).pvalue) if decisive else None,
            "items_per_hour": len(mine) / active * 3600 if active > 0 else None,
        }

    all_decisive = [j for j in judgements if j["shown_choice"] in ("A", "B")]
    left = sum(j["shown_choice"] == "A" for j in all_decisive)
    return {
        "items": len(items),
        "gold_items": sum(1 for it in items.values() if it["gold"]),
        "items_judged": sum(1 for labs in by_item.values() if labs),
        "items_multi": sum(1 for labs in by_item.values() if len(labs) >= 2),
        "judgements": len(judgements),
        "annotators": per,
        "pairs": pairs,
        "krippendorff_alpha": krippendorff_alpha(by_item, names),
        "position_bias": {"decisive": len(all_decisive), "left_rate": left / len(all_decisive) if all_decisive
                          else None, "p_value": float(binomtest(left, len(all_decisive), 0.5).pvalue)
                          if all_decisive else None},
    }


def format_stats(s: dict) -> str:
    def f(x, pct=False):
        if x is None:
            return "-"
        return f"{x:.1%}" if pct else f"{x:.3f}"

    lines = [(f"{s['items']} items ({s['gold_items']} gold), {s['judgements']} judgements, "
              f"{s['items_judged']} items judged, {s['items_multi']} by two or more annotators"),
             f"Krippendorff's alpha (nominal, all annotators): {f(s['krippendorff_alpha'])}",
             (f"position bias: left chosen in {f(s['position_bias']['left_rate'], True)} of "
              f"{s['position_bias']['decisive']} decisive judgements (p={f(s['position_bias']['p_value'])})"),
             "", f"{'annotator':<16}{'judged':>7}{'skips':>6}{'vs maj':>9}{'gold':>9}{'left':>8}{'items/h':>9}"]
    for name, a in s["annotators"].items():
        ih = "-" if a["items_per_hour"] is None else f"{a['items_per_hour']:.0f}"
        lines.append(f"{name:<16}{a['judgements']:>7}{a['skips']:>6}{f(a['majority_agreement'], True):>9}"
                     f"{f(a['gold_accuracy'], True):>9}{f(a['left_rate'], True):>8}{ih:>9}")
    if s["pairs"]:
        lines += ["", f"{'pair':<32}{'items':>6}{'agree':>8}{'kappa':>8}"]
        for p in s["pairs"]:
            lines.append(f"{' / '.join(p['annotators']):<32}{p['items']:>6}{f(p['raw_agreement'], True):>8}"
                         f"{f(p['cohen_kappa']):>8}")
    return "\n".join(lines)


def export_preferences(store: Store, out: str | Path, min_agreement: float = 0.0, min_votes: int = 1,
                       include_gold: bool = True) -> dict:
    """Writes the labelled pairs as a preference dataset ``rlhf-ray rm`` reads as it is: JSONL rows
    ``{prompt, chosen, rejected, votes, agreement, item_id}``.

    Per item, the votes are its live non-skip judgements; the winner is the label with the most
    votes and ``agreement`` = its votes / all votes. Left out, and counted: items with no votes
    (or fewer than ``min_votes``), a tie between labels, a winning ``tie`` or ``bad``, and
    agreement below ``min_agreement``. Gold items count with their votes (or are left out with
    ``include_gold=False``). Returns the counts.
    """
    by_item = _labels(store.judgements())
    counts = Counter()
    rows = []
    for item in store.items():
        labs = by_item.get(item["id"], {})
        if item["gold"] and not include_gold:
            counts["gold left out"] += 1
            continue
        if not labs or len(labs) < min_votes:
            counts["too few votes"] += 1
            continue
        tally = Counter(labs.values()).most_common()
        if len(tally) > 1 and tally[0][1] == tally[1][1]:
            counts["no majority"] += 1
            continue
        winner, n = tally[0]
        if winner == "tie":
            counts["tie"] += 1
            continue
        if winner == "bad":
            counts["both bad"] += 1
            continue
        agreement = n / len(labs)
        if agreement < min_agreement:
            counts["below min agreement"] += 1
            continue
        chosen, rejected = (item["response_1"], item["response_2"]) if winner == "r1" else \
            (item["response_2"], item["response_1"])
        rows.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "votes": len(labs),
                     "agreement": round(agreement, 4), "item_id": item["id"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"written": len(rows), "left_out": dict(counts), "out": str(out)}
