"""First contact with a device: the ``engines/`` layer on CUDA (or CPU), one process, no Ray, no vLLM.

``scripts/gpu_smoke.sh`` runs it on a GPU machine that has torch, transformers, peft and DeepSpeed
(the wheel built here is pure Python) but neither Ray nor vLLM. On a small model built offline it
checks what runs first on a GPU: DeepSpeed learner steps at ZeRO 0, 2 and 3 (bf16 on CUDA; ZeRO-3
loading each rank's shard only), with batches moved to the device and host tensors returned; the
reference, critic and reward scoring passes; the receiving side of the weight sync taking new
weights through the manifest and buckets into a model on the device; the colocated hand-over (CUDA
IPC slots) between two processes on one device; and the learner-vs-rollout
log-prob gap against the tolerance of the run's dtype; and the RNG states a checkpoint keeps. One JSON line per check (step time,
tokens/s, sync GB/s, the gap); exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from rlhf_ray.engines.ipc_check import ipc_handover
from rlhf_ray.ports import free_port

TEXTS = [("12+7=", "19"), ("3+4=", "7"), ("100+250=", "350"), ("8+8=", "16")] * 4


def _batch(tokenizer):
    from rlhf_ray.data.tokenize import encode_pairs

    prompts, responses = zip(*TEXTS)
    return encode_pairs(tokenizer, list(prompts), list(responses), max_prompt_tokens=32, max_seq_len=64)


def _on_host(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def learner_steps(model_dir: str, zero_stage: int, device: str, steps: int) -> dict:
    """DeepSpeed's engine trains the policy on batches it moves to the device itself."""
    from rlhf_ray import algo
    from rlhf_ray.engines.deepspeed_strategy import DeepSpeedStrategy
    from rlhf_ray.engines.scoring import response_logprobs
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    strategy = DeepSpeedStrategy(zero_stage=zero_stage, lr=1e-3, micro_batch_size=len(TEXTS), bf16=device == "cuda",
                                 backend=device, seed=0)
    strategy.init_distributed(0, 1, "127.0.0.1", free_port())
    with strategy.model_init():
        model = load_causal_lm(model_dir)
    held_at_build = sum(p.data.numel() for p in model.parameters())
    engine = strategy.prepare(model)
    batch = _batch(load_tokenizer(model_dir))
    losses, start = [], None
    for step in range(steps + 1):  # the first step warms up (kernels, allocator) and is not timed
        if step == 1:
            _sync(device)
            start = time.perf_counter()
        mb = batch.to(device)
        loss = algo.language_model_loss(response_logprobs(engine, mb), mb.response_mask)
        strategy.backward(loss, engine)
        strategy.step(engine)
        losses.append(loss.item())
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    first_name, first = next(iter(strategy.full_named_parameters(engine)))
    exported = first.detach().cpu()
    engine.destroy()
    ok = losses[-1] < losses[0] and (held_at_build == 0) == (zero_stage == 3) and _on_host(exported)
    return {"check": f"learner_zero{zero_stage}", "ok": ok, "loss_first": losses[0], "loss_last": losses[-1],
            "step_s": seconds, "tokens_per_s": int(batch.attention_mask.sum()) / seconds,
            "held_at_build": held_at_build, "exported": first_name}


def scoring_passes(model_dir: str, device: str, dtype: str) -> dict:
    """Reference log-probs, critic values and reward scores computed on the device, returned on the host."""
    from rlhf_ray.engines.scoring import batched_logprobs, batched_scores, batched_values
    from rlhf_ray.models.heads import RewardModel, ValueModel
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    batch = _batch(load_tokenizer(model_dir))
    reference = load_causal_lm(model_dir, dtype=dtype).to(device).eval()
    start = time.perf_counter()
    logprobs, entropy = batched_logprobs(reference, batch, micro_batch_size=8)
    values = batched_values(ValueModel.from_base(model_dir, dtype=dtype).to(device).eval(), batch, 8)
    scores = batched_scores(RewardModel.from_base(model_dir, dtype=dtype).to(device).eval(), batch, 8)
    _sync(device)
    ok = _on_host(logprobs, entropy, values, scores) and bool(torch.isfinite(logprobs).all()) \
        and values.shape == batch.response_mask.shape and scores.shape == (batch.size,)
    return {"check": "scoring", "ok": ok, "seconds": time.perf_counter() - start}


def weight_sync(model_dir: str, device: str, dtype: str) -> dict:
    """New weights reach a rollout model on the device through the manifest and buckets (over gloo
    between two threads: NCCL needs two GPUs, a second process each), then its log-probs equal the
    sender's within the dtype's tolerance, and before the sync they did not."""
    from rlhf_ray.engines.hf_engine import HFEngine
    from rlhf_ray.engines.scoring import batched_logprobs
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ray.sync.manifest import manifest_for
    from rlhf_ray.sync.parity import check_parity, parity_tolerance
    from rlhf_ray.sync.sender import WeightSender

    batch = _batch(load_tokenizer(model_dir))
    learner = load_causal_lm(model_dir).to(device).eval()
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    receiver = HFEngine(model_dir, dtype=dtype)  # its receiving side, on a model moved to the device
    rollout = receiver.model.to(device)
    manifest = manifest_for(learner.state_dict().items(), bucket_bytes=1 << 20, dtype=getattr(torch, dtype))
    port, sender = free_port(), WeightSender()
    opened = threading.Thread(target=sender.open, args=("127.0.0.1", port, 2, "gloo"))
    opened.start()
    receiver.join_weight_sync("127.0.0.1", port, 2, 1, "gloo")
    opened.join()
    tolerance = parity_tolerance(dtype)

    def gap():
        want, _ = batched_logprobs(learner, batch, 8)
        got, _ = batched_logprobs(rollout, batch, 8)
        return check_parity(want, got, batch.response_mask, tolerance.max_abs, raise_on_fail=False,
                            mean_atol=tolerance.mean_abs)

    stale = gap()
    sending = threading.Thread(target=sender.send, args=(iter(learner.state_dict().items()), manifest))
    start = time.perf_counter()
    sending.start()
    received = receiver.receive_weights(manifest)
    sending.join()
    _sync(device)
    seconds = time.perf_counter() - start
    sender.close()
    after = gap()
    return {"check": "weight_sync", "ok": after.ok and not stale.ok, "gb_per_s": received / seconds / 1e9,
            "bytes": received, "mean_gap_after": after.mean_abs_diff, "mean_gap_stale": stale.mean_abs_diff,
            "dtype": dtype, "tolerance_mean": tolerance.mean_abs}


def rng_roundtrip(device: str) -> dict:
    """A checkpoint's RNG states (CUDA's included on a GPU) load with ``weights_only`` and replay
    the same random draws on the device."""
    import io

    from rlhf_ray.engines.deepspeed_strategy import rng_state, set_rng_state

    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    first = torch.rand(4, device=device)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    again = torch.rand(4, device=device)
    return {"check": "rng_roundtrip", "ok": bool(torch.equal(first, again)) and ("cuda" in rng_state()) == (device == "cuda")}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.engines.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256, help="width of the model built offline (heads of 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed learner steps per ZeRO stage")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rlhf-ray smoke: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model_dir = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="rlhf-ray-smoke-")) / "model",
                                     TinyModelSpec.of_width(args.hidden, args.layers)))
    checks = [(f"learner_zero{z}", lambda z=z: learner_steps(model_dir, z, args.device, args.steps)) for z in (0, 2, 3)]
    checks += [("scoring", lambda: scoring_passes(model_dir, args.device, dtype)),
               ("weight_sync", lambda: weight_sync(model_dir, args.device, dtype)),
               ("ipc_handover", lambda: ipc_handover(model_dir, args.device, dtype)),
               ("rng_roundtrip", lambda: rng_roundtrip(args.device))]
    failed = 0
    for name, check in checks:
        try:
            result = check()
        except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
            result = {"check": name, "ok": False, "error": "".join(traceback.format_exception_only(e)).strip()}
        failed += not result["ok"]
        print(json.dumps({"device": args.device, **result}), flush=True)
    print(json.dumps({"device": args.device, "checks": len(checks), "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
