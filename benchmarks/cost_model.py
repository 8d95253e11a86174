"""GPU cost model of a PPO/GRPO plan: memory per role, weight-sync time, iteration split. No GPU needed.

    python benchmarks/cost_model.py configs/llama8b_2x8gpu_ppo.yaml configs/llama70b_zero3_offload_ppo.yaml
           [--params 8.03e9,70.6e9] [--reward-params 8.03e9] [--prompt-tokens 256] [--response-tokens 512,1024]
           [--mfu-train 0.3 --mfu-forward 0.4] [--decode-step-ms 15,30] [--decode-tps-per-gpu 2000,700]

The GPUs of each role come from the config checker's own arithmetic
(``rlhf_ray.config.cluster_fit.role_asks``, what ``rlhf-ray config check`` sums against the cluster);
everything else is stated arithmetic with the assumptions printed next to it:

* memory (bytes per parameter): bf16 weights 2, bf16 grads 2, fp32 master 4 + Adam m 4 + v 4 = 12;
  ZeRO-3 divides all three over the role's ranks (ZeRO-2: grads and optimiser only; ZeRO-1:
  optimiser only); ``offload_optimizer`` moves the 12 B/param to host memory. vLLM: weights / TP,
  KV cache = gpu_memory_utilization x GPU memory - weights - 4 GB (activations, graphs). KV bytes
  per token = 2 x layers x KV heads x head dim x 2 B.
* weight sync: bf16 bytes = 2 x params, broadcast from policy rank 0 through one link (a pipelined
  broadcast costs about bytes / bandwidth whatever the number of receivers), at 80% of the link's
  nominal rate; ZeRO-3 adds the all-gather of the shards on the learner side (same bytes, at the
  learner's link: NVLink within a node, IB across nodes).
* iteration: generation = max(generated tokens / (decode tokens/s per GPU x rollout GPUs),
  max_new_tokens x decode step latency) (the throughput bound vs the longest sequence's tail);
  scoring = the slowest of the parallel forwards (2 x N x tokens / (GPUs x peak x forward MFU));
  training = 6 x N x tokens x epochs / (GPUs x peak x train MFU) (x 4/3 with activation
  checkpointing: one more forward) + host Adam steps when the optimiser is offloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_util import print_table

# Published architecture figures of the models the configs name (config.json of each).
ARCH = {
    "meta-llama/Llama-3.1-8B-Instruct": {
        "params": 8.03e9,
        "layers": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "hidden": 4096,
    },
    "meta-llama/Llama-3.3-70B-Instruct": {
        "params": 70.6e9,
        "layers": 80,
        "kv_heads": 8,
        "head_dim": 128,
        "hidden": 8192,
    },
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": {
        "params": 8.03e9,
        "layers": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "hidden": 4096,
    },
}
GPU_GB = 80.0
PEAK_BF16 = 989e12  # H100 SXM dense bf16 FLOP/s
LINKS = {"NVLink (H100, ~450 GB/s)": 450e9, "IB 400 Gb/s": 50e9, "IB 100 Gb/s": 12.5e9}
LINK_EFF = 0.8


def model_memory(params: float, ranks: int, zero: int, offload: bool) -> tuple[float, float]:
    """(GPU GB per rank, host GB per rank) of a trained model's weights, grads and Adam states."""
    w, g, o = 2 * params, 2 * params, 12 * params
    if zero >= 3:
        w /= ranks
    if zero >= 2:
        g /= ranks
    if zero >= 1:
        o /= ranks
    return ((w + g + (0 if offload else o)) / 1e9, (o if offload else 0) / 1e9)


def plan(path: str, args, idx: int) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.config.cluster_fit import role_asks

    cfg = load_config(path, check=False)
    asks = {a.role: a for a in role_asks(cfg)}
    pol = ARCH.get(cfg.model.policy, {})
    N = float(args.params.split(",")[idx]) if args.params else pol["params"]
    reward_name = cfg.model.reward[0] if cfg.model.reward else ""
    NR = ARCH.get(reward_name, {}).get("params", args.reward_params)
    ro = cfg.rollout
    tp = ro.tensor_parallel_size
    rows = cfg.ppo.prompts_per_iteration * ro.samples_per_prompt
    resp = min(int(args.response_tokens.split(",")[idx]), ro.max_new_tokens)
    gen_tokens = rows * resp
    tokens = rows * (args.prompt_tokens + resp)
    # --- memory
    mem = []
    kv_tok = 2 * pol["layers"] * pol["kv_heads"] * pol["head_dim"] * 2
    w_gpu = 2 * N / tp / 1e9
    kv_gpu = ro.gpu_memory_utilization * GPU_GB - w_gpu - 4
    kv_tokens = kv_gpu * 1e9 * tp / kv_tok
    mem.append(
        [
            "rollout (vLLM)",
            f"{ro.num_engines} x TP {tp}",
            f"{w_gpu:.1f}",
            "-",
            "-",
            f"KV {kv_gpu:.0f} GB = {kv_tokens / 1e3:.0f}k tokens/engine",
            "-",
        ]
    )
    for role, lc, n in (("policy", cfg.policy, N), ("critic", cfg.critic, N)):
        if role not in asks:
            continue
        gpu, host = model_memory(n, lc.num_ranks, lc.zero_stage, lc.offload_optimizer)
        w = 2 * n / (lc.num_ranks if lc.zero_stage >= 3 else 1) / 1e9
        g = 2 * n / (lc.num_ranks if lc.zero_stage >= 2 else 1) / 1e9
        o = 12 * n / lc.num_ranks / 1e9
        mem.append(
            [
                role,
                f"{lc.num_ranks} ranks ZeRO-{lc.zero_stage}",
                f"{w:.1f}",
                f"{g:.1f}",
                f"{o:.1f}" + (" (host)" if lc.offload_optimizer else ""),
                "activations: see config comments",
                f"{gpu:.1f} GPU + {host:.0f} host",
            ]
        )
    sc_gpus = cfg.scorers.num_gpus
    mem.append(
        [
            "reference",
            f"{sc_gpus:g} GPU",
            f"{2 * N / 1e9 / sc_gpus:.1f}",
            "-",
            "-",
            "forward only",
            f"{2 * N / 1e9 / sc_gpus:.1f}",
        ]
    )
    mem.append(
        [
            "reward",
            f"{sc_gpus:g} GPU",
            f"{2 * NR / 1e9 / sc_gpus:.1f}",
            "-",
            "-",
            "forward only",
            f"{2 * NR / 1e9 / sc_gpus:.1f}",
        ]
    )
    # --- sync
    sync_bytes = 2 * N
    two_nodes = cfg.cluster.nodes > 1
    gather = 0.0
    if cfg.policy.zero_stage >= 3 and cfg.policy.num_ranks > 1:
        learner_link = (
            LINKS["IB 400 Gb/s"]
            if cfg.policy.num_ranks > cfg.cluster.gpus_per_node
            else LINKS["NVLink (H100, ~450 GB/s)"]
        )
        gather = sync_bytes * (1 - 1 / cfg.policy.num_ranks) / (learner_link * LINK_EFF)
    sync = {name: sync_bytes / (bw * LINK_EFF) + gather for name, bw in LINKS.items()}
    # --- iteration split
    gpus = {k: a.total_gpus for k, a in asks.items()}
    step_ms = float(args.decode_step_ms.split(",")[idx])
    tps = float(args.decode_tps_per_gpu.split(",")[idx])
    gen = max(gen_tokens / (tps * gpus["rollout"]), ro.max_new_tokens * step_ms / 1e3)
    fwd = lambda n, g: 2 * n * tokens / (g * PEAK_BF16 * args.mfu_forward)
    score_parts = {
        "policy old log-probs": fwd(N, gpus["policy"]),
        "reference": fwd(N, sc_gpus),
        "reward": fwd(NR, sc_gpus),
    }
    if "critic" in asks:
        score_parts["critic values"] = fwd(N, gpus["critic"])
    score = max(score_parts.values())
    recompute = 4 / 3 if N > 30e9 else 1.0  # the 70B plan needs activation checkpointing (config comments)

    def train_time(n, lc, g):
        t = 6 * n * tokens * cfg.ppo.epochs * recompute / (g * PEAK_BF16 * args.mfu_train)
        if lc.offload_optimizer:  # DeepSpeed CPU Adam: ~1e9 params/s per rank with ~10 cores (assumption)
            t += cfg.ppo.epochs * cfg.ppo.minibatches * (n / lc.num_ranks) / args.cpu_adam_params_per_s
        return t

    train_parts = {"policy": train_time(N, cfg.policy, gpus["policy"])}
    if "critic" in asks:
        train_parts["critic"] = train_time(N, cfg.critic, gpus["critic"])
    train = max(train_parts.values())
    s = sync["IB 400 Gb/s"] if two_nodes else sync["NVLink (H100, ~450 GB/s)"]
    total = gen + score + train + s
    return {
        "config": path,
        "params": N,
        "rows": rows,
        "gen_tokens": gen_tokens,
        "tokens": tokens,
        "gpus": gpus,
        "memory": mem,
        "sync_bytes": sync_bytes,
        "sync": sync,
        "gather_s": gather,
        "split": {"generate": gen, "score": score, "train": train, "sync (IB 400)": s},
        "total": total,
        "score_parts": score_parts,
        "train_parts": train_parts,
        "step_ms": step_ms,
        "tps": tps,
        "recompute": recompute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "configs",
        nargs="*",
        default=["configs/llama8b_2x8gpu_ppo.yaml", "configs/llama70b_zero3_offload_ppo.yaml"],
    )
    parser.add_argument("--params", default="", help="policy parameters per config, comma-separated")
    parser.add_argument("--reward-params", type=float, default=8.03e9)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="mean prompt tokens (assumption)")
    parser.add_argument(
        "--response-tokens",
        default="512,1024",
        help="per config: mean response tokens (assumption; capped at rollout.max_new_tokens)",
    )
    parser.add_argument("--mfu-train", type=float, default=0.30)
    parser.add_argument("--mfu-forward", type=float, default=0.40)
    parser.add_argument(
        "--decode-step-ms", default="15,30", help="per config: ms per decode step of one engine"
    )
    parser.add_argument(
        "--decode-tps-per-gpu",
        default="2000,700",
        help="per config: sustained vLLM decode tokens/s per GPU at large batch",
    )
    parser.add_argument("--cpu-adam-params-per-s", type=float, default=1e9)
    args = parser.parse_args()
    for i, path in enumerate(args.configs):
        p = plan(path, args, i)
        print(
            f"\n== {path}: policy {p['params'] / 1e9:.2f}B, GPUs per role {p['gpus']} "
            f"(rlhf_ray.config.cluster_fit.role_asks)"
        )
        print_table(
            ["role", "layout", "weights GB/GPU", "grads GB/GPU", "Adam+master GB/rank", "other", "total GB"],
            p["memory"],
            title="memory per role (bf16 2 B, grads 2 B, fp32 master+Adam 12 B "
            "per param, split per ZeRO stage)",
        )
        print(
            f"weight sync: {p['sync_bytes'] / 1e9:.1f} GB bf16 (2 x params); ZeRO-3 gather "
            f"{p['gather_s']:.2f} s; at {LINK_EFF:.0%} of nominal: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in p["sync"].items())
        )
        print(
            f"iteration: {p['rows']} rows x ({args.prompt_tokens} prompt + "
            f"{p['gen_tokens'] // p['rows']} response) = {p['tokens'] / 1e6:.2f}M tokens, "
            f"{p['gen_tokens'] / 1e6:.2f}M generated; decode {p['tps']:.0f} tok/s/GPU, step {p['step_ms']:.0f} ms; "
            f"MFU train {args.mfu_train:.0%} (x{p['recompute']:.2f} recompute), forward {args.mfu_forward:.0%} "
            f"of {PEAK_BF16 / 1e12:.0f} TFLOP/s"
        )
        print_table(
            ["phase", "seconds", "% of iteration", "bound by"],
            [
                [
                    k,
                    v,
                    f"{100 * v / p['total']:.0f}%",
                    {
                        "generate": "max(throughput, tail)",
                        "score": max(p["score_parts"], key=p["score_parts"].get),
                        "train": max(p["train_parts"], key=p["train_parts"].get),
                    }.get(k, "link"),
                ]
                for k, v in p["split"].items()
            ]
            + [["iteration", p["total"], "100%", ""]],
        )
        print("  score parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in p["score_parts"].items()))
        print("  train parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in p["train_parts"].items()))


if __name__ == "__main__":
    main()
