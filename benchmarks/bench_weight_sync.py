"""Weight sync bandwidth: learner actor -> one vLLM engine actor, against this machine's limits.

    python benchmarks/bench_weight_sync.py [--sizes 5m,25m,100m] [--buckets-mb 1,16,128]

For each tiny-model size and bucket size, times full syncs (pack, broadcast, vLLM reload) as the
driver sees them, and prints bytes/s next to a raw gloo broadcast between two actors and a memory
copy into a preallocated buffer, both measured in the same run. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import ray
import torch

from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model
from rlhf_ray.platform import detect
from rlhf_ray.sync import WeightSender, free_port, rank_layout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import gloo_baselines

SIZES = {
    "5m": TinyModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024),
    "25m": TinyModelSpec(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=2048),
    "100m": TinyModelSpec(
        hidden_size=1024, num_layers=6, num_heads=16, num_kv_heads=16, intermediate_size=4096
    ),
}
BASELINE_BYTES = 64 << 20


@ray.remote(num_cpus=1)
class BenchSender:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.sender = WeightSender()

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def open(self, addr: str, port: int, world_size: int, backend: str) -> None:
        self.sender.open(addr, port, world_size, backend)

    def manifest(self, bucket_bytes: int) -> dict:
        return self.sender.manifest_for(self.model.state_dict().items(), bucket_bytes)

    def send(self, manifest: dict) -> float:
        start = time.perf_counter()
        self.sender.send(self.model.state_dict().items(), manifest)
        return time.perf_counter() - start


def baselines(backend: str, iters: int = 10) -> tuple[float, float]:
    """Raw gloo broadcast and memcpy bytes/s (the shared helper in _bench_util, same run)."""
    b = gloo_baselines(backend, BASELINE_BYTES, iters)
    return b["broadcast_bytes_per_s"], b["memcpy_bytes_per_s"]


def bench_size(name: str, model_dir: str, bucket_sizes: list[int], repeats: int, backend: str) -> list[dict]:
    from rlhf_ray.actors.rollout import create_rollout_actors

    sender = BenchSender.remote(model_dir)
    (engine,) = create_rollout_actors(
        1, model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3
    )
    world_size, (offset,) = rank_layout(1, 1)
    addr, port = ray.get(sender.address.remote())
    ray.get(
        [
            sender.open.remote(addr, port, world_size, backend),
            engine.join_weight_sync.remote(addr, port, world_size, offset, backend),
        ]
    )
    rows = []
    for bucket_bytes in bucket_sizes:
        manifest = ray.get(sender.manifest.remote(bucket_bytes))
        walls, sends = [], []
        for _ in range(repeats + 1):  # the first sync allocates the receive buffers: not counted
            start = time.perf_counter()
            send_s, _ = ray.get([sender.send.remote(manifest), engine.receive_weights.remote(manifest)])
            walls.append(time.perf_counter() - start)
            sends.append(send_s)
        rows.append(
            {
                "model": name,
                "bytes": manifest["total_bytes"],
                "bucket_mb": bucket_bytes / 2**20,
                "buckets": len(manifest["buckets"]),
                "first_s": walls[0],
                "wall_s": statistics.median(walls[1:]),
                "send_s": statistics.median(sends[1:]),
            }
        )
    for actor in (sender, engine):
        ray.kill(actor)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5m,25m,100m")
    parser.add_argument("--buckets-mb", default="1,16,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "rlhf_ray_bench_models"))
    args = parser.parse_args()

    platform = detect(args.backend)
    platform.apply_env()
    env = {k: v for k, v in platform.process_env().items()}
    env.update(RAY_DEDUP_LOGS="0", VLLM_LOGGING_LEVEL="WARNING")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})

    bcast, copy = baselines(platform.dist_backend)
    print(
        f"baseline on this machine ({platform.dist_backend}, {BASELINE_BYTES >> 20} MB buffers): "
        f"broadcast {bcast / 1e9:.2f} GB/s, memcpy {copy / 1e9:.2f} GB/s"
    )
    bucket_sizes = [int(float(mb) * 2**20) for mb in args.buckets_mb.split(",")]
    header = (
        f"{'model':>6} {'MB':>7} {'bucket':>7} {'n':>4} {'first s':>8} {'sync s':>7} {'send s':>7} "
        f"{'GB/s':>6} {'/bcast':>7} {'/memcpy':>8}"
    )
    print(header)
    for name in args.sizes.split(","):
        model_dir = str(build_tiny_model(os.path.join(args.model_root, name), SIZES[name]))
        for r in bench_size(name, model_dir, bucket_sizes, args.repeats, platform.dist_backend):
            rate = r["bytes"] / r["wall_s"]
            print(
                f"{r['model']:>6} {r['bytes'] / 1e6:7.1f} {r['bucket_mb']:6g}M {r['buckets']:4d} "
                f"{r['first_s']:8.3f} {r['wall_s']:7.3f} {r['send_s']:7.3f} {rate / 1e9:6.2f} "
                f"{rate / bcast:7.2f} {rate / copy:8.3f}",
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
