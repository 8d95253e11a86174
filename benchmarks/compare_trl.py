"""The same critic-free GRPO job through rlhf_ray and through TRL's GRPOTrainer, side by side.

    pip install -e '.[bench]'            # trl==1.16.0; this script installs nothing itself
    python benchmarks/compare_trl.py [--shapes short,long] [--hidden 512 --layers 6] [--prompts 8 --group 8]
                                     [--min-new-tokens 0 --max-new-tokens 16] [--updates 5] [--profile]

Both sides get the same locally built Llama (rlhf_ray's tiny builder, head size 32, MLP 4 x hidden; default
512 wide x 6 layers, about 25M parameters), the same arithmetic-task prompts, group size,
max new tokens, learning rate, KL coefficient (TRL's ``beta``), number of optimiser updates
(one per iteration: one generation batch, one epoch, one minibatch) and the same rule reward
(``rlhf_ray.tasks.rewards:digit_fraction``, wrapped for TRL's ``reward_funcs`` signature).

The job runs once per shape of ``--shapes``, all in one invocation (``SHAPES``): ``short`` (8 prompts
x 8, at most 16 new tokens, 5 updates) and ``long`` (2 prompts x 8, at least 128 and at most 512
new tokens, 3 updates: the regime of real RLHF, where generation dominates). The length floor is
given to both sides alike (rlhf_ray's ``rollout.min_new_tokens``, vLLM's ``min_tokens``; TRL's
``generation_kwargs``: ``min_new_tokens`` for HF ``generate``, ``min_tokens`` for vLLM): a
random-weight model samples its end token about once in its vocabulary's size, so without a floor
its responses stay short; past the floor, lengths are the model's own. ``--prompts``, ``--group``,
``--min-new-tokens``, ``--max-new-tokens`` and ``--updates`` override a field in every shape.

Each side runs in its own child process, one after the other, so their memory is measured apart:
the parent samples the resident memory of the child's whole process tree every 0.5 s (for
rlhf_ray that tree is the driver, the Ray processes it starts - GCS, raylet - and every Ray worker
the raylet forks: vLLM engine, DeepSpeed ranks, reference and reward actors). It reports the peak
of the summed RSS (shared pages counted once per process, so an over-count) and of the summed PSS
(shared pages split between processes). One warm-up iteration is excluded on both sides;
generated tokens are counted from the actual completions (EOS included when produced), not from
the ``max new tokens`` upper bound. TRL is also tried with ``use_vllm=True, vllm_mode="colocate"``;
if that fails on this machine, the first line of its error is printed.

``--profile`` attaches ``py-spy record --native`` to every process doing the work (rlhf_ray: the
driver and each Ray actor, named by role; TRL: its one process) for the measured iterations only
(from the end of the warm-up to the end of the run) and prints, per role, where its CPU samples
went: the share of its wall time it was busy, the hottest frames (inclusive) and the hottest
leaves (self time, C++ kernels included). rlhf_ray's own per-phase breakdown (generate, score,
train, sync) is always printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_util as bench

REWARD = "rlhf_ray.tasks.rewards:digit_fraction"
# rlhf_ray's settings for this job beyond the shared ones (--set overrides any): one update per
# batch from the sampling weights, so the engines' log-probs are pi_old and the learners' scoring
# pass is redundant; two reference replicas keep both cores busy while scoring; the engine gets
# both cores' threads while it generates (nothing else runs then); so do the learners while they
# train (--ranks 1: one rank with every core beat two ranks of one core, 1.37 s vs 2.27 s per
# update, 2026-12-03), with ZeRO stage 0 (a 25M model fits one rank; ZeRO-2's partitioned
# gradient reduction over gloo cost 0.5 s more per update at 2 ranks).
SPEED_SETTINGS = ("ppo.old_logprobs=rollout", "scorers.reference_replicas=2", "rollout.num_cpus=2",
                  "policy.zero_stage=0")
PHASES = ("generate", "score", "train", "sync")
# The job's shapes (sequences per iteration, response lengths, measured updates). Long: fewer
# prompts so it completes in a few minutes on 2 cores.
SHAPES = {
    "short": {"prompts": 8, "group": 8, "min_new_tokens": 0, "max_new_tokens": 16, "updates": 5},
    "long": {"prompts": 2, "group": 8, "min_new_tokens": 128, "max_new_tokens": 512, "updates": 3},
}
PROMPT_TOKENS = 32  # data.max_prompt_tokens: the arithmetic prompts are far shorter


def main() -> None:
    args = parse_args()
    if args.side:  # this process is a child running one side of one shape
        child_main(shape_args(args, args.shape))
        return
    if bench.replot_requested(args, chart):
        return
    exit_unless_runnable(args)
    facts = bench.announce("compare_trl")
    workdir = tempfile.mkdtemp(prefix="compare_trl_")
    names = args.shapes.split(",")
    args.model_dir, params = build_model(args, workdir, max(model_len(shape_args(args, n)) for n in names))
    shapes = {name: shape_args(args, name) for name in names}
    jobs = {name: describe_job(a, params) for name, a in shapes.items()}
    results = {}
    for name, shape in shapes.items():
        print(f"== shape {name}: {jobs[name]}", flush=True)
        results[name] = run_sides(shape, workdir)

    by_shape = {}
    for name, runs in results.items():
        print(f"\n== shape {name}: {jobs[name]}")
        sums = {side: summarise(res) for side, res in runs.items() if res.get("ok")}
        table = print_summary(sums)
        print_failures(runs)
        phase_table = print_phases(runs["rlhf_ray"]) if runs.get("rlhf_ray", {}).get("ok") else ""
        print_memory_by_process(runs)
        if args.profile:
            print_profiles(runs, args.profile_rate)
        by_shape[name] = {"job": jobs[name], "table": table, "phase_table": phase_table, "summary": sums,
                          "ratio": rlhf_ray_over_trl(sums), "runs": runs}
    ratio_table = print_ratios(by_shape)
    payload = {"machine": facts, "args": vars(args), "ratio_table": ratio_table, "shapes": by_shape}
    bench.publish("compare_trl", payload, chart, args.no_json)
    print(f"work dir (model, logs): {workdir}")


def parse_args() -> argparse.Namespace:
    parser = bench.arg_parser(__doc__)
    bench.add_model_shape(
        parser, intermediate="4 x hidden (512x6: 25.3M)",
        dtype="both sides: float32, or bf16 mixed precision (TRL's default: autocast; rlhf_ray: bf16 vLLM "
              "and reference, DeepSpeed bf16 with fp32 master weights)")
    parser.add_argument("--shapes", default="short,long", help=f"which shapes of the job, in order: {', '.join(SHAPES)}")
    parser.add_argument("--prompts", type=int, help="prompts per iteration (every shape)")
    parser.add_argument("--group", type=int, help="samples per prompt, the GRPO group size (every shape)")
    parser.add_argument("--min-new-tokens", type=int, help="response length floor (every shape)")
    parser.add_argument("--max-new-tokens", type=int, help="response length cap (every shape)")
    parser.add_argument("--updates", type=int, help="measured iterations, +1 warm-up not counted (every shape)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.02, help="KL coefficient (TRL's beta)")
    parser.add_argument("--num-prompts", type=int, default=512, help="size of the prompt pool")
    parser.add_argument("--engines", type=int, default=1, help="rlhf_ray: vLLM rollout engines")
    parser.add_argument("--ranks", type=int, default=1,
                        help="rlhf_ray: DeepSpeed policy ranks (the machine's cores split between them)")
    parser.add_argument("--trl-threads", type=int, default=0,
                        help="TRL: torch threads (0 = torch's default, one per core); on a loaded 2-core "
                             "machine 1 can be much faster (see docs/performance.md, threads)")
    bench.add_config_overrides(parser, dest="rlhf_set", help="extra rlhf_ray config override (repeatable)")
    parser.add_argument("--sides", default="rlhf_ray,trl,trl_vllm",
                        help="which runs, in order: rlhf_ray, trl (HF generate), trl_vllm (vLLM colocate)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on every working process, measured iterations only")
    parser.add_argument("--profile-rate", type=int, default=25, help="py-spy samples per second")
    parser.add_argument("--side-timeout", type=int, default=420, help="seconds before a side is killed")
    parser.add_argument("--vllm-timeout", type=int, default=240, help="seconds for the trl_vllm attempt")
    parser.add_argument("--verbose", action="store_true", help="actors' logs and progress bars (in the logs)")
    # Internal: the child processes.
    parser.add_argument("--_side", dest="side", help=argparse.SUPPRESS)
    parser.add_argument("--_shape", dest="shape", help=argparse.SUPPRESS)
    parser.add_argument("--_result", dest="result", help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", dest="workdir", help=argparse.SUPPRESS)
    parser.add_argument("--_model-dir", dest="model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(sorted(unknown))}; known: {', '.join(SHAPES)}")
    return args


def shape_args(args, name: str) -> argparse.Namespace:
    """``args`` with the fields of shape ``name``; a field given on the command line wins."""
    fields = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in SHAPES[name].items()}
    return argparse.Namespace(**{**vars(args), **fields, "shape": name})


def model_len(args) -> int:
    """The engines' context on both sides: a prompt and a response, with room to spare."""
    return max(64, 2 * args.max_new_tokens + PROMPT_TOKENS)


# ------------------------------------------------------------------------------------------------
# Child side: rlhf_ray
# ------------------------------------------------------------------------------------------------
def rlhf_ray_overrides(args) -> list[str]:
    """rlhf_ray's config for the shared job, then ``SPEED_SETTINGS`` and ``--set``."""
    return [
        f"run_dir={args.workdir}/{args.shape}-rlhf_ray_run",
        f"model.policy={args.model_dir}",
        f"seed={args.seed}",
        "data.task=arithmetic",
        f"data.num_prompts={args.num_prompts}",
        "scorers.use_task_gold_as_reward=false",
        f"scorers.reward_functions={REWARD}",
        "ppo.advantage_estimator=grpo",
        f"rollout.samples_per_prompt={args.group}",
        f"ppo.prompts_per_iteration={args.prompts}",
        f"rollout.min_new_tokens={args.min_new_tokens}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        f"rollout.max_model_len={model_len(args)}",
        f"data.max_prompt_tokens={PROMPT_TOKENS}",
        "rollout.gpu_memory_utilization=0.05",
        f"rollout.num_engines={args.engines}",
        f"policy.num_ranks={args.ranks}",
        f"policy.num_cpus={max(1, (os.cpu_count() or 1) // args.ranks)}",  # the cores, split between ranks
        f"policy.lr={args.lr}",
        "policy.weight_decay=0.0",
        "policy.grad_clip=1.0",
        f"policy.micro_batch_size={args.prompts * args.group // args.ranks}",
        f"ppo.kl_coef={args.kl}",
        "ppo.kl_controller=fixed",
        "ppo.epochs=1",
        "ppo.minibatches=1",
        f"ppo.iterations={args.updates + 1}",
        "sync.parity_every=0",
        "checkpoint.save_final=false",
        f"model.dtype={args.dtype}",
        f"policy.bf16={str(args.dtype == 'bfloat16').lower()}",
        *speed_settings(args),
        *args.rlhf_set,
    ]


def speed_settings(args) -> list[str]:
    """``SPEED_SETTINGS``, except that a length floor takes pi_old from the learners: below the floor
    the engines' log-probs are renormalised over the tokens that do not stop (the config checker
    refuses ``ppo.old_logprobs=rollout`` there), so rlhf_ray pays a scoring pass that TRL skips."""
    if not args.min_new_tokens:
        return list(SPEED_SETTINGS)
    return [s if s != "ppo.old_logprobs=rollout" else "ppo.old_logprobs=learner" for s in SPEED_SETTINGS]


def side_rlhf_ray(args, out: dict) -> None:
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.common import init_ray
    from rlhf_ray.stages.ppo import PPOTrainer

    init_ray(load_config(), log_to_driver=args.verbose)  # local Ray, platform env, quiet engines
    cfg = load_config(None, rlhf_ray_overrides(args))
    start = time.perf_counter()
    trainer = PPOTrainer(cfg)
    out["startup_s"] = time.perf_counter() - start
    out["sync_total_bytes"] = int(trainer.roles.rollout.manifest["total_bytes"])
    records, walls = [], []
    profiler = None
    try:
        for i in range(args.updates + 1):
            if args.profile and i == 1:  # after the warm-up iteration
                profiler = PySpy(args, {"driver": os.getpid(), **actor_pids(trainer.roles)})
            t0 = time.perf_counter()
            records.append(trainer.step())
            walls.append(time.perf_counter() - t0)
        if profiler:
            out["profiles"] = profiler.stop()
    finally:
        trainer.close()
        ray.shutdown()
    out["iteration_s"] = walls
    out["generated_tokens"] = [r["generated_tokens"] for r in records]
    out["response_lengths"] = [{k: r[f"response_length_{k}"] for k in ("min", "mean", "max")} for r in records]
    out["records"] = records
    out["reward_mean"] = [r["reward_mean"] for r in records]


def actor_pids(roles) -> dict[str, int]:
    """Process id of every actor, by role (``policy[0]``, ``reference[1]``, ``rollout[0]``, ...)."""
    import ray

    named = {"reward": roles.reward}
    for role in ("rollout", "policy", "critic", "reference"):
        named.update({f"{role}[{i}]": a for i, a in enumerate(getattr(roles, role))})
    pids = ray.get([a.__ray_call__.remote(_own_pid) for a in named.values()])
    return dict(zip(named, pids))


def _own_pid(_actor) -> int:
    return os.getpid()


class PySpy:
    """``py-spy record`` attached to each named process from now until ``stop()``."""

    def __init__(self, args, pids: dict[str, int]):
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.started = time.perf_counter()
        self.paths = {role: os.path.join(args.workdir, f"pyspy-{args.shape}-{args.side}-{role}.txt") for role in pids}
        log = open(os.path.join(args.workdir, f"pyspy-{args.shape}-{args.side}.log"), "a")  # noqa: SIM115 - lives as long as the recorders
        self.procs = {
            role: subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--rate", str(args.profile_rate), "--native",
                 "--format", "raw", "-o", self.paths[role]],
                stdout=log, stderr=log)
            for role, pid in pids.items()
        }

    def stop(self) -> dict:
        """Stops every recorder (py-spy writes its file on SIGINT); returns the paths and seconds."""
        seconds = time.perf_counter() - self.started
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        return {"seconds": seconds, "paths": {r: p for r, p in self.paths.items() if os.path.exists(p)}}


# ------------------------------------------------------------------------------------------------
# Child side: TRL
# ------------------------------------------------------------------------------------------------
def grpo_config(args, use_vllm: bool):
    """TRL's settings for the shared job: one generation batch, one epoch and one optimiser step
    per iteration, constant learning rate, no warm-up."""
    from trl import GRPOConfig

    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
            "vllm_max_model_length": model_len(args)} if use_vllm else {}
    return GRPOConfig(
        output_dir=os.path.join(args.workdir, f"{args.shape}-{'trl_vllm' if use_vllm else 'trl'}"),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        # The length floor under each generator's own name for it.
        generation_kwargs={"min_tokens" if use_vllm else "min_new_tokens": args.min_new_tokens},
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.kl,
        epsilon=0.2,
        max_steps=args.updates + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=args.dtype == "bfloat16",  # TRL's own default is bf16 (autocast on CPU)
        fp16=False,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=not args.verbose,
        **vllm,
    )


def side_trl(args, out: dict, use_vllm: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from rlhf_ray.tasks import get_task
    from rlhf_ray.tasks.rewards import digit_fraction

    torch.manual_seed(args.seed)
    if args.trl_threads:
        torch.set_num_threads(args.trl_threads)
    prompts = get_task("arithmetic", args.seed).prompts(args.num_prompts)
    dataset = Dataset.from_dict({"prompt": prompts})
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    lengths_per_call: list[list[int]] = []

    def digit_fraction_reward(prompts, completions, completion_ids=None, **kwargs):
        """rlhf_ray's rule reward in TRL's reward_funcs signature; records the completions' lengths."""
        if completion_ids is not None:
            lengths_per_call.append([len(c) for c in completion_ids])
        return digit_fraction(list(prompts), list(completions))

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())
            if args.profile and len(self.end) == 1:  # after the warm-up iteration
                self.profiler = PySpy(args, {"trainer": os.getpid()})

        profiler = None

    clock = StepClock()
    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=digit_fraction_reward,
        args=grpo_config(args, use_vllm),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    out["startup_s"] = time.perf_counter() - start
    out["torch_threads"] = torch.get_num_threads()
    trainer.train()
    if clock.profiler:
        out["profiles"] = clock.profiler.stop()
    # Seconds per iteration: end of one optimiser step to the end of the next (the whole loop:
    # data, generation, reward, reference log-probs, loss, step, logging); the first iteration runs
    # from its own on_step_begin.
    ends = clock.end
    out["iteration_s"] = [ends[0] - clock.begin[0], *[b - a for a, b in itertools.pairwise(ends)]]
    out["generated_tokens"] = [sum(lengths) for lengths in lengths_per_call]
    out["response_lengths"] = [{"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
                               for lengths in lengths_per_call]
    out["log_history"] = trainer.state.log_history
    out["reward_mean"] = [h.get("reward") for h in trainer.state.log_history if "reward" in h]


def child_main(args) -> None:
    out: dict = {"side": args.side, "pid": os.getpid()}
    try:
        if args.side == "rlhf_ray":
            side_rlhf_ray(args, out)
        else:
            side_trl(args, out, use_vllm=args.side == "trl_vllm")
        out["ok"] = True
    except BaseException as e:  # noqa: BLE001 - reported, not hidden
        import traceback

        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        traceback.print_exc()
    Path(args.result).write_text(json.dumps(out, default=str))


# ------------------------------------------------------------------------------------------------
# Parent: prepares the job, runs the sides one after the other and samples their memory
# ------------------------------------------------------------------------------------------------
def exit_unless_runnable(args) -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("compare_trl needs TRL: pip install -e '.[bench]' (trl==1.16.0)")
    if args.hidden % 32:
        sys.exit("--hidden must be a multiple of 32 (vLLM's CPU attention needs heads of size 32)")


def build_model(args, workdir: str, context: int) -> tuple[str, int]:
    """The Llama both sides train (MLP 4 x hidden unless ``--intermediate``; ``context`` positions,
    at least the builder's default), built in the work dir: its path and parameter count."""
    from dataclasses import replace

    from safetensors import safe_open

    from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec.of_width(args.hidden, args.layers, args.intermediate or 4 * args.hidden, args.seed)
    spec = replace(spec, max_positions=max(spec.max_positions, context))  # RoPE: the weights do not change
    model_dir = str(build_tiny_model(os.path.join(workdir, "model"), spec))
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    return model_dir, params


def describe_job(args, params: int) -> str:
    return (
        f"model {args.hidden}x{args.layers} ({params / 1e6:.1f}M params, {args.dtype}), {args.prompts} prompts x "
        f"group {args.group} = {args.prompts * args.group} sequences/iteration, {args.min_new_tokens}-"
        f"{args.max_new_tokens} new tokens, lr {args.lr}, KL {args.kl}, {args.updates} measured updates + 1 warm-up; "
        f"rlhf_ray layout: {args.engines} vLLM engine(s), {args.ranks} DeepSpeed policy rank(s), reference + reward "
        f"actors, {' '.join([*speed_settings(args), *args.rlhf_set])}"
    )


def run_sides(args, workdir: str) -> dict[str, dict]:
    """Every side of ``--sides``, one after the other; each one's result, by side."""
    results = {}
    for side in args.sides.split(","):
        res = results[side] = run_side(side, args, workdir)
        status = "ok" if res.get("ok") else f"FAILED: {first_error_line(res)}"
        startup_s = res.get("startup_s", float("nan"))
        print(f"   {side}: {status} (wall {res['wall_s']:.0f} s, startup {startup_s:.1f} s)", flush=True)
    return results


def run_side(side: str, args, workdir: str) -> dict:
    """One side in a child process (this script again, with the same flags and ``--_side``) while
    its process tree's memory is sampled: the child's result with wall time, memory and profile."""
    result_path = os.path.join(workdir, f"{args.shape}-{side}.json")
    log_path = os.path.join(workdir, f"{args.shape}-{side}.log")
    timeout = args.vllm_timeout if side == "trl_vllm" else args.side_timeout
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_side", side, "--_shape", args.shape,
           "--_result", result_path, "--_workdir", workdir, "--_model-dir", args.model_dir]
    print(f"-- {args.shape} {side}: running (log {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with bench.TreeMemorySampler(proc.pid) as mem:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
    rc = proc.returncode
    res = {"side": side, "ok": False, "returncode": rc, "log": log_path,
           "wall_s": time.perf_counter() - start}
    if os.path.exists(result_path):
        res.update(json.loads(Path(result_path).read_text()))
    elif rc is None or rc < 0:
        res["error"] = f"timed out after {timeout} s"
    else:
        res["error"] = f"exited with {rc} without a result; last log line: {_last_line(log_path)}"
    res["memory"] = mem.summary()
    if res.get("profiles"):
        res["profile"] = {role: summarise_pyspy(path, res["profiles"]["seconds"], args.profile_rate)
                          for role, path in res["profiles"]["paths"].items()}
    return res


def first_error_line(res: dict) -> str:
    lines = (res.get("error") or "").strip().splitlines()
    return lines[0] if lines else ""


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()


def _last_line(path: str) -> str:
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# Leaves where a thread waits rather than works: py-spy --native cannot tell a blocked thread
# from a busy one, so these are counted apart (futex waits show as bare libc addresses).
_WAIT_LEAF = re.compile(r"^(0x[0-9a-f]+ \(libc\.so\.6\)|(epoll_wait|syscall|poll|nanosleep|sched_yield|"
                        r"PyThread_acquire_lock_timed|pthread_cond_\w+) .*)$")
_MATMUL_LEAF = re.compile(r"gemm|onednn|dnnl|mkl_blas", re.IGNORECASE)
# Frames worth naming in a role's breakdown: this project's, the engines' and torch's autograd and
# optimisers, not Ray's task loop or Python's wrappers around them.
_OWN_FRAME = re.compile(r"\((rlhf_ray|deepspeed|vllm|trl|transformers/trainer|torch/autograd|torch/optim)/")


def summarise_pyspy(path: str, seconds: float, rate: int, top: int = 8) -> dict:
    """One process's ``py-spy record --native --format raw`` output: the share of its samples spent
    in matmul kernels, other work and waiting, its hottest own frames (inclusive) and its hottest
    working leaves (self time). ``busy`` is working samples per wall-clock sample slot."""
    leaves, frames_incl = Counter(), Counter()
    total = waiting = matmul = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f and not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += n
        if _WAIT_LEAF.match(frames[-1]):
            waiting += n
            continue
        matmul += n if _MATMUL_LEAF.search(frames[-1]) else 0
        leaves[re.sub(r"<.*>", "<>", frames[-1])[:120]] += n
        for f in {f for f in frames if _OWN_FRAME.search(f)}:
            frames_incl[f] += n
    working = total - waiting
    return {
        "samples": total,
        "busy": working / max(1e-9, seconds * rate),
        "working": working,
        "matmul": matmul,
        "inclusive": frames_incl.most_common(top),  # shares of working samples
        "by_leaf": leaves.most_common(top),
    }


def summarise(res: dict) -> dict:
    """Medians over the measured iterations (the first, the warm-up, is dropped)."""
    iters, toks = res.get("iteration_s", []), res.get("generated_tokens", [])
    n = min(len(iters), len(toks))
    iters, toks, lengths = iters[1:n], toks[1:n], res["response_lengths"][1:n]
    secs = bench.median(iters)
    return {
        "measured": len(iters),
        "iteration_s": secs,
        "tokens": bench.median(toks),
        "tokens_per_s": bench.median([t / i for t, i in zip(toks, iters)]),
        # Generated tokens per response over the measured iterations (each has the same number of responses).
        "length_min": min(x["min"] for x in lengths),
        "length_mean": sum(x["mean"] for x in lengths) / len(lengths),
        "length_max": max(x["max"] for x in lengths),
        "warmup_s": res["iteration_s"][0] if res.get("iteration_s") else float("nan"),
        "peak_rss": res["memory"]["peak_rss_bytes"],
        "peak_pss": res["memory"]["peak_pss_bytes"],
    }


# ------------------------------------------------------------------------------------------------
# Parent: the tables and the chart
# ------------------------------------------------------------------------------------------------
def rlhf_ray_over_trl(sums: dict) -> dict | None:
    """Every summary figure of rlhf_ray over TRL's (HF generate), when both ran."""
    if "rlhf_ray" not in sums or "trl" not in sums:
        return None
    a, b = sums["rlhf_ray"], sums["trl"]
    return {k: a[k] / b[k] if b[k] else float("nan") for k in a if k != "measured"}


def print_summary(sums: dict) -> str:
    """The comparison: each side's medians, then rlhf_ray / trl column by column."""
    rows = [[side, s["measured"], s["warmup_s"], s["iteration_s"], s["tokens"], s["tokens_per_s"],
             f"{s['length_min']}/{s['length_mean']:.0f}/{s['length_max']}",
             f"{s['peak_rss'] / 2**30:.2f} GiB", f"{s['peak_pss'] / 2**30:.2f} GiB"]
            for side, s in sums.items()]
    ratio = rlhf_ray_over_trl(sums)
    if ratio:
        rows.append(["rlhf_ray / trl", "", ratio["warmup_s"], ratio["iteration_s"], ratio["tokens"],
                     ratio["tokens_per_s"], f"mean {ratio['length_mean']:.2f}x", f"{ratio['peak_rss']:.2f}x",
                     f"{ratio['peak_pss']:.2f}x"])
    return bench.print_table(
        ["run", "iters", "warm-up s", "s/iter", "gen tokens/iter", "gen tokens/s", "length min/mean/max",
         "peak RSS (tree)", "peak PSS (tree)"],
        rows,
        title="medians over the measured iterations (tokens/s: median of each iteration's tokens / seconds)",
    )


def print_ratios(by_shape: dict) -> str:
    """rlhf_ray / TRL (HF generate) of every shape side by side, with rlhf_ray's phase shares."""
    rows = []
    for name, shape in by_shape.items():
        ratio, runs = shape["ratio"], shape["runs"]
        if not ratio:
            continue
        seconds = phase_seconds(runs["rlhf_ray"])
        total = sum(seconds.values())
        rows.append([name, shape["summary"]["rlhf_ray"]["iteration_s"], shape["summary"]["trl"]["iteration_s"],
                     ratio["iteration_s"], ratio["tokens_per_s"],
                     " / ".join(f"{100 * s / total:.0f}%" for s in seconds.values())])
    print()
    return bench.print_table(["shape", "rlhf_ray s/iter", "trl s/iter", "s/iter ratio", "gen tokens/s ratio",
                              f"rlhf_ray {' / '.join(PHASES)}"], rows,
                             title="rlhf_ray / TRL by shape (below 1 in s/iter and above 1 in tokens/s: rlhf_ray faster)")


def print_failures(results: dict) -> None:
    for side, res in results.items():
        if not res.get("ok"):
            print(f"{side}: FAILED - {first_error_line(res) or 'no error text'} (full log: {res['log']})")


def phase_seconds(run: dict) -> dict[str, float]:
    """rlhf_ray's median seconds per phase over the measured iterations, from its own metrics."""
    return {p: bench.median([r[f"time/{p}_s"] for r in run["records"][1:]]) for p in PHASES}


def print_phases(run: dict) -> str:
    """rlhf_ray's per-phase table (its own ``time/`` and ``throughput/`` metrics against the wall
    time of ``step()``), then the weight sync's rate."""
    recs = run["records"][1:]
    seconds = phase_seconds(run)
    phases_s = bench.median([r["time/iteration_s"] for r in recs])
    step_s = bench.median(run["iteration_s"][1:])
    rows = [[p, s, 100 * s / phases_s, bench.median([r.get(f"throughput/{p}_tokens_per_s") for r in recs])]
            for p, s in seconds.items()]
    rows.append(["sum of phases", phases_s, 100.0,
                 bench.median([r["throughput/iteration_tokens_per_s"] for r in recs])])
    rows.append(["step() wall", step_s, 100 * step_s / phases_s, float("nan")])
    print()
    table = bench.print_table(["phase", "median s", "% of phases", "gen tokens/s"], rows,
                              title="rlhf_ray per-phase breakdown (its own metrics, measured iterations)")
    sync_bytes, sync_s = run["sync_total_bytes"], seconds["sync"]
    print(f"weight sync: {sync_bytes / 1e6:.1f} MB in {sync_s:.3f} s = {sync_bytes / sync_s / 1e6:.0f} MB/s")
    return table


def print_memory_by_process(results: dict) -> None:
    for side, res in results.items():
        mem = res.get("memory", {}).get("rss_by_process_at_peak", {})
        if mem:
            top = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in list(mem.items())[:8])
            print(f"{side} RSS at its peak, by process: {top}")


def print_profiles(results: dict, rate: int) -> None:
    """Per side and role: how busy it was in the measured iterations, and on what."""
    for side, res in results.items():
        for role, prof in (res.get("profile") or {}).items():
            work = max(1, prof["working"])
            print(f"\npy-spy, {side} {role}: working {100 * prof['busy']:.0f}% of the measured iterations' wall "
                  f"time ({prof['working']} of {prof['samples']} samples at {rate}/s; the rest waiting); "
                  f"of the working samples {100 * prof['matmul'] / work:.0f}% in matmul kernels")
            if prof["inclusive"]:
                print("  inclusive: " + "; ".join(f"{100 * v / work:.0f}% {k}" for k, v in prof["inclusive"]))
            print("  self:      " + "; ".join(f"{100 * v / work:.0f}% {k}" for k, v in prof["by_leaf"]))


def chart(path: Path, payload: dict) -> Path:
    """Per shape: seconds per iteration by phase (rlhf_ray's phases, TRL's whole iteration); then
    the rlhf_ray / TRL ratios of every shape."""
    whole = "whole iteration (TRL)"
    labels, series = [], {p: [] for p in (*PHASES, whole)}
    for name, shape in payload["shapes"].items():
        runs, sums = shape["runs"], shape["summary"]
        if runs.get("rlhf_ray", {}).get("ok"):
            labels.append(f"{name} rlhf_ray")
            for p, s in phase_seconds(runs["rlhf_ray"]).items():
                series[p].append(s)
            series[whole].append(0.0)
        for side in ("trl", "trl_vllm"):
            if side in sums:
                labels.append(f"{name} {side}")
                for p in PHASES:
                    series[p].append(0.0)
                series[whole].append(sums[side]["iteration_s"])
    panels = [{"title": "median seconds per iteration, by phase", "labels": labels, "stacked": True,
               "series": series, "ylabel": "s / iteration"}]
    ratios = {name: shape["ratio"] for name, shape in payload["shapes"].items() if shape["ratio"]}
    if ratios:
        keys = ("iteration_s", "tokens_per_s", "peak_rss", "peak_pss")
        panels.append({"title": "rlhf_ray / TRL", "labels": ["s/iter", "gen tokens/s", "peak RSS", "peak PSS"],
                       "series": {name: [r[k] for k in keys] for name, r in ratios.items()}, "ylabel": "x",
                       "hline": (1.0, "parity")})
    title = f"compare_trl {payload['machine'].get('date', '')}: shapes {', '.join(payload['shapes'])}"
    return bench.save_chart(path, panels, title)

if __name__ == "__main__":
    main()
