"""Learner memory: peak RSS of a DeepSpeed training step with and without the memory savers.

    python benchmarks/bench_memory.py [--sizes 384x4,640x6,1024x10] [--settings full,lora,ckpt,zero3-offload,all]
                                      [--rows 16 --seq 128] [--steps 2] [--ranks 2] [--role policy|critic]

For each model size (``HIDDENxLAYERS`` of the offline tiny Llama: head size 32, MLP 2 x hidden, so
384x4 is 5.9M, 640x6 24.7M and 1024x10 105M parameters) and each setting, ``--ranks`` learner
ranks (fresh processes, one torch thread each, a gloo group: the learner role's layout) build the
model through ``DeepSpeedStrategy.prepare`` exactly as the learners do and run ``--steps``
optimizer steps of next-token loss on ``--rows`` random sequences of ``--seq`` tokens (split
between the ranks). The settings:

* ``full``: every parameter trains, ZeRO-2, fp32 (the learners' default);
* ``lora``: LoRA rank 8 on every linear layer (``policy.lora.rank=8``);
* ``ckpt``: gradient checkpointing (``policy.gradient_checkpointing=true``);
* ``zero3-offload``: ZeRO-3 with optimizer and parameters offloaded to host memory;
* ``bf16``: bf16 mixed precision;
* ``all``: lora + ckpt + zero3-offload.

Figures per rank (each a process, so the per-role figure is per rank; the table shows rank 0 and
the sum over ranks):

* ``model MB``: RSS growth from before loading to the wrapped engine (weights, their ZeRO copies);
* ``step peak MB``: the peak RSS during the training steps (VmHWM, reset through
  ``/proc/self/clear_refs`` right before them) minus the RSS before loading: the learner's memory
  at its high-water mark (weights + gradients + optimizer state + activations);
* ``peak RSS MB``: the process's whole peak RSS (libraries and the Python runtime included).

On a CPU machine "offload" moves state from the accelerator (also host memory here) to host
memory, so it cannot lower RSS; ZeRO-3's sharding and the other savers can. Prints figures,
asserts nothing; results to ``benchmarks/results/bench_memory-<time>.{json,png}``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench

LORA = {"rank": 8, "alpha": 16.0}
SETTINGS = {
    "full": {},
    "lora": {"lora": LORA},
    "ckpt": {"gradient_checkpointing": True},
    "zero3-offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    "bf16": {"bf16": True},
    "all": {"lora": LORA, "gradient_checkpointing": True, "zero_stage": 3, "offload_optimizer": True,
            "offload_params": True},
}


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(rank: int, world: int, port: int, model_dir: str, role: str, setting: dict, rows: int, seq: int,
           steps: int, out) -> None:
    import torch

    torch.set_num_threads(1)
    from rlhf_ray.engines.deepspeed_strategy import DeepSpeedStrategy
    from rlhf_ray.models.lora import LoraSettings

    setting = dict(setting)
    if "lora" in setting:
        setting["lora"] = LoraSettings(**setting["lora"])
    strategy = DeepSpeedStrategy(**{"zero_stage": 2, **setting}, lr=1e-4, micro_batch_size=rows // world,
                                 backend="cpu", seed=0)
    strategy.init_distributed(rank, world, "127.0.0.1", port)
    g = torch.Generator().manual_seed(rank)
    from rlhf_ray.models.tiny import CHARSET

    ids = torch.randint(4, 4 + len(CHARSET), (rows // world, seq), generator=g)  # past the 4 special tokens
    mask = torch.ones_like(ids)
    before = _status_mb("VmRSS")
    if role == "critic":
        from rlhf_ray.models.heads import ValueModel

        model = ValueModel.from_base(model_dir)
    else:
        from rlhf_ray.models.loading import load_causal_lm

        model = load_causal_lm(model_dir)
    engine = strategy.prepare(model)
    after_model = _status_mb("VmRSS")
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    strategy.barrier()
    _reset_peak_rss()
    losses = []
    for _ in range(steps):
        if role == "critic":
            loss = (engine(input_ids=ids, attention_mask=mask).float() - 1.0).pow(2).mean()
        else:
            loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        strategy.backward(loss, engine)
        strategy.step(engine)
        losses.append(loss.item())
    step_peak = _status_mb("VmHWM")
    out.put({"rank": rank, "before_mb": before, "model_mb": after_model - before,
             "step_peak_mb": step_peak - before, "peak_rss_mb": step_peak, "trainable": trainable,
             "losses": losses})
    strategy.barrier()


def run_setting(world: int, model_dir: str, role: str, setting: dict, rows: int, seq: int, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    from rlhf_ray.ports import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, model_dir, role, setting, rows, seq, steps, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return results


def main() -> None:
    parser = bench.arg_parser(__doc__)
    parser.add_argument("--sizes", default="384x4,640x6,1024x10", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--settings", default="full,lora,ckpt,zero3-offload,all",
                        help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--role", choices=["policy", "critic"], default="policy")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16, help="sequences per optimizer step, over all ranks")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if bench.replot_requested(args, chart):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["OMP_NUM_THREADS"] = "1"

    facts = bench.announce("bench_memory")
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    runs = run_all(args, names)
    print()
    table = print_runs(runs, args)
    payload = {"machine": facts, "args": vars(args), "table": table, "runs": runs}
    bench.publish("bench_memory", payload, chart, args.no_json)


def run_all(args, names: list[str]) -> list[dict]:
    """Every size x setting, one after the other: each rank's figures and their sums."""
    from tqdm import tqdm

    from rlhf_ray.models.tiny import TinyModelSpec

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    runs = []
    with tqdm(total=len(sizes) * len(names), desc="bench_memory", unit="run") as bar:
        for hidden, layers in sizes:
            spec = TinyModelSpec.of_width(hidden, layers)
            model_dir = bench.tiny_model_dir("bench_memory", spec)
            params = 10 * hidden * hidden * layers  # attention 4 h^2 + MLP 3 x h x 2h per layer
            for name in names:
                bar.set_postfix(size=f"{hidden}x{layers}", setting=name)
                ranks = run_setting(args.ranks, model_dir, args.role, SETTINGS[name], args.rows, args.seq,
                                    args.steps)
                runs.append({"size": f"{hidden}x{layers}", "approx_params": params, "setting": name,
                             "ranks": ranks, "step_peak_mb_sum": sum(r["step_peak_mb"] for r in ranks),
                             "peak_rss_mb_sum": sum(r["peak_rss_mb"] for r in ranks)})
                bar.update(1)
    return runs


def print_runs(runs: list[dict], args) -> str:
    rows = []
    for r in runs:
        full = next((x for x in runs if x["size"] == r["size"] and x["setting"] == "full"), None)
        vs_full = r["step_peak_mb_sum"] / full["step_peak_mb_sum"] if full else float("nan")
        r0 = r["ranks"][0]
        rows.append([r["size"], f"{r['approx_params'] / 1e6:.1f}M", r["setting"], f"{r0['trainable'] / 1e6:.2f}M",
                     r0["model_mb"], r0["step_peak_mb"], r0["peak_rss_mb"], r["step_peak_mb_sum"], f"{vs_full:.2f}"])
    title = (f"{args.role} learner, {args.ranks} ranks, {args.rows} rows x {args.seq} tokens per step, "
             f"{args.steps} steps; MB = 2^20 bytes; 'vs full' = summed step peak / the full setting's")
    return bench.print_table(["size", "params", "setting", "trainable", "model MB", "step peak MB",
                              "peak RSS MB", "step peak MB (all ranks)", "vs full"], rows, title=title)


def chart(path, payload: dict):
    """The learner step's peak over the RSS before loading, summed over the ranks: per size, per setting."""
    runs, args = payload["runs"], payload["args"]
    names = args["settings"].split(",")
    labels = [r["size"] for r in runs if r["setting"] == names[0]]
    series = {n: [r["step_peak_mb_sum"] for r in runs if r["setting"] == n] for n in names}
    panel = {"title": f"learner step peak over RSS before loading, all {args['ranks']} ranks",
             "labels": labels, "series": series, "ylabel": "MB"}
    return bench.save_chart(path, [panel], f"bench_memory ({args['role']}) {payload['machine']['date']}")

if __name__ == "__main__":
    main()
