"""Learner step: training tokens/s and model FLOPs utilisation against a matmul peak measured here.

    python benchmarks/bench_learner.py [--hidden 512 --layers 6 --intermediate 1024]
                                       [--rows 32 --response-tokens 16] [--steps 4]
                                       [--layouts 1x1,1x2,2x1,2x2] [--dtypes float32,bfloat16]
                                       [--uneven] [--batching padded,trimmed] [--micro-batch-size 16]

The PPO policy update without Ray, vLLM or DeepSpeed around it, so that only the arithmetic and
the thread layout vary: the offline tiny Llama (default 512 x 6, MLP 1024: bench_ppo.py's 512x6,
15.8M parameters), a batch of ``--rows`` real arithmetic-task prompts tokenised and left-padded to
the widest (as ``RolloutBatch.from_token_lists`` lays them out) plus ``--response-tokens``
response tokens per row (``--uneven``: lengths drawn from 1..R, as when EOS comes early), and one
optimiser step = per micro-batch of ``--micro-batch-size`` rows: forward, token log-probs of the
response (``engines/scoring.py``), the PPO policy loss, backward; then the gradient all-reduce
(gloo, when 2 ranks), AdamW. After each step, a scoring pass (forward only, with entropy) over
the same rows. ``--batching``: ``padded`` keeps every micro-batch at the batch's full width (as
before issue #11's padding work); ``trimmed`` drops each micro-batch's all-padding columns
(scoring micro-batches are length-sorted first); ``packed`` (what the learners and scorers do)
also lays each micro-batch's real tokens end to end in rows as wide as its longest sequence,
positions restarting at every sequence, so only a short tail per packed row is padding
(``engines/scoring.packed_layout``).

Each layout ``PROCSxTHREADS`` runs PROCS ranks (processes; the batch is split between them like
the learner ranks' shards) with ``torch.set_num_threads(THREADS)`` each, at the same time. Every
rank first measures its own matmul peak (``_bench_util.matmul_peak``) while the other ranks do the
same, so the layout's peak is the sum of what its ranks reached side by side.

Figures:
* training tokens/s = real (non-pad) prompt + response tokens of the batch / median step seconds;
* model FLOPs = 6 x N x real tokens (forward 2, backward 4 FLOPs per parameter per token;
  N = parameters in matmuls: everything except the input embedding table, which is a lookup;
  attention score products left out);
* MFU = model FLOPs / step seconds / peak, given against the layout's own peak and against the
  machine's peak (the best 2-core figure measured in this run for that dtype). The goal in issue
  #11 is 30% of the measured peak;
* padding = padded positions / all positions of the batch (prompt padding from the tokeniser,
  response padding with ``--uneven``); "train pad" and "score pad" count the positions that the
  micro-batches of each ``--batching`` mode actually compute.

Prints figures, asserts nothing; results to ``benchmarks/results/bench_learner-<time>.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench


def build_batch(model_dir: str, rows: int, response_tokens: int, seed: int, uneven: bool = False):
    """Token ids [rows, P+R], attention mask, response mask, and the padding figures. With
    ``uneven`` each row's response length is drawn from 1..R (EOS came early), else all are R."""
    import torch
    from transformers import AutoTokenizer

    from rlhf_ray.tasks import get_task

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = get_task("arithmetic", seed).prompts(rows)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    P, R = max(len(i) for i in ids), response_tokens
    g = torch.Generator().manual_seed(seed)
    seq = torch.full((rows, P + R), tok.pad_token_id or 0, dtype=torch.long)
    attn = torch.zeros((rows, P + R), dtype=torch.long)
    resp_mask = torch.zeros((rows, R))
    lengths = torch.randint(1, R + 1, (rows,), generator=g).tolist() if uneven else [R] * rows
    for r, (p, n) in enumerate(zip(ids, lengths)):
        seq[r, P - len(p) : P] = torch.tensor(p)
        seq[r, P : P + n] = torch.randint(0, len(tok), (n,), generator=g)
        attn[r, P - len(p) : P + n] = 1
        resp_mask[r, :n] = 1
    real = int(attn.sum())
    return {
        "sequences": seq,
        "attention_mask": attn,
        "response_mask": resp_mask,
        "prompt_width": P,
        "prompt_lengths": [len(i) for i in ids],
        "real_tokens": real,
        "positions": rows * (P + R),
        "padding_fraction": 1 - real / (rows * (P + R)),
    }


def rank_shard(batch: dict, rank: int, world: int):
    """This rank's rows as a ``RolloutBatch`` (the driver's ``chunk`` split), with an advantage per row."""
    import torch

    from rlhf_ray.data.batch import RolloutBatch

    full = RolloutBatch(batch["sequences"], batch["attention_mask"], batch["response_mask"], batch["prompt_width"])
    shard = full.chunk(world)[rank]
    return shard.with_extras(advantages=torch.randn(shard.size, generator=torch.Generator().manual_seed(rank)))


def train_micro_batches(shard, micro_batch_size: int, batching: str) -> list:
    """The learner's split (``_LearnerBase._train_on``): ceil(rows / micro) contiguous pieces,
    trimmed of all-padding columns unless ``batching`` is ``padded``."""
    micro = shard.chunk(max(1, -(-shard.size // micro_batch_size)))
    return micro if batching == "padded" else [mb.trimmed() for mb in micro]


def score_micro_batches(shard, micro_batch_size: int, batching: str) -> list:
    """The scoring split (``engines/scoring.py``): length-sorted and trimmed unless ``padded``."""
    if batching == "padded":
        return [shard.select(slice(i, i + micro_batch_size)) for i in range(0, shard.size, micro_batch_size)]
    return [mb for _, mb in shard.length_sorted_micro_batches(micro_batch_size)]


def worker(rank: int, world: int, threads: int, dtype: str, model_dir: str, batch: dict, steps: int, port: int,
           micro_batch_size: int, batching: str, out) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlhf_ray import algo
    from rlhf_ray.engines import scoring

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dist.barrier()
    peak = bench.matmul_peak(dtype, threads, seconds=1.5)  # side by side with the other ranks
    if world > 1:
        dist.barrier()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.train()
    if batching != "packed":
        scoring.disable_packing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    shard = rank_shard(batch, rank, world)
    micro = train_micro_batches(shard, micro_batch_size, batching)
    times, score_times = [], []
    for i in range(steps + 1):  # the first step allocates optimiser state: not counted
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for mb in micro:  # gradient accumulation, as DeepSpeed does over the learner's micro-batches
            logp = scoring.response_logprobs(model, mb)
            adv = mb.extras["advantages"][:, None].expand_as(logp)
            loss = algo.ppo_policy_loss(logp, logp.detach(), adv, mb.response_mask, 0.2, "token-mean").loss
            (loss / len(micro)).backward()
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
        # A scoring pass (old log-probs, reference): forward only, no gradients.
        t0 = time.perf_counter()
        with torch.no_grad():
            for mb in score_micro_batches(shard, micro_batch_size, batching):
                scoring.response_logprobs(model, mb, with_entropy=True)
        if i:
            score_times.append(time.perf_counter() - t0)
    emb = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    out.put({"rank": rank, "peak": peak, "times": times, "score_times": score_times, "params": params,
             "matmul_params": params - emb})
    if world > 1:
        dist.destroy_process_group()


def positions(batch: dict, procs: int, micro_batch_size: int, batching: str) -> dict:
    """Positions the forward passes compute (real + padding) for training and scoring."""
    from rlhf_ray.engines import scoring

    real = batch["real_tokens"]
    shards = [rank_shard(batch, r, procs) for r in range(procs)]
    if batching == "packed":  # real tokens end to end in rows of each micro-batch's longest sequence
        computed = lambda mb: scoring.packed_layout(mb)[0].numel()
    else:
        computed = lambda mb: mb.sequences.numel()
    train = sum(computed(mb) for s in shards for mb in train_micro_batches(s, micro_batch_size, batching))
    score = sum(computed(mb) for s in shards for mb in score_micro_batches(s, micro_batch_size, batching))
    return {"train_positions": train, "score_positions": score,
            "train_padding": 1 - real / train, "score_padding": 1 - real / score}


def run_layout(procs: int, threads: int, dtype: str, model_dir: str, batch: dict, steps: int,
               micro_batch_size: int, batching: str) -> dict:
    import torch.multiprocessing as mp

    from rlhf_ray.ports import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    ps = [
        ctx.Process(target=worker, args=(r, procs, threads, dtype, model_dir, batch, steps, port,
                                         micro_batch_size, batching, q))
        for r in range(procs)
    ]
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what a Ray actor's env would say
    for p in ps:
        p.start()
    results = [q.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    if env_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env_before
    results.sort(key=lambda r: r["rank"])
    # A step ends for all ranks at the closing barrier: the slowest rank's time is the step time.
    step_s = bench.median([max(ts) for ts in zip(*(r["times"] for r in results))])
    score_s = bench.median([max(ts) for ts in zip(*(r["score_times"] for r in results))])
    n = results[0]["matmul_params"]
    flops = bench.train_flops(n, batch["real_tokens"])
    return {
        "layout": f"{procs}x{threads}",
        "batching": batching,
        **positions(batch, procs, micro_batch_size, batching),
        "score_s": score_s,
        "score_tokens_per_s": batch["real_tokens"] / score_s,
        "procs": procs,
        "threads": threads,
        "dtype": dtype,
        "step_s": step_s,
        "step_times": [r["times"] for r in results],
        "tokens_per_s": batch["real_tokens"] / step_s,
        "model_flops_per_step": flops,
        "achieved_flops": flops / step_s,
        "layout_peak_flops": sum(r["peak"] for r in results),
        "rank_peaks": [r["peak"] for r in results],
        "params": results[0]["params"],
        "matmul_params": n,
    }


def main() -> None:
    args = parse_args()
    if bench.replot_requested(args, chart):
        return
    from rlhf_ray.models.tiny import TinyModelSpec

    facts = bench.announce("bench_learner")
    spec = TinyModelSpec.of_width(args.hidden, args.layers, args.intermediate, args.seed)
    model_dir = bench.tiny_model_dir("bench_learner", spec)
    batch = build_batch(model_dir, args.rows, args.response_tokens, args.seed, args.uneven)
    print(
        f"batch: {args.rows} rows x ({batch['prompt_width']} prompt + {args.response_tokens} response) = "
        f"{batch['positions']} positions, {batch['real_tokens']} real tokens, padding "
        f"{batch['padding_fraction']:.3f}",
        flush=True,
    )
    runs = run_all(args, model_dir, batch)
    cores = facts["cpus"] or 2
    machine_peak = machine_peaks(runs, cores)
    for r in runs:
        r["mfu_layout"] = r["achieved_flops"] / r["layout_peak_flops"]
        r["mfu_machine"] = r["achieved_flops"] / machine_peak.get(r["dtype"], float("nan"))
    print()
    table = print_runs(runs, args, batch, machine_peak, cores)
    verdict = best_mfu_verdict(runs, machine_peak, args.goal)
    print(verdict)
    batch_figures = {k: v for k, v in batch.items() if k not in ("sequences", "attention_mask")}
    payload = {"machine": facts, "args": vars(args), "table": table, "verdict": verdict,
               "machine_peak_flops": machine_peak, "batch": batch_figures, "runs": runs}
    bench.publish("bench_learner", payload, chart, args.no_json)


def parse_args() -> argparse.Namespace:
    parser = bench.arg_parser(__doc__)
    bench.add_model_shape(parser, intermediate="2 x hidden (builtin:tiny)")
    parser.add_argument("--rows", type=int, default=32, help="sequences per optimiser step (all ranks)")
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per layout (+1 not counted)")
    parser.add_argument("--layouts", default="1x1,1x2,2x1,2x2", help="PROCSxTHREADS, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--goal", type=float, default=0.30, help="MFU goal (fraction of measured peak)")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="rows per forward on one rank")
    parser.add_argument("--uneven", action="store_true",
                        help="response lengths drawn from 1..--response-tokens")
    parser.add_argument("--batching", default="packed",
                        help="comma-separated: padded (full-width micro-batches), trimmed (all-padding "
                             "columns dropped, scoring rows length-sorted), packed (the learners' and scorers' "
                             "default)")
    return parser.parse_args()


def run_all(args, model_dir: str, batch: dict) -> list[dict]:
    """Every dtype x layout x batching, one after the other."""
    runs = []
    for dtype in args.dtypes.split(","):
        for layout in args.layouts.split(","):
            for batching in args.batching.split(","):
                procs, _, threads = layout.partition("x")
                print(f"-- {dtype} {layout} {batching} ...", flush=True)
                runs.append(run_layout(int(procs), int(threads or 1), dtype, model_dir, batch, args.steps,
                                       args.micro_batch_size, batching))
    return runs


def machine_peaks(runs: list[dict], cores: int) -> dict[str, float]:
    """The machine's peak per dtype: the best of the layouts that use every core (ranks x threads)."""
    peaks: dict[str, float] = {}
    for r in runs:
        if r["procs"] * r["threads"] >= cores:
            peaks[r["dtype"]] = max(peaks.get(r["dtype"], 0.0), r["layout_peak_flops"])
    return peaks


def print_runs(runs: list[dict], args, batch: dict, machine_peak: dict, cores: int) -> str:
    rows = [[r["dtype"], r["layout"], r["batching"], r["train_padding"], r["step_s"], r["tokens_per_s"],
             r["achieved_flops"] / 1e9, r["layout_peak_flops"] / 1e9, f"{100 * r['mfu_layout']:.1f}%",
             f"{100 * r['mfu_machine']:.1f}%", r["score_padding"], r["score_tokens_per_s"]] for r in runs]
    n = runs[0]["matmul_params"]
    title = (
        f"learner step, {args.hidden}x{args.layers} ({runs[0]['params'] / 1e6:.1f}M params, {n / 1e6:.1f}M in "
        f"matmuls), {args.rows} rows, {batch['real_tokens']} real tokens/step, padding "
        f"{batch['padding_fraction']:.3f} at full width; {args.micro_batch_size} rows per micro-batch per rank; "
        f"FLOPs = 6 x {n / 1e6:.1f}M x tokens; median of {args.steps} steps\n"
        f"pad = padded / computed positions of the train (contiguous micro-batches) and score (forward "
        f"only; trimmed = length-sorted) passes\n"
        f"layout = ranks x torch threads per rank; MFU vs the layout's own peak and vs the machine's "
        f"(best {cores}-core peak measured in this run: "
        + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in machine_peak.items())
        + ")"
    )
    return bench.print_table(
        ["dtype", "layout", "batching", "train pad", "step s", "train tok/s", "GFLOP/s", "peak GFLOP/s",
         "MFU (layout)", "MFU (machine)", "score pad", "score tok/s"],
        rows,
        title=title,
    )


def best_mfu_verdict(runs: list[dict], machine_peak: dict, goal: float) -> str:
    """The best MFU against the machine's peak and whether it meets the goal."""
    # A CPU without bf16 instructions emulates it: its "peak" is a small fraction of fp32's, and
    # MFU against it says nothing about how well the step uses the machine.
    emulated = {d for d, v in machine_peak.items() if d != "float32" and v < machine_peak.get("float32", 0.0)}
    if emulated:
        print(f"not counted for the best MFU: {', '.join(sorted(emulated))} (its measured peak is below "
              "float32's: no native support on this CPU)")
    counted = [r for r in runs if r["dtype"] not in emulated] or runs
    best = max(counted, key=lambda r: r["mfu_machine"] if r["mfu_machine"] == r["mfu_machine"] else -1)
    return (
        f"best MFU vs the machine's peak: {100 * best['mfu_machine']:.1f}% ({best['dtype']} {best['layout']}); "
        f"goal {100 * goal:.0f}%: {'met' if best['mfu_machine'] >= goal else 'NOT met'}"
    )


def chart(path, payload: dict):
    """Training tokens/s, MFU against the machine's peak and the goal, scoring tokens/s; per run."""
    runs, goal = payload["runs"], payload["args"]["goal"]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    labels = [f"{short.get(r['dtype'], r['dtype'])} {r['layout']} {r['batching']}" for r in runs]
    panels = [
        {"title": "training tokens/s (ranks x threads)", "labels": labels,
         "series": {"tokens/s": [r["tokens_per_s"] for r in runs]}, "ylabel": "tokens/s"},
        {"title": "MFU vs the machine's measured matmul peak", "labels": labels,
         "series": {"MFU %": [100 * r["mfu_machine"] for r in runs]}, "ylabel": "%",
         "hline": (100 * goal, f"goal {100 * goal:.0f}%")},
        {"title": "scoring tokens/s (forward only)", "labels": labels,
         "series": {"tokens/s": [r["score_tokens_per_s"] for r in runs]}, "ylabel": "tokens/s"},
    ]
    return bench.save_chart(path, panels, f"bench_learner {payload['machine']['date']}")


if __name__ == "__main__":
    main()
