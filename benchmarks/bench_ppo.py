"""Per-phase time and throughput of PPO iterations, and weight-sync bandwidth, for a few model sizes.

    python benchmarks/bench_ppo.py [--sizes 64x2,256x4,512x6] [--variants gae,grpo] [--iterations 3]
                                   [--set policy.num_ranks=1 ...]

For each size (``HIDDENxLAYERS`` of the offline ``builtin:tiny`` Llama; head size 32) and each
variant (``gae``: PPO with a critic; ``grpo``: critic-free, group baselines) it starts a
``PPOTrainer``, runs one warm-up iteration that is not counted, then ``--iterations`` measured
ones, and prints the median seconds and generated tokens/s of each phase (generate, score, train,
sync) and of the whole iteration, plus the weight-sync bandwidth (the sync manifest's total bytes
divided by the sync seconds). Prints figures, asserts nothing; the raw per-iteration records go to
``benchmarks/results/bench_ppo-<time>.json`` and a chart next to it (``.png``).

Against this machine's limits, measured at the start of the same run (``--no-baselines`` skips):
a raw gloo broadcast between two Ray actors and a memcpy of 64 MB buffers (the weight sync's
upper bounds), and the best fp32/bf16 matmul FLOP/s with 1 and 2 torch threads (the learners'
upper bound). The second table then gives, per run:

* ``pad``: padded positions / all positions of the driver's rollout batch, ``[prompt left-padded
  to the widest | response right-padded to the longest]`` for all rows of the iteration
  (``RolloutBatch.from_token_lists``): what a padded forward pass computes in vain. The learners and
  the reference pack their micro-batches (no padding computed) when the model passes
  ``engines.scoring.packs_exactly``, so this is the waste packing removes. The token and position
  counts are the trainer's own metrics (``prompt_tokens``, ``generated_tokens``, ``batch_positions``).
* ``train tok/s``: real (non-pad) prompt + response tokens x ``ppo.epochs`` / train seconds.
* ``MFU``: 6 x N x real tokens x epochs x models trained (2 for GAE: policy and critic) / train
  seconds / the machine's 2-core matmul peak in the learners' dtype: the better of one process on
  2 threads and twice the 1-thread figure; N = parameters in matmuls
  (the input embedding table, a lookup, excluded). Padded positions (if computed) are not counted.
* ``/bcast``, ``/memcpy``: the sync bandwidth as a fraction of those baselines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench

PHASES = ("generate", "score", "train", "sync")

# The fixed job: the layout of tests/test_ppo.py's GAE run (2 engines, 2 ZeRO-2 policy ranks, 2
# critic ranks) on the arithmetic prompts with a dense rule reward. Both variants train on
# 32 sequences per iteration (GAE: 32 prompts x 1; GRPO: 8 prompts x 4 samples).
BASE = [
    "model.policy=builtin:tiny",
    "data.task=arithmetic",
    "scorers.use_task_gold_as_reward=false",
    "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction",
    "rollout.max_new_tokens=16",
    "rollout.max_model_len=64", "data.max_prompt_tokens=32",
    "rollout.gpu_memory_utilization=0.05",
    "rollout.num_engines=2",
    "policy.num_ranks=2",
    "critic.num_ranks=2",
    "policy.zero_stage=2",
    "critic.zero_stage=2",
    "policy.micro_batch_size=16",
    "critic.micro_batch_size=16",
    "policy.lr=1e-4",
    "critic.lr=1e-4",
    "ppo.kl_coef=0.02",
    "ppo.epochs=1",
    "ppo.minibatches=1",
    "sync.parity_every=0",
    "checkpoint.save_final=false",
]
VARIANTS = {
    "gae": ["ppo.advantage_estimator=gae", "ppo.prompts_per_iteration=32", "rollout.samples_per_prompt=1"],
    "grpo": ["ppo.advantage_estimator=grpo", "ppo.prompts_per_iteration=8", "rollout.samples_per_prompt=4"],
}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        hidden, _, layers = item.strip().lower().partition("x")
        sizes.append((int(hidden), int(layers or 2)))
    return sizes


def param_count(hidden: int, layers: int, vocab: int) -> int:
    """Parameters of builtin:tiny (intermediate = 2 x hidden, untied embeddings, RMSNorm)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * 2 * hidden + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def run_one(hidden: int, layers: int, variant: str, iterations: int, extra: list[str], root: str) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.ppo import PPOTrainer

    run_dir = os.path.join(root, f"h{hidden}_l{layers}_{variant}")
    overrides = [
        f"run_dir={run_dir}",
        f"model.tiny_hidden_size={hidden}",
        f"model.tiny_layers={layers}",
        *BASE,
        *VARIANTS[variant],
        *extra,
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    trainer = PPOTrainer(cfg)
    startup_s = time.perf_counter() - start
    try:
        warmup = trainer.step()
        records = [trainer.step() for _ in range(iterations)]
        manifest = trainer.roles.rollout.manifest
    finally:
        trainer.close()
    total_bytes = int(manifest["total_bytes"])
    return {
        "hidden": hidden,
        "layers": layers,
        "variant": variant,
        "overrides": overrides,
        "startup_s": startup_s,
        "sync_total_bytes": total_bytes,
        "sync_buckets": len(manifest.get("buckets", [])),
        "rollout_batch": cfg.rollout_batch_size,
        "epochs": cfg.ppo.epochs,
        "models_trained": 2 if cfg.uses_critic else 1,
        "bf16": bool(cfg.policy.bf16),
        "warmup": warmup,
        "records": records,
    }


def summarise(result: dict) -> dict:
    recs = result["records"]
    tokens = bench.median([r["generated_tokens"] for r in recs])
    row = {"tokens": tokens}
    for phase in (*PHASES, "iteration"):  # the trainer's own metrics of each phase
        row[f"{phase}_s"] = bench.median([r.get(f"time/{phase}_s") for r in recs])
        row[f"{phase}_tok_s"] = bench.median([r.get(f"throughput/{phase}_tokens_per_s") for r in recs])
    row["sync_bytes_per_s"] = bench.median(
        [result["sync_total_bytes"] / r["time/sync_s"] for r in recs if r.get("time/sync_s")]
    )
    real = [r["prompt_tokens"] + r["generated_tokens"] for r in recs]
    row["padding_fraction"] = bench.median([1 - n / r["batch_positions"] for n, r in zip(real, recs)])
    row["real_tokens"] = bench.median(real)
    row["train_tokens_per_s"] = row["real_tokens"] * result["epochs"] / row["train_s"]
    return row


def add_limits(result: dict, limits: dict) -> None:
    """MFU of the train phase and sync bandwidth as fractions of this run's measured limits."""
    s = result["summary"]
    peaks = limits.get("matmul_peak_flops", {})
    dtype = "bfloat16" if result["bf16"] else "float32"
    # The 2-core peak: the better of one process on 2 threads and twice one thread (each of the 2
    # learner ranks runs 1 thread and can at best reach the 1-thread peak on its own core).
    per = peaks.get(dtype, {})
    peak = max(per.get("2", float("nan")), 2 * per.get("1", float("nan"))) if per else float("nan")
    flops = bench.train_flops(
        result["matmul_params"], s["real_tokens"] * result["epochs"] * result["models_trained"]
    )
    s["train_flops_per_s"] = flops / s["train_s"]
    s["machine_peak_flops"] = peak
    s["mfu"] = s["train_flops_per_s"] / peak
    sync = limits.get("sync_baselines", {})
    s["sync_over_bcast"] = s["sync_bytes_per_s"] / sync.get("broadcast_bytes_per_s", float("nan"))
    s["sync_over_memcpy"] = s["sync_bytes_per_s"] / sync.get("memcpy_bytes_per_s", float("nan"))


def main() -> None:
    args = parse_args()
    if bench.replot_requested(args, chart):
        return
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.common import init_ray

    init_ray(load_config(), log_to_driver=args.verbose)  # local Ray, platform env, quiet engines
    facts = bench.announce("bench_ppo")
    limits = {} if args.no_baselines else measure_limits()
    if args.overrides:
        print(f"overrides: {' '.join(args.overrides)}", flush=True)
    results = run_all(args, limits)
    ray.shutdown()

    table = print_phase_tables(results, args.iterations)
    limits_table = print_limits_table(results, args.goal)
    payload = {"machine": facts, "args": vars(args), "limits": limits, "table": table,
               "limits_table": limits_table, "runs": results}
    bench.publish("bench_ppo", payload, chart, args.no_json)


def parse_args() -> argparse.Namespace:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--sizes", default="64x2,256x4,512x6",
                        help="comma-separated HIDDENxLAYERS of builtin:tiny (hidden a multiple of 32)")
    parser.add_argument("--variants", default="gae,grpo", help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations after 1 warm-up")
    bench.add_config_overrides(parser,
                               help="extra config override (repeatable), e.g. --set rollout.num_engines=1")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip measuring gloo/memcpy/matmul limits first")
    parser.add_argument("--goal", type=float, default=0.30, help="MFU goal (fraction of measured peak)")
    parser.add_argument("--verbose", action="store_true", help="show the actors' logs")
    return parser.parse_args()


def measure_limits() -> dict:
    """This machine's ceilings now: gloo broadcast and memcpy (the weight sync's), matmul peaks (the
    learners')."""
    limits = {"sync_baselines": bench.gloo_baselines(), "matmul_peak_flops": bench.matmul_peaks()}
    b = limits["sync_baselines"]
    peaks = ", ".join(f"{d} {t} thr {v / 1e9:.1f} GFLOP/s"
                      for d, per in limits["matmul_peak_flops"].items() for t, v in per.items())
    print(f"this machine now: gloo broadcast {b['broadcast_bytes_per_s'] / 1e9:.2f} GB/s, memcpy "
          f"{b['memcpy_bytes_per_s'] / 1e9:.2f} GB/s (64 MB buffers); matmul peak {peaks}", flush=True)
    return limits


def run_all(args, limits: dict) -> list[dict]:
    """Every size x variant, one trainer after the other: each run's records, summary and figures
    against ``limits``."""
    from rlhf_ray.models.tiny import CHARSET

    vocab = len(CHARSET) + 4
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as root:
        for hidden, layers in parse_sizes(args.sizes):
            for variant in args.variants.split(","):
                print(f"-- {variant} h{hidden} x{layers} ...", flush=True)
                res = run_one(hidden, layers, variant, args.iterations, args.overrides, root)
                res["summary"] = summarise(res)
                res["params"] = param_count(hidden, layers, vocab)
                res["matmul_params"] = res["params"] - vocab * hidden  # input embedding: a lookup
                add_limits(res, limits)
                results.append(res)
                print(f"   startup {res['startup_s']:.1f} s, warm-up iteration "
                      f"{res['warmup']['time/iteration_s']:.2f} s, measured {args.iterations}", flush=True)
    return results


def print_phase_tables(results: list[dict], iterations: int) -> str:
    """Seconds per phase, synced bytes and bandwidth; then every phase's generated tokens/s. The
    first table's text is returned."""
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([r["variant"], f"{r['hidden']}x{r['layers']}", f"{r['params'] / 1e6:.2f}M", s["tokens"],
                     *[s[f"{p}_s"] for p in (*PHASES, "iteration")],
                     *[s[f"{p}_tok_s"] for p in ("generate", "iteration")],
                     bench.human_bytes(r["sync_total_bytes"]), f"{s['sync_bytes_per_s'] / 1e6:.0f} MB/s"])
    print()
    table = bench.print_table(
        ["variant", "size", "params", "tokens", "gen s", "score s", "train s", "sync s", "iter s",
         "gen tok/s", "iter tok/s", "synced", "sync bw"],
        rows,
        title=f"median of {iterations} iterations after 1 warm-up (tokens = generated per iteration)",
    )
    print()
    bench.print_table(
        ["variant", "size", *[f"{p} tok/s" for p in (*PHASES, "iteration")]],
        [[r["variant"], f"{r['hidden']}x{r['layers']}",
          *[r["summary"][f"{p}_tok_s"] for p in (*PHASES, "iteration")]] for r in results],
        title="generated tokens per second of each phase",
    )
    return table


def print_limits_table(results: list[dict], goal: float) -> str:
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([r["variant"], f"{r['hidden']}x{r['layers']}", s["padding_fraction"],
                     s["train_tokens_per_s"], s["train_flops_per_s"] / 1e9, f"{100 * s['mfu']:.1f}%",
                     s["sync_bytes_per_s"] / 1e9, s["sync_over_bcast"], s["sync_over_memcpy"]])
    print()
    return bench.print_table(
        ["variant", "size", "pad", "train tok/s", "train GFLOP/s", "MFU", "sync GB/s", "/bcast", "/memcpy"],
        rows,
        title=(
            "against this machine's limits measured in this run: MFU = 6 x N x real tokens x epochs x models "
            f"/ train s / 2-core matmul peak = max(2 thr, 2 x 1 thr) (goal {100 * goal:.0f}%); "
            "pad = padded / all positions"
        ),
    )


def chart(path, payload: dict):
    """Seconds per phase, the train phase's MFU against the goal and, when measured, the sync's
    bandwidth next to the raw gloo broadcast and memcpy."""
    results, goal = payload["runs"], payload["args"]["goal"]
    labels = [f"{r['variant']} {r['hidden']}x{r['layers']}" for r in results]
    panels = [
        {"title": "median seconds per phase", "labels": labels, "stacked": True,
         "series": {p: [r["summary"][f"{p}_s"] for r in results] for p in PHASES}, "ylabel": "s / iteration"},
        {"title": "train phase MFU vs measured matmul peak", "labels": labels,
         "series": {"MFU %": [100 * r["summary"]["mfu"] for r in results]}, "ylabel": "%",
         "hline": (100 * goal, f"goal {100 * goal:.0f}%")},
    ]
    b = payload["limits"].get("sync_baselines")
    if b:
        sync = [r["summary"]["sync_bytes_per_s"] / 1e9 for r in results]
        panels.append({"title": "weight sync vs raw gloo broadcast / memcpy (GB/s)",
                       "labels": [*labels, "gloo bcast", "memcpy"],
                       "series": {"GB/s": [*sync, b["broadcast_bytes_per_s"] / 1e9,
                                           b["memcpy_bytes_per_s"] / 1e9]}, "ylabel": "GB/s"})
    title = f"bench_ppo {payload['machine']['date']} {' '.join(payload['args']['overrides'])}"
    return bench.save_chart(path, panels, title)


if __name__ == "__main__":
    main()
