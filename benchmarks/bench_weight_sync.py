"""Weight sync: learner actor -> one vLLM engine actor, both transports, against this machine's limits.

    python benchmarks/bench_weight_sync.py [--sizes 10m,50m,200m] [--buckets-mb 16,64] [--repeats 3]

For each tiny-model size, bucket size and transport (``broadcast``: gloo from the learner into the
engine's worker; ``shm``: the learner packs into a shared-memory segment that the worker reads in
place, as ``sync.transport=auto`` picks on one node) it times full syncs as the driver sees them:
pack, hand-over and vLLM's ``reload_weights`` (which on CPU re-packs every linear layer for
oneDNN). The same run measures two ceilings between two Ray actors with 64 MB buffers (again for each model size,
right before its syncs): a raw gloo
broadcast (the broadcast goal: >= 80% of it) and a memory copy into a preallocated buffer (the
shared-memory goal: >= 50% of it). It also times the hand-over alone (the engine's worker receives
or reads the buckets without loading them into vLLM): what the transports themselves reach.

Prints figures, asserts nothing; results to ``benchmarks/results/bench_weight_sync-<time>.{json,png}``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import ray
import torch

from rlhf_ray.actors.learner import WeightSyncSource
from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model
from rlhf_ray.platform import detect
from rlhf_ray.ports import free_port
from rlhf_ray.sync import manifest_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_util as bench

SIZES = {  # head size 32, as the stages' tiny models
    "10m": TinyModelSpec.of_width(512, 3, 1536),  # 9.9M parameters
    "50m": TinyModelSpec.of_width(768, 6, 2816),  # 53M
    "200m": TinyModelSpec.of_width(1024, 14, 4096),  # 206M
}
BASELINE_BYTES = 64 << 20
GOALS = {"broadcast": ("gloo", 0.8), "shm": ("memcpy", 0.5)}


@ray.remote(num_cpus=1)
class BenchSender(WeightSyncSource):
    """Learner rank 0's sync verbs around an HF model, so the driver's own set-up connects it."""

    rank = 0

    def __init__(self, model_dir: str, platform_name: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.platform = detect(platform_name)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()

    def manifest(self, bucket_bytes: int) -> dict:
        return manifest_for(self.model.state_dict().items(), bucket_bytes)

    def send(self, manifest: dict) -> float:
        start = time.perf_counter()
        self.weight_sender.send(self.model.state_dict().items(), manifest)
        return time.perf_counter() - start


def timed_receive(actor, manifest: dict, load: bool) -> float:
    """Runs inside the engine actor (``__ray_call__``): one receive, timed there."""
    start = time.perf_counter()
    if load:
        actor.receive_weights(manifest)
    else:
        actor.engine.llm.collective_rpc("receive_weights", args=(manifest, False))
    return time.perf_counter() - start


def bench_size(name: str, model_dir: str, bucket_sizes: list[int], repeats: int, platform) -> list[dict]:
    from rlhf_ray.actors.rollout import create_rollout_actors
    from rlhf_ray.actors.rollout_pool import open_weight_sync, weight_sync_layout

    sender = BenchSender.remote(model_dir, platform.name)
    (engine,) = create_rollout_actors(1, model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3)
    rows = []
    try:
        for transport in ("broadcast", "shm"):
            layout = weight_sync_layout(sender, [engine], transport, 1, platform)
            for bucket_bytes in bucket_sizes:
                manifest = ray.get(sender.manifest.remote(bucket_bytes))
                open_weight_sync(sender, [engine], manifest, layout, platform.dist_backend)
                row = {"model": name, "transport": transport, "bytes": manifest["total_bytes"],
                       "bucket_mb": bucket_bytes / 2**20, "buckets": len(manifest["buckets"])}
                for load in (True, False):
                    walls, sends, receives = [], [], []
                    for _ in range(repeats + 1):  # the first sync fills buffers and page tables: not counted
                        start = time.perf_counter()
                        send_s, receive_s = ray.get(
                            [sender.send.remote(manifest), engine.__ray_call__.remote(timed_receive, manifest, load)]
                        )
                        walls.append(time.perf_counter() - start)
                        sends.append(send_s)
                        receives.append(receive_s)
                    key = "sync" if load else "handover"
                    row[f"{key}_first_s"] = walls[0]
                    row[f"{key}_s"] = bench.median(walls[1:])
                    row[f"{key}_send_s"] = bench.median(sends[1:])
                    row[f"{key}_receive_s"] = bench.median(receives[1:])
                rows.append(row)
                print(f"  {name} {transport} {row['bucket_mb']:g} MB: sync {row['sync_s']:.3f} s, "
                      f"hand-over {row['handover_s']:.3f} s", flush=True)
    finally:
        for actor in (sender, engine):
            ray.kill(actor)
    return rows


def main() -> None:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--sizes", default="10m,50m,200m", help=f"any of {','.join(SIZES)}")
    parser.add_argument("--buckets-mb", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "rlhf_ray_bench_models"))
    args = parser.parse_args()
    if bench.replot_requested(args, chart):
        return

    platform = detect(args.backend)
    if not platform.shm_weight_sync:
        raise SystemExit("the shared-memory transport is CPU-only: run this benchmark with --backend cpu")
    platform.apply_env()
    env = dict(platform.process_env(), RAY_DEDUP_LOGS="0", VLLM_LOGGING_LEVEL="WARNING")
    facts = bench.announce("bench_weight_sync")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})

    bucket_sizes = [int(float(mb) * 2**20) for mb in args.buckets_mb.split(",")]
    rows = []
    for name in args.sizes.split(","):
        model_dir = str(build_tiny_model(os.path.join(args.model_root, name), SIZES[name]))
        # The ceilings are measured again for each size, right before its syncs: on a shared
        # machine the load moves within minutes.
        limits = bench.gloo_baselines(platform.dist_backend, BASELINE_BYTES)
        ceiling = {"gloo": limits["broadcast_bytes_per_s"], "memcpy": limits["memcpy_bytes_per_s"]}
        print(f"{name}: limits ({BASELINE_BYTES >> 20} MB buffers, two Ray actors): raw gloo broadcast "
              f"{ceiling['gloo'] / 1e9:.2f} GB/s, memcpy {ceiling['memcpy'] / 1e9:.2f} GB/s", flush=True)
        for r in bench_size(name, model_dir, bucket_sizes, args.repeats, platform):
            limit_name, goal = GOALS[r["transport"]]
            r.update(limit=limit_name, goal=goal, limit_gb_per_s=ceiling[limit_name] / 1e9)
            for key in ("sync", "handover"):
                r[f"{key}_gb_per_s"] = r["bytes"] / r[f"{key}_s"] / 1e9
                r[f"{key}_vs_limit"] = r[f"{key}_gb_per_s"] / r["limit_gb_per_s"]
            rows.append(r)
    ray.shutdown()

    table = bench.print_table(
        ["model", "MB", "transport", "bucket", "n", "first s", "sync s", "GB/s", "vs limit", "hand-over s",
         "GB/s", "vs limit", "limit GB/s", "goal"],
        [[r["model"], r["bytes"] / 1e6, r["transport"], f"{r['bucket_mb']:g}M", r["buckets"], r["sync_first_s"],
          r["sync_s"], r["sync_gb_per_s"], r["sync_vs_limit"], r["handover_s"], r["handover_gb_per_s"],
          r["handover_vs_limit"], r["limit_gb_per_s"], f">= {r['goal']:.0%} of {r['limit']}"] for r in rows],
        title="weight sync: full sync (hand-over + vLLM reload) and hand-over alone; 'vs limit' = bytes/s over "
        "the transport's ceiling (broadcast: raw gloo; shm: memcpy), same run",
    )
    payload = {"machine": facts, "args": vars(args), "baseline_buffer_bytes": BASELINE_BYTES, "rows": rows,
               "table": table}
    bench.publish("bench_weight_sync", payload, chart, args.no_json)


def chart(path, payload: dict):
    """Each sync's bandwidth, full and hand-over only: as a fraction of its transport's ceiling, in GB/s."""
    rows = payload["rows"]
    labels = [f"{r['model']} {r['transport']} {r['bucket_mb']:g}M" for r in rows]
    return bench.save_chart(path, [
        {"title": "fraction of the transport's ceiling (broadcast: gloo, shm: memcpy)", "labels": labels,
         "series": {"full sync": [r["sync_vs_limit"] for r in rows],
                    "hand-over only": [r["handover_vs_limit"] for r in rows]}, "ylabel": "fraction"},
        {"title": "GB/s", "labels": labels,
         "series": {"full sync": [r["sync_gb_per_s"] for r in rows],
                    "hand-over only": [r["handover_gb_per_s"] for r in rows]}, "ylabel": "GB/s"},
    ], f"bench_weight_sync {payload['machine']['date']}")

if __name__ == "__main__":
    main()
