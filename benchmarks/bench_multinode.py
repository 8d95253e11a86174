"""PPO across a local multi-node cluster: iteration time with one and two rollout nodes, and the
weight sync across network namespaces against the same sync inside one node, in one run.

    python benchmarks/bench_multinode.py [--iterations 4] [--hidden 256] [--layers 4]

Brings up ``rlhf-ray cluster up --rollout-nodes 2 --learner-nodes 1`` (a namespace per node as
root, loopback otherwise), then runs the same short PPO stage three times as a driver on the head
(``python -m rlhf_ray.cluster.where``):

* ``1 rollout node``: one engine on a rollout node, learners and scorers on the learner node;
* ``2 rollout nodes``: two engines, one per rollout node, the same model and batch;
* ``engine on learner node``: one engine pinned next to the learner (``rollout.ray_resources=
  {learner: 1}``), so the learner -> engine broadcast never leaves the node.

Iteration time is the median over iterations after the first; sync time the median of timed
syncs after each run (plus the in-loop sync phase). Prints figures, asserts nothing; results to
``benchmarks/results/bench_multinode-<time>.{json,png}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _bench_util as bench

from rlhf_ray.cluster import local

SETUPS = {  # name -> (engines, where engines go)
    "1 rollout node": (1, "{rollout: 1}"),
    "2 rollout nodes": (2, "{rollout: 1}"),
    "engine on learner node": (1, "{learner: 1}"),
}


def run_setup(state_path: Path, out_dir: Path, name: str, args) -> dict:
    engines, where = SETUPS[name]
    tag = name.replace(" ", "_")
    out = out_dir / f"{tag}.json"
    overrides = [
        f"run_dir={out_dir / tag}", "ray_address=auto", "model.policy=builtin:tiny",
        f"model.tiny_hidden_size={args.hidden}", f"model.tiny_layers={args.layers}", "data.task=arithmetic",
        "scorers.use_task_gold_as_reward=false", "scorers.reward_functions=rlhf_ray.tasks.rewards:digit_fraction",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.max_model_len=128", "data.max_prompt_tokens=32",
        "rollout.gpu_memory_utilization=0.05", "policy.micro_batch_size=16", f"ppo.iterations={args.iterations}",
        "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4", f"ppo.prompts_per_iteration={args.prompts}",
        f"rollout.num_engines={engines}", "policy.num_ranks=1", "sync.parity_every=0",
        "checkpoint.save_final=false", f"rollout.ray_resources={where}", "policy.ray_resources={learner: 1}",
        "scorers.ray_resources={learner: 1}", "logging.trackers=[]",
    ]
    cmd = [sys.executable, str(REPO / "launch" / "cluster.py"), "exec", "--state", str(state_path), "--",
           sys.executable, "-m", "rlhf_ray.cluster.where", "--out", str(out),
           "--sync-repeats", str(args.sync_repeats), *overrides]
    print(f"bench_multinode: {name}: {engines} engine(s) on {where}", flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    report = json.loads(out.read_text())
    later = report["history"][1:] or report["history"]
    nodes = report["nodes"]
    rank0 = report["placement"]["policy"][0]
    engine_nodes = [nodes[a["node_id"]]["name"] for a in report["placement"]["rollout"]]
    return {
        "engines": engines, "engine_nodes": engine_nodes, "learner_node": nodes[rank0["node_id"]]["name"],
        "sync_address": report["sync_address"], "engine_ips": [a["ip"] for a in report["placement"]["rollout"]],
        "iteration_s": bench.median([r["time/iteration_s"] for r in later]),
        "generate_s": bench.median([r["time/generate_s"] for r in later]),
        "sync_phase_s": bench.median([r["time/sync_s"] for r in later]),
        "sync_s": bench.median(report["sync_s"]), "sync_s_all": report["sync_s"],
        "weight_bytes": report["weight_bytes"],
        "tokens_per_iteration": bench.median([r["generated_tokens"] for r in later]),
        "history": report["history"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration (x 4 samples)")
    parser.add_argument("--new-tokens", type=int, default=32)
    bench.add_model_shape(parser, 256, 4, seed=False)
    parser.add_argument("--sync-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if bench.replot_requested(args, chart):
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on this machine only
    for key, value in (("DS_ACCELERATOR", "cpu"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("OMP_NUM_THREADS", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    facts = bench.announce("bench_multinode")
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    state_path = work / "cluster.json"
    state = local.up(2, 1, rollout_cpus=1, learner_cpus=4, state_path=state_path)
    try:
        results = {name: run_setup(state_path, work, name, args) for name in SETUPS}
    finally:
        local.down(state_path)

    one, two, same = (results[n] for n in SETUPS)
    rows = [[n, r["engines"], ",".join(r["engine_nodes"]), r["iteration_s"], r["generate_s"], r["sync_phase_s"],
             r["sync_s"]] for n, r in results.items()]
    title = (f"PPO on a local {state.mode} cluster, builtin:tiny {args.hidden}x{args.layers} "
             f"({one['weight_bytes'] / 1e6:.1f} MB of weights), {args.prompts}x4 samples x {args.new_tokens} tokens")
    bench.print_table(["setup", "engines", "engine nodes", "iteration s", "generate s", "sync phase s", "sync s"],
                      rows, title=title)
    figures = {
        "iteration_speedup_two_vs_one_rollout_node": one["iteration_s"] / two["iteration_s"],
        "generate_speedup_two_vs_one_rollout_node": one["generate_s"] / two["generate_s"],
        "sync_cross_namespace_over_same_node": one["sync_s"] / same["sync_s"],
    }
    for k, v in figures.items():
        print(f"{k}: {v:.2f}")
    payload = {"machine": facts, "network": state.mode, "args": vars(args), "figures": figures, "setups": results}
    bench.publish("bench_multinode", payload, chart, args.no_json)
    return 0


def chart(path, payload: dict):
    """Iteration time (generate and the rest) and the timed weight sync, per setup."""
    setups = payload["setups"]
    labels = list(setups)
    return bench.save_chart(path, [
        {"title": "PPO iteration (median, after the first)", "labels": labels, "ylabel": "seconds",
         "series": {"generate": [r["generate_s"] for r in setups.values()],
                    "rest": [r["iteration_s"] - r["generate_s"] for r in setups.values()]}, "stacked": True},
        {"title": "weight sync learner -> engine(s) (median)", "labels": labels, "ylabel": "seconds",
         "series": {"timed sync": [r["sync_s"] for r in setups.values()]}},
    ], f"bench_multinode ({payload['network']})")


if __name__ == "__main__":
    sys.exit(main())
