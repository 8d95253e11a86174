"""The rollout side of a weight sync: methods that run inside each vLLM worker process.

vLLM mixes this class into its worker (``worker_extension_cls``); the engine calls the methods
through ``LLM.collective_rpc``. Names must not clash with the worker's own methods (vLLM checks).
"""

from __future__ import annotations

import logging

import torch

from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync import shm
from rlhf_ray.sync.group import SyncGroup, open_group, open_store
from rlhf_ray.sync.ipc import IpcReceiver


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker; ``self`` is the worker (``self.rank``, ``self.reload_weights``)."""

    _rlhf_group: SyncGroup | None = None
    _rlhf_segment: torch.Tensor | None = None  # the learner's shared-memory segment, when on its node
    _rlhf_buffers: list[torch.Tensor] | None = None
    _rlhf_buffer_sizes: list[int] | None = None
    _rlhf_scratch: torch.Tensor | None = None  # receive_weights(load=False) copies here
    _rlhf_aliases: tuple[torch.nn.Module, ...] = ()  # layers holding another's parameter (tied LM heads)
    _rlhf_ipc = None  # IpcReceiver: the slots of the learner rank on this device (rollout.colocate)

    def join_weight_sync(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        rank_offset: int,
        backend: str,
        timeout: float = 300.0,
        shm_path: str | None = None,
    ) -> int:
        """Joins the learner's broadcast group as ``rank_offset`` + this worker's rank in its
        engine; returns that rank. With ``shm_path`` (an engine on the learner's node), maps that
        segment first and joins the shared-memory control group instead. Joining again replaces
        the previous group."""
        rank = rank_offset + self.rank
        _forget_sync(self)
        if shm_path:
            # Mapped before joining: the learner removes the name once everyone has joined.
            self._rlhf_segment = shm.map_segment(shm_path)
            self._rlhf_group = open_group(master_addr, master_port, rank, world_size, "gloo", timeout, name="shm")
        else:
            self._rlhf_group = open_group(master_addr, master_port, rank, world_size, backend, timeout)
        return rank

    def join_colocated_sync(self, master_addr: str, master_port: int, peer: str, timeout: float = 300.0) -> None:
        """Maps the slots of the learner rank that shares this worker's device (``rollout.colocate``,
        ``rlhf_ray.sync.ipc``); later syncs take the weights from them. Replaces any group."""
        _forget_sync(self)
        self._rlhf_ipc = IpcReceiver(open_store(master_addr, master_port, False, timeout), peer, timeout)

    def device_uuid(self) -> str | None:
        """This worker's GPU (its UUID, what NCCL tells devices apart by); None on CPU."""
        from rlhf_ray.platform import gpu_uuid

        return gpu_uuid()

    @torch.no_grad()
    def receive_weights(self, manifest: dict, load: bool = True) -> int:
        """Receives every bucket of ``manifest`` and loads it in place; returns the bytes received.
        ``load=False`` copies the buckets into a scratch buffer instead of into vLLM's model: the
        hand-over alone, without vLLM's reload (benchmarks/bench_weight_sync.py)."""
        if self._rlhf_ipc is not None:
            device = self._rlhf_ipc.slots[0].device
            out = _host_buffers(self, manifest) if device.type == "cpu" else None
            _load_buckets(self, manifest, self._rlhf_ipc.buckets(manifest, out), load, device)
            return manifest["total_bytes"]
        group = self._rlhf_group
        if group is None:
            raise RuntimeError("join_weight_sync must be called before receive_weights")
        buckets = manifest["buckets"]
        works: list = []  # one broadcast per bucket, posted one bucket ahead of loading
        buffers: list[torch.Tensor | None] = []
        segment = self._rlhf_segment
        if segment is not None and shm.segment_bytes(manifest) > segment.numel():
            raise ValueError("the manifest outgrew the shared-memory segment: join the sync again")
        offsets = shm.bucket_offsets(manifest)

        def post_next() -> None:
            i = len(works)
            if i >= len(buckets):
                return
            if segment is None:
                buffers.append(_receive_buffer(self, manifest, i, group.device))
                works.append(group.broadcast(buffers[i]))
            else:  # the bytes are in place; the broadcast only says that bucket i is packed
                buffers.append(segment[offsets[i] : offsets[i] + buckets[i]["nbytes"]])
                works.append(group.broadcast(torch.zeros(1, dtype=torch.int64)))

        def arrived():
            post_next()
            for i in range(len(buckets)):
                post_next()  # the next bucket travels while this one is loaded
                group.wait(works[i], f"bucket {i} of {len(buckets)}")
                yield i, buffers[i]
                buffers[i] = None  # vLLM's views keep it alive only as long as they need it

        try:
            _load_buckets(self, manifest, arrived(), load, group.device)
        finally:
            # Every rank must take part in every broadcast, or the sender and the other engines
            # hang: finish the remaining ones even when loading failed.
            while len(works) < len(buckets):
                post_next()
            for i, work in enumerate(works):
                group.wait(work, f"bucket {i} of {len(buckets)}")
        return manifest["total_bytes"]


def _forget_sync(worker) -> None:
    """Drops the previous sync source before joining a new one, and finds the tied layers once: a
    reload puts the same parameters back, so what is tied stays tied."""
    model = _vllm_model(worker)
    worker._rlhf_aliases = tuple(weight_aliases(model)) if model is not None else ()
    quiet_known_reload_warnings([*worker._rlhf_aliases, *(computed_layers(model) if model is not None else ())])
    if worker._rlhf_group is not None:
        worker._rlhf_group.close()
    worker._rlhf_group = worker._rlhf_segment = worker._rlhf_ipc = None


def _load_buckets(worker, manifest: dict, arrived, load: bool, device: torch.device) -> None:
    """Loads the ``(i, bucket i)`` pairs of ``arrived`` into the worker's model as they come, or
    with ``load=False`` copies them into a scratch buffer."""
    if load:
        mf.check_wire_dtype(manifest, _engine_dtype(worker))
        # reload_weights, not model.load_weights: it restores the loaders that the first load
        # consumed (calling load_weights again fails on CPU) and copies into the live storage.
        worker.reload_weights(weights_iterator=mf.tensors_of(arrived, manifest))
        reprocess_weight_aliases(worker._rlhf_aliases)
    else:
        offsets = shm.bucket_offsets(manifest)
        scratch = _scratch_buffer(worker, shm.segment_bytes(manifest), device)
        for i, buf in arrived:
            scratch[offsets[i] : offsets[i] + buf.numel()].copy_(buf)


def _engine_dtype(worker) -> torch.dtype:
    """What the engine computes in: vLLM's model config's dtype, or the HF receiver's model's."""
    config = getattr(worker, "model_config", None)
    return config.dtype if config is not None else worker.model.dtype


def _vllm_model(worker) -> torch.nn.Module | None:
    """The vLLM worker's model; None on the HF engine's receiver, whose model ties by storage."""
    runner = getattr(worker, "model_runner", None)
    return runner.get_model() if runner is not None else None


def weight_aliases(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose parameter was registered first by another layer (a tied LM head holds the
    embedding's), in module order."""
    seen: set[int] = set()
    aliases = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if any(id(p) in seen for p in params):
            aliases.append(module)
        seen.update(id(p) for p in params)
    return aliases


def computed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers with buffers but no parameters of their own: computed at start (a rotary cos/sin
    cache, whatever the class: Llama-3's ``Llama3RotaryEmbedding``, YaRN's, ...), never in a
    checkpoint, so a reload never sends them anything."""
    return [m for m in model.modules()
            if next(m.parameters(recurse=False), None) is None and next(m.buffers(recurse=False), None) is not None]


def reprocess_weight_aliases(aliases: tuple[torch.nn.Module, ...]) -> int:
    """Re-runs weight post-processing on the layers that hold another layer's parameter (tied
    embeddings, from :func:`weight_aliases`); returns how many.

    vLLM's in-place reload post-processes only the layers that received tensors. A tied model's
    checkpoint names the shared tensor once (``embed_tokens``/``wte``), so its LM head receives
    nothing and keeps what it derived from the old weights at the previous load: on CPU a packed
    copy of the matrix (oneDNN or sgl-kernel GEMM, ``dispatch_cpu_unquantized_gemm``), so the
    engine went on computing logits with the first weights while its embedding moved on. On GPU
    the unquantized embedding method derives nothing and this is a cheap no-op. Only that method
    (what a tied LM head uses) is re-run: quantized methods are not safe to repeat on processed
    weights, and the CPU linear method drops its weight after packing."""
    if not aliases:  # the HF engine's receiver (it ties by storage) runs where vLLM is not installed
        return 0
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    count = 0
    for module in aliases:
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)
            count += 1
    return count


def _scratch_buffer(worker, nbytes: int, device: torch.device) -> torch.Tensor:
    if worker._rlhf_scratch is None or worker._rlhf_scratch.numel() < nbytes:
        worker._rlhf_scratch = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    return worker._rlhf_scratch


def _receive_buffer(worker, manifest: dict, index: int, device: torch.device) -> torch.Tensor:
    """A module function, not a method: every extension method becomes an rpc verb."""
    if device.type != "cpu":
        # The CUDA caching allocator recycles device memory cheaply, and keeping every bucket
        # would hold a second full copy of the weights on the GPU.
        return torch.empty(manifest["buckets"][index]["nbytes"], dtype=torch.uint8, device=device)
    return _host_buffers(worker, manifest)[index]


def _host_buffers(worker, manifest: dict) -> list[torch.Tensor]:
    """One host buffer per bucket, kept across syncs: on CPU a fresh large allocation pays a page
    fault per 4 KiB on first touch. Per bucket, not one reused buffer, because vLLM holds views of
    a layer's tensors until the whole layer (e.g. q, k and v) has arrived."""
    sizes = [b["nbytes"] for b in manifest["buckets"]]
    if worker._rlhf_buffer_sizes != sizes:
        worker._rlhf_buffers = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        worker._rlhf_buffer_sizes = sizes
    return worker._rlhf_buffers


# vLLM's in-place reload warns "<layer>: Failed to load weights" for every layer that received no
# tensor, at every sync. Two kinds are expected of a healthy model: computed layers such as the
# rotary cos/sin cache (never in a checkpoint; vLLM puts the current one back; ``computed_layers``)
# and a tied LM head (its weight arrives under the embedding's name; ``reprocess_weight_aliases``
# refreshes it). Other layers still warn.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _reload_warning(layer_class: str) -> str:
    return f"{layer_class}: Failed to load weights"


class _ExpectedReloadWarnings(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.expected = {_reload_warning("RotaryEmbedding")}

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.expected


def quiet_known_reload_warnings(aliases: list[torch.nn.Module] = ()) -> None:
    """Drops vLLM's reload warnings that every sync of a healthy model gives, including those of
    the layers in ``aliases`` (from :func:`weight_aliases` and :func:`computed_layers`). Idempotent."""
    logger = logging.getLogger(_RELOAD_LOGGER)
    known = next((f for f in logger.filters if isinstance(f, _ExpectedReloadWarnings)), None)
    if known is None:
        known = _ExpectedReloadWarnings()
        logger.addFilter(known)
    known.expected.update(_reload_warning(type(m).__name__) for m in aliases)
