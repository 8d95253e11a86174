"""Overlapped generation (``ppo.overlap``) against the plain loop: seconds per iteration and learning.

    python benchmarks/bench_overlap.py [--iterations 10] [--hidden 128 --layers 2]
                                       [--variants off,on,on-notis] [--set KEY=VALUE ...]

The demo task (arithmetic prompts, dense ``digit_fraction`` rule reward, GRPO with 16 prompts x 4
samples, up to 16 new tokens, 2 vLLM engines, 2 ZeRO-2 policy ranks: bench_ppo.py's job) is run once per variant with the same seed, one
after the other in the same process:

* ``off``: the default loop: generate batch k with the latest weights, score, train, sync;
* ``on``: ``ppo.overlap=true``: batch k+1 is sampled (with the weights before update k) while batch
  k is scored and trained, and the loss applies truncated importance-sampling weights
  (``ppo.tis_cap``, default 2) between the sampling and the training policy;
* ``on-notis``: overlap without the correction (``ppo.tis_cap=0``).

Per variant it prints the wall-clock seconds of every ``step()`` (the first, warm-up included in
the trajectory but left out of the median), the reward trajectory, the log-prob gap between the
sampling engine and the learner, and the policy-version lag. Prints figures, asserts nothing;
JSON and a chart (reward per iteration, median s/iteration) go to
``benchmarks/results/bench_overlap-<time>.{json,png}``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from statistics import fmean

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench
from bench_ppo import BASE
from bench_ppo import VARIANTS as PPO_VARIANTS

# bench_ppo.py's job (2 engines, 2 ZeRO-2 policy ranks, digit_fraction reward), GRPO, with a
# learning rate at which the reward moves within 10 iterations (tests/test_ppo.py's).
JOB = [*BASE, *PPO_VARIANTS["grpo"], "ppo.prompts_per_iteration=16", "policy.lr=3e-3", "ppo.kl_coef=0.01",
       "logging.trackers=[]"]
PHASES = ("generate", "score", "train", "overlap_wait", "sync")
VARIANTS = {"off": ["ppo.overlap=false"], "on": ["ppo.overlap=true"], "on-notis": ["ppo.overlap=true", "ppo.tis_cap=0"]}


def run_variant(variant: str, args, root: str) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.ppo import PPOTrainer

    overrides = [f"run_dir={os.path.join(root, variant)}", f"seed={args.seed}",
                 f"model.tiny_hidden_size={args.hidden}", f"model.tiny_layers={args.layers}",
                 f"ppo.iterations={args.iterations}", *JOB, *VARIANTS[variant], *args.overrides]
    trainer = PPOTrainer(load_config(None, overrides))
    records, step_s = [], []
    try:
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            records.append(trainer.step())
            step_s.append(time.perf_counter() - t0)
            r = records[-1]
            print(f"   {variant} iteration {r['iteration']}: {step_s[-1]:.2f} s, reward {r['reward_mean']:.3f}, "
                  f"lag {r.get('policy_lag')}, gap {r.get('logprob_gap_vllm_learner', float('nan')):.2e}", flush=True)
    finally:
        trainer.close()
    return {"variant": variant, "overrides": overrides, "step_s": step_s, "records": records,
            "median_step_s": bench.median(step_s[1:]),
            "rewards": [r["reward_mean"] for r in records]}


def chart(json_path, payload: dict):
    """Reward per iteration of every variant (same seed) and the median seconds per step()."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["runs"]
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for res in results:
        ax_r.plot(range(1, len(res["rewards"]) + 1), res["rewards"], marker="o", label=res["variant"])
    ax_r.set_xlabel("iteration")
    ax_r.set_ylabel("reward_mean (digit_fraction)")
    ax_r.set_title("reward per iteration, same seed")
    ax_r.legend()
    bars = ax_t.bar([r["variant"] for r in results], [r["median_step_s"] for r in results])
    ax_t.bar_label(bars, fmt="%.3g")
    ax_t.set_ylabel("s / iteration (median after warm-up)")
    ax_t.set_title("wall-clock seconds per step()")
    title = f"bench_overlap {payload['machine']['date']} {' '.join(payload['args']['overrides'])}"
    return bench.save_figure(fig, json_path, title)


def print_report(results: list[dict], args) -> tuple[str, str]:
    """The comparison table and the reward trajectories, printed and returned as text."""
    off = next((r for r in results if r["variant"] == "off"), results[0])
    print()
    table = bench.print_table(
        ["variant", "median s/it", "vs off", *[f"{p} s" for p in PHASES], "reward first 3", "reward last 3",
         "gap (lag 1)", "tis weight"],
        [[r["variant"], r["median_step_s"], r["median_step_s"] / off["median_step_s"],
          *[bench.median([x.get(f"time/{p}_s", 0.0) for x in r["records"][1:]]) for p in PHASES],
          fmean(r["rewards"][:3]), fmean(r["rewards"][-3:]),
          bench.median([x["logprob_gap_vllm_learner"] for x in r["records"] if x.get("policy_lag") == 1]),
          bench.median([x.get("is/weight_mean") for x in r["records"]])] for r in results],
        title=f"{args.iterations} iterations per variant, {args.hidden}x{args.layers} tiny Llama, seed {args.seed}; "
              "s/it = wall-clock step(), phases = the driver's wait in each (medians after the first); "
              "gap = mean |sampler - learner| token log-prob",
    )
    print("\nreward per iteration:")
    trajectories = bench.print_table(["variant", *[str(i + 1) for i in range(args.iterations)]],
                                     [[r["variant"], *r["rewards"]] for r in results])
    return table, trajectories


def main() -> None:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=10,
                        help="iterations per variant (the first is warm-up)")
    bench.add_model_shape(parser, 128, 2)
    parser.add_argument("--variants", default="off,on", help=f"any of {','.join(VARIANTS)}")
    bench.add_config_overrides(parser)
    parser.add_argument("--verbose", action="store_true", help="show the actors' logs")
    args = parser.parse_args()
    if bench.replot_requested(args, chart):
        return

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.common import init_ray

    init_ray(load_config(), log_to_driver=args.verbose)
    facts = bench.announce("bench_overlap")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as root:
        for variant in args.variants.split(","):
            print(f"-- {variant} ...", flush=True)
            results.append(run_variant(variant, args, root))
    ray.shutdown()

    table, trajectories = print_report(results, args)
    payload = {"machine": facts, "args": vars(args), "table": table, "trajectories": trajectories, "runs": results}
    bench.publish("bench_overlap", payload, chart, args.no_json)

if __name__ == "__main__":
    main()
