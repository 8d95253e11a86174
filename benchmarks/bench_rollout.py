"""Rollout: vLLM generation tokens/s against HF ``generate`` on the same model and batch, same run.

    python benchmarks/bench_rollout.py [--hidden 512 --layers 6] [--batches 32,128]
                                       [--max-new-tokens 16] [--repeats 3] [--threads 1,2]
                                       [--dtype float32|bfloat16]

The offline tiny Llama (default 512 x 6, MLP 1024: bench_ppo.py's 512x6, 15.8M parameters, fp32),
the arithmetic-task prompts (``--group`` samples per prompt, as a GRPO rollout asks), sampling at
temperature 1 with every sequence forced to exactly ``--max-new-tokens`` new tokens (vLLM
``ignore_eos``; HF ``min_new_tokens``), so both sides produce the same number of tokens. HF
``generate`` runs first in this process (``torch.set_num_threads`` for each of ``--threads``; left
padding, KV cache on), then one ``vllm.LLM`` engine per thread count (enforce_eager, the CPU
backend, its worker unpinned with ``OMP_NUM_THREADS`` threads, as rlhf_ray's rollout actors start
it) in the same process tree. Each side's fastest thread count is compared. Each batch is timed
``--repeats`` times after one warm-up call; the median is reported.

"vllm / hf" is the rollout ratio: above 1, vLLM generates faster on this machine. Prints figures,
asserts nothing; results to ``benchmarks/results/bench_rollout-<time>.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench


def hf_side(model_dir: str, prompts: list[str], max_new: int, repeats: int, threads: int, dtype: str) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                pad_token_id=tok.pad_token_id,
            )
            dt = time.perf_counter() - t0
            assert out.shape[1] - enc["input_ids"].shape[1] == max_new
            if i:
                times.append(dt)
    return times


def vllm_side(
    model_dir: str, batches: dict[int, list[str]], max_new: int, repeats: int, prefix_caching: bool,
    threads: int, dtype: str,
) -> dict[int, list[float]]:
    from vllm import LLM, SamplingParams

    # The engine's worker process reads these when it starts (the platform sets nobind already).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    llm = LLM(
        model=model_dir,
        dtype=dtype,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=max(64, 2 * max_new + 32),
        enable_prefix_caching=prefix_caching,
        seed=0,
    )
    sp = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_new, min_tokens=max_new, ignore_eos=True)
    out = {}
    for n, prompts in batches.items():
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            assert all(len(r.outputs[0].token_ids) == max_new for r in res)
            if i:
                times.append(dt)
        out[n] = times
    del llm
    return out


def main() -> None:
    args = parse_args()
    if bench.replot_requested(args, chart):
        return
    from rlhf_ray.models.tiny import TinyModelSpec
    from rlhf_ray.platform import detect
    from rlhf_ray.tasks import get_task

    detect("auto").apply_env()  # VLLM_CPU_KVCACHE_SPACE and friends, as the rollout actors get them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    facts = bench.announce("bench_rollout")
    spec = TinyModelSpec.of_width(args.hidden, args.layers, args.intermediate, args.seed)
    model_dir = bench.tiny_model_dir("bench_rollout", spec)
    sizes = [int(b) for b in args.batches.split(",")]
    base = get_task("arithmetic", args.seed).prompts(max(sizes))
    batches = {n: [p for p in base[: max(1, n // args.group)] for _ in range(args.group)][:n] for n in sizes}
    threads = [int(t) for t in args.threads.split(",")]
    hf_by_t, vl_by_t = time_both_sides(args, model_dir, batches, threads)

    runs = [compare_at(n, n * args.max_new_tokens, hf_by_t, vl_by_t) for n in sizes]
    print()
    table = print_runs(runs, args, threads)
    for r in runs:
        pick = "vllm" if r["ratio"] >= 1 else "hf"
        print(f"{r['sequences']} sequences: {pick} is the faster rollout engine here "
              f"(rollout.engine={pick}, rollout.num_cpus={r['vllm_threads' if pick == 'vllm' else 'hf_threads']})")
    payload = {"machine": facts, "args": vars(args), "table": table, "runs": runs}
    bench.publish("bench_rollout", payload, chart, args.no_json)


def parse_args() -> argparse.Namespace:
    parser = bench.arg_parser(__doc__)
    bench.add_model_shape(parser, intermediate="2 x hidden (builtin:tiny)", dtype="both sides")
    parser.add_argument("--batches", default="32,128", help="sequences per generate call, comma-separated")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (the prompt is repeated)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2",
                        help="torch threads of the HF side, comma-separated: each is measured; the ratio uses "
                             "the fastest")
    parser.add_argument("--no-prefix-caching", action="store_true", help="vLLM enable_prefix_caching=False")
    return parser.parse_args()


def time_both_sides(args, model_dir: str, batches: dict[int, list[str]], threads: list[int]
                    ) -> tuple[dict, dict]:
    """Seconds of every generate call, ``{threads: {sequences: [s, ...]}}``: HF ``generate`` first,
    then one vLLM engine per thread count."""
    hf_by_t: dict[int, dict[int, list[float]]] = {t: {} for t in threads}
    for t in threads:
        for n, prompts in batches.items():
            print(f"-- hf generate, {n} sequences, {t} thread(s) ...", flush=True)
            hf_by_t[t][n] = hf_side(model_dir, prompts, args.max_new_tokens, args.repeats, t, args.dtype)
    vl_by_t: dict[int, dict[int, list[float]]] = {}
    for t in threads:
        print(f"-- vllm, {t} thread(s) ...", flush=True)
        vl_by_t[t] = vllm_side(model_dir, batches, args.max_new_tokens, args.repeats,
                               not args.no_prefix_caching, t, args.dtype)
    return hf_by_t, vl_by_t


def compare_at(n: int, tokens: int, hf_by_t: dict, vl_by_t: dict) -> dict:
    """Batches of ``n`` sequences (``tokens`` generated): each side at its fastest thread count, and
    the rollout ratio vLLM / HF."""
    hf_t = min(hf_by_t, key=lambda t: bench.median(hf_by_t[t][n]))
    vl_t = min(vl_by_t, key=lambda t: bench.median(vl_by_t[t][n]))
    h, v = bench.median(hf_by_t[hf_t][n]), bench.median(vl_by_t[vl_t][n])
    return {
        "sequences": n,
        "tokens": tokens,
        "hf_s": hf_by_t[hf_t][n],
        "vllm_s": vl_by_t[vl_t][n],
        "hf_tokens_per_s": tokens / h,
        "vllm_tokens_per_s": tokens / v,
        "ratio": h / v,
        "hf_threads": hf_t,
        "hf_s_by_threads": {str(t): hf_by_t[t][n] for t in hf_by_t},
        "vllm_threads": vl_t,
        "vllm_s_by_threads": {str(t): vl_by_t[t][n] for t in vl_by_t},
    }


def print_runs(runs: list[dict], args, threads: list[int]) -> str:
    rows = [[r["sequences"], r["tokens"], *[bench.median(r["hf_s_by_threads"][str(t)]) for t in threads],
             *[bench.median(r["vllm_s_by_threads"][str(t)]) for t in threads], r["hf_tokens_per_s"],
             r["vllm_tokens_per_s"], r["ratio"]] for r in runs]
    title = (
        f"{args.hidden}x{args.layers} {args.dtype}, {args.max_new_tokens} new tokens per sequence (forced), group "
        f"{args.group}, both sides on {args.threads} threads (tok/s and the ratio: each side's fastest), vLLM prefix caching "
        f"{'off' if args.no_prefix_caching else 'on'}; median of {args.repeats} after 1 warm-up"
    )
    return bench.print_table(
        ["sequences", "tokens", *[f"hf s ({t} thr)" for t in threads],
         *[f"vllm s ({t} thr)" for t in threads], "hf tok/s", "vllm tok/s", "vllm / hf"],
        rows,
        title=title,
    )


def chart(path, payload: dict):
    """Generated tokens/s of both sides and their ratio, per batch size."""
    runs = payload["runs"]
    labels = [f"{r['sequences']} seqs" for r in runs]
    panels = [
        {"title": "generated tokens/s", "labels": labels, "ylabel": "tokens/s",
         "series": {"HF generate": [r["hf_tokens_per_s"] for r in runs],
                    "vLLM": [r["vllm_tokens_per_s"] for r in runs]}},
        {"title": "vLLM / HF (tokens/s ratio)", "labels": labels,
         "series": {"ratio": [r["ratio"] for r in runs]}, "ylabel": "x", "hline": (1.0, "parity")},
    ]
    return bench.save_chart(path, panels, f"bench_rollout {payload['machine']['date']}")


if __name__ == "__main__":
    main()
