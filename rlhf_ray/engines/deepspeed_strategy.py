"""The DeepSpeed training strategy: process group, engine setup, backward/step, full weights, saving.

One object per learner process. It runs the same on CPU (gloo, DeepSpeed's CPU accelerator) and
GPU (NCCL); :mod:`rlhf_ray.platform` decides which.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_ray.models.loading import atomic_dir
from rlhf_ray.models.lora import (
    ADAPTER_DIR,
    LoraSettings,
    apply_lora,
    base_name,
    exported_tensors,
    is_lora,
    save_adapter,
    unwrap,
)
from rlhf_ray.platform import Platform, detect


@dataclass
class DeepSpeedStrategy:
    """Settings of one learner group plus the calls each rank makes; plain values only."""

    zero_stage: int = 2  # 0 (plain data parallel) .. 3 (parameters sharded too)
    offload_optimizer: bool = False  # optimizer states in host memory (stage >= 1)
    offload_params: bool = False  # parameters in host memory (stage 3)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    micro_batch_size: int = 1  # rows per rank per forward/backward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    bf16: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward instead of keeping them
    lora: LoraSettings | None = None  # train LoRA adapters only (None: every parameter)
    backend: str = "auto"  # auto | cpu | cuda
    seed: int = 42

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        self.platform: Platform = detect(self.backend)
        # DeepSpeed picks its accelerator at import time, so the env must be set before that.
        self.platform.apply_env()

    # ---- process group ------------------------------------------------------------------------

    def init_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int,
                         local_rank: int = 0) -> None:
        """Joins the learner group and seeds every RNG. Once per process; later calls only seed.

        ``local_rank`` is the device index inside this process's visible devices (0 under Ray,
        which gives each actor its own device).
        """
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                              RANK=str(rank), WORLD_SIZE=str(world_size),
                              LOCAL_RANK=str(local_rank))
            get_accelerator().set_device(local_rank)
            deepspeed.init_distributed(dist_backend=self.platform.dist_backend,
                                       auto_mpi_discovery=False)
        elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"process group already set up as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, asked for {rank} of {world_size}")
        # Same seed on every rank: freshly initialised weights (value heads) must agree, since
        # ZeRO-3 keeps each rank's own slice of them rather than broadcasting rank 0's.
        random.seed(self.seed)
        torch.manual_seed(self.seed)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ---- engine -------------------------------------------------------------------------------

    def ds_config(self) -> dict:
        zero: dict = {"stage": self.zero_stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not self.platform.is_cpu}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not self.platform.is_cpu}
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "eps": 1e-8,
                    "weight_decay": self.weight_decay,
                    # On CPU, torch's AdamW: DeepSpeed's own CPU Adam JIT-compiles C++ (~1 min)
                    # on a fresh machine. On GPU, DeepSpeed's fused/CPU Adam.
                    "torch_adam": self.platform.is_cpu,
                },
            },
            # torch's AdamW under ZeRO is not on DeepSpeed's tested list, but works.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,  # metrics are ours to log
            "wall_clock_breakdown": False,
        }

    @contextlib.contextmanager
    def model_init(self) -> Iterator[None]:
        """Build the model inside it. Under ZeRO-3, transformers' ``from_pretrained`` then loads
        every parameter straight into DeepSpeed's partitions (``zero.Init``, switched on by a live
        ``HfDeepSpeedConfig``): each rank holds its shard only, where without it every rank first
        holds the whole model (a 70B model whole on one GPU, eight copies in host memory).
        Outside the block, models load whole again (transformers keeps only a weak reference)."""
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        partitioned_loading = HfDeepSpeedConfig(self.ds_config())
        try:
            yield
        finally:
            del partitioned_loading

    def prepare(self, model: torch.nn.Module):
        """Applies the memory savers asked for (gradient checkpointing, LoRA) to ``model`` and wraps
        it in a ``DeepSpeedEngine``; only trainable parameters get the optimizer."""
        import deepspeed

        if self.gradient_checkpointing:
            # Non-reentrant: gradients reach the adapters even though the embeddings are frozen.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            model = apply_lora(model, self.lora)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config(),
        )
        return engine

    def backward(self, loss: torch.Tensor, engine) -> None:
        engine.backward(loss)

    def step(self, engine) -> None:
        """Optimizer step; DeepSpeed skips it between gradient-accumulation boundaries."""
        engine.step()

    # ---- full weights -------------------------------------------------------------------------

    def full_named_parameters(self, engine) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields ``(name, full tensor)`` in HF checkpoint naming of the base model, one parameter
        at a time; under LoRA the merged weights (base + scaled adapter delta), adapters unlisted.

        A collective under ZeRO-3: every rank must iterate it to the end, in step, since each
        parameter is all-gathered as it is reached (so at most one full parameter, with its
        adapter, is held beyond the shards). A yielded tensor is only valid until the next one is
        requested: clone it to keep it. Feeds weight sync into vLLM and :meth:`save_hf`.
        """
        for tensor in exported_tensors(engine.module):
            with _gathered(tensor.params):
                yield tensor.name, tensor.value()

    def weight_specs(self, engine) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(name, dtype, full shape)`` of what :meth:`full_named_parameters` yields, in order."""
        return [(t.name, t.dtype, t.shape) for t in exported_tensors(engine.module)]

    def save_hf(self, engine, tokenizer, out_dir: str | os.PathLike) -> None:
        """Rank 0 writes an HF folder (safetensors, + tokenizer) atomically; a collective.

        The module's ``save_pretrained(dir, state_dict=...)`` does the writing, so HF models and
        :mod:`rlhf_ray.models.heads` models both save in their own format. Under LoRA the folder
        holds the merged model (unless ``lora.save_merged`` is off) and the peft adapter in
        ``adapter/``.
        """
        is_writer = self.rank == 0
        module = engine.module
        lora = self.lora is not None and is_lora(module)
        merged = not lora or self.lora.save_merged
        state_dict = {}
        if merged:
            for name, tensor in self.full_named_parameters(engine):
                if is_writer:
                    state_dict[name] = tensor.detach().to("cpu", copy=True)
        adapter_state = self._gathered_adapter(engine) if lora else {}
        if is_writer:
            with atomic_dir(out_dir) as tmp:
                if merged:
                    # Persistent buffers belong in the checkpoint too; DeepSpeed never shards them.
                    persistent = module.state_dict().keys()
                    for name, buf in module.named_buffers():
                        if name in persistent:
                            state_dict[base_name(name)] = buf.detach().to("cpu", copy=True)
                    unwrap(module).save_pretrained(tmp, state_dict=state_dict)
                if lora:
                    save_adapter(module, adapter_state, tmp / ADAPTER_DIR)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        self.barrier()

    def _gathered_adapter(self, engine) -> dict[str, torch.Tensor]:
        """Full copies of the trainable tensors (adapters, heads) on rank 0; a collective."""
        state = {}
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                with _gathered([param]):
                    if self.rank == 0:
                        state[name] = param.data.detach().to("cpu", copy=True)
        return state

    # ---- resumable training state ----------------------------------------------------------

    CHECKPOINT_TAG = "state"

    def save_checkpoint(self, engine, out_dir: str | os.PathLike) -> None:
        """Weights, optimizer states and this rank's RNG states into ``out_dir``; a collective.

        Every rank writes its own ZeRO shard files into the same folder, so on several nodes the
        folder must be shared storage (the driver makes it atomic by renaming its parent).
        """
        engine.save_checkpoint(str(out_dir), tag=self.CHECKPOINT_TAG, client_state={})
        torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{self.rank}.pt"))
        self.barrier()

    def load_checkpoint(self, engine, ckpt_dir: str | os.PathLike) -> None:
        """Restores what :meth:`save_checkpoint` wrote (same world size); a collective."""
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=self.CHECKPOINT_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt_dir}")
        rng_file = os.path.join(ckpt_dir, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        self.barrier()

    # ---- metrics ------------------------------------------------------------------------------

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means over ranks of per-rank scalars (same keys on every rank)."""
        if not dist.is_initialized() or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                              device=self.platform.device)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world_size).tolist()))


def _gathered(params: list[torch.nn.Parameter]):
    """Whole ``params`` inside the block: ZeRO-3 parameters (they carry ds_id) are all-gathered,
    a collective; elsewhere every rank already holds them whole."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params))


def rng_state() -> dict:
    """Python, NumPy, torch and (where there is a GPU) CUDA RNG states of this process, as tensors
    and plain values (so that ``torch.load(weights_only=True)`` reads them back). CUDA's drives
    dropout and sampling on the GPU: without it a resumed learner draws other masks."""
    import numpy as np

    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per device this process sees; a resume may see as many (a rank sees one).
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
