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

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_util import (
    SHARED_NOTE,
    announce,
    median,
    model_shape_parser,
    print_table,
    save_chart,
    tiny_model_dir,
    write_results,
)


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
    parser = model_shape_parser(__doc__)
    parser.add_argument("--batches", default="32,128", help="sequences per generate call, comma-separated")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (the prompt is repeated)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        default="1,2",
        help="torch threads of the HF side, comma-separated: each is measured; the ratio uses the fastest",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides")
    parser.add_argument("--no-prefix-caching", action="store_true", help="vLLM enable_prefix_caching=False")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()

    from rlhf_ray.models.tiny import TinyModelSpec
    from rlhf_ray.platform import detect
    from rlhf_ray.tasks import get_task

    detect("auto").apply_env()  # VLLM_CPU_KVCACHE_SPACE and friends, as the rollout actors get them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    facts = announce("bench_rollout")
    model_dir = tiny_model_dir("bench_rollout", TinyModelSpec.of_width(args.hidden, args.layers, args.intermediate,
                                                                         args.seed))
    sizes = [int(b) for b in args.batches.split(",")]
    base = get_task("arithmetic", args.seed).prompts(max(sizes))
    batches = {n: [p for p in base[: max(1, n // args.group)] for _ in range(args.group)][:n] for n in sizes}

    threads = [int(t) for t in args.threads.split(",")]
    hf_by_t: dict[int, dict[int, list[float]]] = {t: {} for t in threads}
    for t in threads:
        for n in sizes:
            print(f"-- hf generate, {n} sequences, {t} thread(s) ...", flush=True)
            hf_by_t[t][n] = hf_side(model_dir, batches[n], args.max_new_tokens, args.repeats, t, args.dtype)
    vl_by_t: dict[int, dict[int, list[float]]] = {}
    for t in threads:
        print(f"-- vllm, {t} thread(s) ...", flush=True)
        vl_by_t[t] = vllm_side(model_dir, batches, args.max_new_tokens, args.repeats, not args.no_prefix_caching,
                               t, args.dtype)
    best_t = {n: min(threads, key=lambda t: median(hf_by_t[t][n])) for n in sizes}
    best_vt = {n: min(threads, key=lambda t: median(vl_by_t[t][n])) for n in sizes}
    hf = {n: hf_by_t[best_t[n]][n] for n in sizes}
    vl = {n: vl_by_t[best_vt[n]][n] for n in sizes}

    rows, runs = [], []
    for n in sizes:
        toks = n * args.max_new_tokens
        h, v = median(hf[n]), median(vl[n])
        runs.append(
            {
                "sequences": n,
                "tokens": toks,
                "hf_s": hf[n],
                "vllm_s": vl[n],
                "hf_tokens_per_s": toks / h,
                "vllm_tokens_per_s": toks / v,
                "ratio": h / v,
                "hf_threads": best_t[n],
                "hf_s_by_threads": {str(t): hf_by_t[t][n] for t in threads},
                "vllm_threads": best_vt[n],
                "vllm_s_by_threads": {str(t): vl_by_t[t][n] for t in threads},
            }
        )
        rows.append([n, toks, *[median(hf_by_t[t][n]) for t in threads], *[median(vl_by_t[t][n]) for t in threads],
                     toks / h, toks / v, h / v])
    title = (
        f"{args.hidden}x{args.layers} {args.dtype}, {args.max_new_tokens} new tokens per sequence (forced), group "
        f"{args.group}, both sides on {args.threads} threads (tok/s and the ratio: each side's fastest), vLLM prefix caching "
        f"{'off' if args.no_prefix_caching else 'on'}; median of {args.repeats} after 1 warm-up"
    )
    print()
    table = print_table(
        [
            "sequences",
            "tokens",
            *[f"hf s ({t} thr)" for t in threads],
            *[f"vllm s ({t} thr)" for t in threads],
            "hf tok/s",
            "vllm tok/s",
            "vllm / hf",
        ],
        rows,
        title=title,
    )
    for r in runs:
        pick = "vllm" if r["ratio"] >= 1 else "hf"
        print(f"{r['sequences']} sequences: {pick} is the faster rollout engine here "
              f"(rollout.engine={pick}, rollout.num_cpus={r['vllm_threads' if pick == 'vllm' else 'hf_threads']})")
    print(f"\n{SHARED_NOTE}")
    if not args.no_json:
        path = write_results(
            "bench_rollout", {"machine": facts, "args": vars(args), "table": table, "runs": runs}
        )
        labels = [f"{r['sequences']} seqs" for r in runs]
        png = save_chart(
            path,
            [
                {
                    "title": "generated tokens/s",
                    "labels": labels,
                    "series": {
                        "HF generate": [r["hf_tokens_per_s"] for r in runs],
                        "vLLM": [r["vllm_tokens_per_s"] for r in runs],
                    },
                    "ylabel": "tokens/s",
                },
                {
                    "title": "vLLM / HF (tokens/s ratio)",
                    "labels": labels,
                    "series": {"ratio": [r["ratio"] for r in runs]},
                    "ylabel": "x",
                    "hline": (1.0, "parity"),
                },
            ],
            f"bench_rollout {facts['date']}",
        )
        print(f"results: {path}\nchart: {png}")


if __name__ == "__main__":
    main()
