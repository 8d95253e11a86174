"""A checkpoint's weight-sync round trip in one process, no Ray: does this model survive PPO's
learner -> vLLM sync? (``rlhf-ray check-sync MODEL``)

The learner side is the model in transformers, named as the DeepSpeed learner exports it
(:func:`rlhf_ray.models.lora.exported_tensors`); the rollout side is a real vLLM engine with the
project's worker extension. The sender runs in a thread while the engine receives through
``collective_rpc`` (vLLM's in-process executor runs the worker here). Four measurements:

1. before any change, engine and learner agree (log-probs of sampled responses, greedy tokens);
2. every learner weight is perturbed and nothing sent: the engine must now disagree (the check
   can fail, and a model whose sync silently drops a tensor is caught);
3. after one sync they agree again;
4. after a second perturbation and sync they still agree (a reload path that only works once,
   or post-processing that keeps the first sync's weights, fails here: tied LM heads on CPU did).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import torch

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring
from rlhf_ray.models.lora import exported_tensors
from rlhf_ray.platform import detect
from rlhf_ray.ports import free_port
from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync.parity import (
    TOLERANCE_BY_DTYPE,
    WeightSyncParityError,
    check_greedy_parity,
    check_parity,
    tie_tolerant_argmax,
)
from rlhf_ray.sync.sender import WeightSender

SYNC_TIMEOUT_S = 120.0


@dataclass
class RoundTripReport:
    model: str
    architecture: str
    tied_embeddings: bool
    parameters: int
    gap_before: float  # max |log-prob difference| before any change
    gap_stale: float  # after a perturbation that was not sent (must exceed the tolerance)
    gap_after_sync: list[float]  # after each sync
    greedy_equal_after_sync: bool
    sync_seconds: list[float]
    sync_bytes: int
    atol: float

    @property
    def ok(self) -> bool:
        return (self.gap_before <= self.atol and self.gap_stale > self.atol and self.greedy_equal_after_sync
                and all(g <= self.atol for g in self.gap_after_sync))

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """Starts ``fn(*args)`` in a thread; the list receives its result or its exception."""
    out: list = []

    def run():
        try:
            out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by _join
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _join(thread: threading.Thread, out: list):
    thread.join(SYNC_TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"the learner side of the weight sync did not finish within {SYNC_TIMEOUT_S:.0f} s")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def sync_roundtrip(model_path: str, backend: str = "auto", dtype: str = "float32", atol: float = 1e-3,
                   perturb_scale: float = 0.05, max_model_len: int = 256, gpu_memory_utilization: float = 0.3,
                   trust_remote_code: bool = False, seed: int = 0) -> RoundTripReport:
    from rlhf_ray.engines.sampling import SamplingSpec
    from rlhf_ray.engines.vllm_engine import VLLMEngine
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    platform = detect(backend)
    platform.apply_env()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    learner = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(platform.device).eval()
    engine = VLLMEngine(model_path, backend=backend, dtype=dtype, max_model_len=max_model_len,
                        gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                        seed=seed)
    # Architectures vLLM runs through its Transformers backend (OLMo in 0.32) get transformers'
    # own model class decorated with vLLM's compile wrapper, in this process; its ``__call__``
    # reads a flag that only instances built by vLLM have. Ours predates it: it runs uncompiled.
    for module in learner.modules():
        module.__dict__.setdefault("do_not_compile", True)
    try:
        prompts = [tokenizer.encode(text) for text in ("12+30=", "The sum of 7 and 5 is", "Q: 3*4? A:")]
        sampled = engine.generate(prompts, SamplingSpec(max_new_tokens=12, seed=seed))
        responses = [g.response_ids for g in sampled]
        batch = RolloutBatch.from_token_lists(prompts, responses, tokenizer.pad_token_id)
        # Greedy tokens must agree one for one; near-ties within the dtype's kernel noise count as agreeing.
        tie_atol = TOLERANCE_BY_DTYPE[dtype].greedy_tie_atol if dtype in TOLERANCE_BY_DTYPE else 0.0

        def gap(check_greedy: bool) -> float:
            with torch.no_grad():
                learner_lp = scoring.response_logprobs(learner, batch.to(platform.device)).cpu()
            engine_lp = torch.zeros_like(learner_lp)
            for i, row in enumerate(engine.score(prompts, responses)):
                engine_lp[i, : len(row)] = torch.tensor(row)
            report = check_parity(learner_lp, engine_lp, batch.response_mask, atol, raise_on_fail=False)
            if check_greedy:
                greedy = engine.greedy(prompts, 12)
                greedy_batch = RolloutBatch.from_token_lists(prompts, greedy, tokenizer.pad_token_id)
                with torch.no_grad():
                    on_device = greedy_batch.to(platform.device)
                    argmax = tie_tolerant_argmax(scoring.response_logits(learner, on_device), on_device.responses,
                                                 tie_atol).cpu()
                check_greedy_parity([row[m.bool()].tolist() for row, m in zip(argmax, greedy_batch.response_mask)],
                                    greedy)
            return report.max_abs_diff

        gap_before = gap(check_greedy=False)
        def named():
            return ((t.name, t.value()) for t in exported_tensors(learner))

        manifest = mf.manifest_for(named())
        sender, port = WeightSender(), free_port()
        workers = engine.tensor_parallel_size
        thread = _in_thread(sender.open, "127.0.0.1", port, 1 + workers, platform.dist_backend, SYNC_TIMEOUT_S)
        engine.join_weight_sync("127.0.0.1", port, 1 + workers, 1, platform.dist_backend, SYNC_TIMEOUT_S)
        _join(*thread)
        generator = torch.Generator().manual_seed(seed + 1)
        gaps, seconds, greedy_ok, gap_stale = [], [], True, 0.0
        for sync_index in range(2):
            with torch.no_grad():
                for param in learner.parameters():
                    noise = torch.randn(param.shape, generator=generator) * perturb_scale
                    param.add_(noise.to(param.device, param.dtype))
            if sync_index == 0:
                gap_stale = gap(check_greedy=False)
            start = time.perf_counter()
            thread = _in_thread(sender.send, named(), manifest)
            engine.receive_weights(manifest)
            _join(*thread)
            seconds.append(time.perf_counter() - start)
            try:
                gaps.append(gap(check_greedy=True))
            except WeightSyncParityError:
                greedy_ok = False
                gaps.append(gap(check_greedy=False))
        sender.close()
        return RoundTripReport(
            model=model_path, architecture=type(learner).__name__,
            tied_embeddings=learner.get_output_embeddings() is not None
            and learner.get_output_embeddings().weight is learner.get_input_embeddings().weight,
            parameters=sum(p.numel() for p in learner.parameters()), gap_before=gap_before,
            gap_stale=gap_stale, gap_after_sync=gaps, greedy_equal_after_sync=greedy_ok, sync_seconds=seconds,
            sync_bytes=manifest["total_bytes"], atol=atol)
    finally:
        engine.shutdown()
