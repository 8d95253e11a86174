"""The method menu on one task with one budget: PPO, GRPO, Dr. GRPO, DAPO, GSPO, CISPO and DPO.

    python benchmarks/compare_algorithms.py [--iterations 40] [--methods ppo,grpo,dapo] [--out runs/compare_algorithms]

SFT once (``configs/method_sft.yaml``: two-digit addition, a tiny model that answers in the right
format but is often wrong), then each ``configs/method_<name>.yaml`` from that model with the same
number of iterations, prompts and samples (DPO: ``configs/method_dpo.yaml``, one pass over the
task's preference pairs). Per method: the gold score of the sampled responses at each iteration
(the training curve), the held-out gold score of the final policy (greedy answers to prompts no
method trained on, the same table as ``rlhf-ray eval``) and the seconds each iteration cost.

Writes ``benchmarks/results/compare_algorithms-<time>.json``, a chart next to it (``.png``) and
prints the markdown table of ``docs/algorithms.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RL_METHODS = ["ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo"]
METHODS = [*RL_METHODS, "dpo"]


def parse_args() -> argparse.Namespace:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=40, help="PPO-family iterations per method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--out", default="runs/compare_algorithms", help="run folders (the SFT model is reused)")
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    return args


def method_config(name: str, out: Path, sft_model: str, iterations: int):
    from rlhf_ray.config import load_config

    overrides = [f"run_dir={out / name}", f"model.policy={sft_model}", "logging.trackers=[]"]
    if name in RL_METHODS:
        overrides.append(f"ppo.iterations={iterations}")
    return load_config(CONFIGS / f"method_{name}.yaml", overrides)


def train_sft(out: Path) -> str:
    """The shared starting point, trained once per ``--out`` folder."""
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.sft import run_sft

    model = out / "sft" / "model"
    if not (model / "config.json").exists():
        run_sft(load_config(CONFIGS / "method_sft.yaml", [f"run_dir={out / 'sft'}", "logging.trackers=[]"]))
    return str(model)


def run_method(name: str, out: Path, sft_model: str, iterations: int) -> dict:
    """One method's figures and where its final policy is; a method already run into ``out``
    with the same iterations is read back, not run again (a later call adds methods)."""
    saved = out / name / "comparison.json"
    if saved.exists() and json.loads(saved.read_text()).get("iterations") == iterations:
        return json.loads(saved.read_text())
    result = {"iterations": iterations, **_train(name, method_config(name, out, sft_model, iterations))}
    saved.write_text(json.dumps(result, indent=2))
    return result


def _train(name: str, cfg) -> dict:
    from rlhf_ray.stages.ppo import run_ppo
    from rlhf_ray.tracking import read_metrics

    start = time.perf_counter()
    if name == "dpo":
        from rlhf_ray.stages.dpo import run_dpo

        summary = run_dpo(cfg)
        steps = [r for r in read_metrics(cfg.run_dir) if "dpo_loss" in r]
        return {"model": summary["model"], "wall_s": time.perf_counter() - start, "steps": len(steps),
                "seconds_per_step": (time.perf_counter() - start) / max(1, len(steps)),
                "held_out_accuracy": summary["held_out"]["eval_dpo_accuracy"]}
    history = [r for r in run_ppo(cfg) if "skipped_nonfinite" not in r]
    return {"model": str(Path(cfg.run_dir) / "policy"), "wall_s": time.perf_counter() - start,
            "gold_per_iteration": [r["gold_score_mean"] for r in history],
            "seconds_per_iteration": statistics.median(r["time/iteration_s"] for r in history),
            "generate_s": statistics.median(r["time/generate_s"] for r in history),
            "train_s": statistics.median(r["time/train_s"] for r in history),
            "dynamic_rounds": [r["dynamic/rounds"] for r in history if "dynamic/rounds" in r]}


def held_out_gold(out: Path, models: dict[str, str]) -> dict[str, float]:
    """Greedy answers of every final policy (and the SFT start) to the task's held-out prompts."""
    from rlhf_ray.config import load_config
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.eval import compare_checkpoints, eval_data

    cfg = load_config(CONFIGS / "method_grpo.yaml", [f"run_dir={out / 'eval'}", "eval.max_new_tokens=6"])
    prompts, references = eval_data(cfg, load_tokenizer(models["sft"]))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    report = compare_checkpoints(cfg, models, out / "eval", prompts, references)
    return {name: row["gold_score"] for name, row in report["models"].items()}


def markdown_table(results: dict, gold: dict[str, float]) -> str:
    rows = ["| method | held-out gold (SFT start: {:.3f}) | gold of samples, first -> last iteration "
            "| s per iteration (generate / train) |".format(gold["sft"]), "|---|---|---|---|"]
    for name, r in results.items():
        if "gold_per_iteration" in r:
            curve = f"{r['gold_per_iteration'][0]:.3f} -> {r['gold_per_iteration'][-1]:.3f}"
            cost = f"{r['seconds_per_iteration']:.1f} ({r['generate_s']:.1f} / {r['train_s']:.1f})"
        else:
            curve, cost = f"offline: {r['steps']} steps", f"{r['seconds_per_step']:.2f} per step"
        rows.append(f"| {name} | {gold[name]:.3f} | {curve} | {cost} |")
    return "\n".join(rows)


def chart(json_path: Path, payload: dict) -> Path:
    """Training curves and held-out scores of a results payload (also for ``--replot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, gold = payload["methods"], payload["held_out_gold"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, r in results.items():
        if "gold_per_iteration" in r:
            curves.plot(range(1, len(r["gold_per_iteration"]) + 1), r["gold_per_iteration"], marker=".", label=name)
    curves.axhline(gold["sft"], color="k", linestyle="--", linewidth=1, label="SFT start (held-out)")
    curves.set(xlabel="iteration", ylabel="gold score of the sampled responses", title="training curves")
    curves.legend(fontsize=8)
    names = ["sft", *results]
    values = [gold[n] for n in names]
    drawn = bars.bar(names, values, color=["grey", *[f"C{i}" for i in range(len(results))]])
    bars.bar_label(drawn, fmt="%.3f", fontsize=8)
    bars.set(ylabel="held-out gold score (greedy)", title="final policies on held-out prompts")
    bars.tick_params(axis="x", rotation=20)
    title = f"compare_algorithms {payload['machine']['date']}, {payload['iterations']} iterations"
    return bench.save_figure(fig, json_path, title)


def main() -> None:
    args = parse_args()
    if bench.replot_requested(args, chart):
        return
    facts = bench.announce("compare_algorithms")
    out = Path(args.out).resolve()
    sft_model = train_sft(out)
    results = {name: run_method(name, out, sft_model, args.iterations) for name in args.methods.split(",")}
    gold = held_out_gold(out, {"sft": sft_model, **{name: r["model"] for name, r in results.items()}})
    table = markdown_table(results, gold)
    print(table)
    bench.publish("compare_algorithms", {"machine": facts, "iterations": args.iterations, "held_out_gold": gold,
                                         "methods": results, "table": table}, chart, args.no_json)


if __name__ == "__main__":
    main()
