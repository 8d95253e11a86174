"""Does a plan fit the cluster it names, and does its rollout sharding fit the model?

Pure functions over a ``RunConfig`` (no torch, no Ray), so ``rlhf-ray config check`` rejects an
impossible plan in milliseconds instead of leaving placement groups pending forever on a cluster.

* ``plan_problems(cfg)``: the bundles ``rlhf_ray.actors.placement.launch_roles`` will ask Ray for,
  summed per resource, against ``cluster.nodes x cluster.gpus_per_node`` (and CPUs when
  ``cluster.cpus_per_node`` is set); and every single bundle against one node, since a bundle can
  never span nodes. Skipped when ``cluster.nodes`` is 0 ("whatever Ray has").
* ``model_problems(cfg, model_config)``: rollout tensor parallelism against the policy's attention
  heads, the context length, and whether a learner rank's training step fits
  ``cluster.gpu_memory_gb`` (``model_config`` is the policy's parsed ``config.json``; see
  ``read_model_config``).

Both return ``[(dotted_key, message), ...]``, the shape of ``RunConfig.validate``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Problem = tuple[str, str]


@dataclass(frozen=True)
class RoleAsk:
    """One role's placement group: ``count`` identical bundles (rank 0 may carry extras)."""

    role: str  # "rollout", "policy", "critic", "scorers"
    key: str  # the config key a user changes to fix it
    count: int
    cpus: float  # per bundle
    gpus: float  # per bundle
    first_extra_cpus: float = 0.0  # colocated scorers ride on the policy's rank-0 bundle
    first_extra_gpus: float = 0.0
    detail: str = ""  # how the role's GPUs were computed, for messages
    bundle_detail: str = ""  # how one bundle's GPUs were computed

    @property
    def total_cpus(self) -> float:
        return self.count * self.cpus + self.first_extra_cpus

    @property
    def total_gpus(self) -> float:
        return self.count * self.gpus + self.first_extra_gpus

    def bundles(self) -> list[tuple[float, float]]:
        """(cpus, gpus) of each bundle, rank 0 first."""
        out = [(self.cpus, self.gpus)] * self.count
        if out:
            out[0] = (self.cpus + self.first_extra_cpus, self.gpus + self.first_extra_gpus)
        return out


def role_asks(cfg) -> list[RoleAsk]:
    """What every role asks Ray for; mirrors ``placement.launch_roles`` bundle by bundle."""
    ro, pol, cri, sc = cfg.rollout, cfg.policy, cfg.critic, cfg.scorers
    colocate = sc.colocate_with_learners
    n_scorers = sc.reference_replicas + 1
    asks = [] if ro.colocate else [
        RoleAsk("rollout", "rollout.num_engines", ro.num_engines, ro.num_cpus,
                ro.num_gpus * ro.tensor_parallel_size,
                detail=f"{ro.num_engines} engines x tensor_parallel_size {ro.tensor_parallel_size} "
                       f"x num_gpus {_n(ro.num_gpus)}",
                bundle_detail=f"one engine = tensor_parallel_size {ro.tensor_parallel_size} "
                              f"x num_gpus {_n(ro.num_gpus)}")]
    # rollout.colocate: each policy bundle also holds its engine (its CPUs; the GPU is shared).
    asks.append(
        RoleAsk("policy", "policy.num_ranks", pol.num_ranks, pol.num_cpus + (ro.num_cpus if ro.colocate else 0.0),
                pol.num_gpus,
                first_extra_cpus=n_scorers * sc.num_cpus if colocate else 0.0,
                first_extra_gpus=n_scorers * sc.num_gpus if colocate else 0.0,
                detail=f"{pol.num_ranks} ranks x num_gpus {_n(pol.num_gpus)}"
                       + (" (each shared with a colocated rollout engine)" if ro.colocate else "")
                       + (f" + {n_scorers} colocated scorers x {_n(sc.num_gpus)} on rank 0" if colocate else "")))
    if cfg.uses_critic:
        asks.append(RoleAsk("critic", "critic.num_ranks", cri.num_ranks, cri.num_cpus, cri.num_gpus,
                            detail=f"{cri.num_ranks} ranks x num_gpus {_n(cri.num_gpus)}"))
    if not colocate:
        asks.append(RoleAsk("scorers", "scorers.num_gpus", n_scorers, sc.num_cpus, sc.num_gpus,
                            detail=f"{sc.reference_replicas} reference + reward x num_gpus {_n(sc.num_gpus)}"))
    return asks


def plan_problems(cfg) -> list[Problem]:
    cl = cfg.cluster
    if cl.nodes <= 0:
        return []
    problems: list[Problem] = []
    asks = role_asks(cfg)

    # Ray refuses fractional quantities above 1 ("0.5 GPU" shares a device, "1.5" means nothing).
    for a in asks:
        for gpus in sorted({g for _, g in a.bundles()}):
            if gpus > 1 and not float(gpus).is_integer():
                problems.append((_gpu_key(a), (f"one {a.role} bundle asks for {_n(gpus)} GPUs"
                                              f"{_paren(a.bundle_detail)}; Ray needs whole GPUs above 1")))
                break

    per_node_gpus = cl.gpus_per_node
    total_gpus = sum(a.total_gpus for a in asks)
    have_gpus = cl.nodes * per_node_gpus
    if total_gpus > have_gpus + 1e-9:
        parts = ", ".join(f"{a.role} {_n(a.total_gpus)} ({a.detail})" for a in asks if a.total_gpus)
        problems.append(("cluster.nodes",
                         (f"the plan asks for {_n(total_gpus)} GPUs [{parts}] but the cluster has "
                         f"{cl.nodes} nodes x {per_node_gpus} GPUs = {have_gpus}")))
    for a in asks:
        biggest = max((g for _, g in a.bundles()), default=0.0)
        if biggest > per_node_gpus + 1e-9:
            problems.append((_gpu_key(a),
                             (f"one {a.role} bundle asks for {_n(biggest)} GPUs{_paren(a.bundle_detail)} but one node "
                             f"has cluster.gpus_per_node={per_node_gpus}; a bundle cannot span nodes")))

    if cl.cpus_per_node > 0:
        total_cpus = sum(a.total_cpus for a in asks)
        have_cpus = cl.nodes * cl.cpus_per_node
        if total_cpus > have_cpus + 1e-9:
            parts = ", ".join(f"{a.role} {_n(a.total_cpus)}" for a in asks if a.total_cpus)
            problems.append(("cluster.cpus_per_node",
                             (f"the plan asks for {_n(total_cpus)} CPUs [{parts}] but the cluster has "
                             f"{cl.nodes} nodes x {cl.cpus_per_node} CPUs = {have_cpus}")))
        for a in asks:
            biggest = max((c for c, _ in a.bundles()), default=0.0)
            if biggest > cl.cpus_per_node + 1e-9:
                problems.append((f"{a.role}.num_cpus",
                                 (f"one {a.role} bundle asks for {_n(biggest)} CPUs but one node has "
                                 f"cluster.cpus_per_node={cl.cpus_per_node}")))
    return problems


def model_problems(cfg, model_config: dict[str, Any] | None) -> list[Problem]:
    """Rollout tensor parallelism vs the policy's heads; empty when nothing is known."""
    if not model_config:
        return []
    if "num_attention_heads" not in model_config and isinstance(model_config.get("text_config"), dict):
        model_config = model_config["text_config"]  # multimodal configs nest the language model
    tp = cfg.rollout.tensor_parallel_size
    problems: list[Problem] = []
    heads = model_config.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0 and heads % tp:
        problems.append(("rollout.tensor_parallel_size",
                         (f"{tp} does not divide the policy's num_attention_heads={heads} "
                         f"(valid sizes: {_divisors(heads)})")))
    kv = model_config.get("num_key_value_heads")
    # vLLM splits KV heads across workers, or replicates them when tp is a multiple of their count.
    if isinstance(kv, int) and kv > 0 and kv % tp and tp % kv:
        problems.append(("rollout.tensor_parallel_size",
                         (f"{tp} neither divides nor is a multiple of the policy's "
                         f"num_key_value_heads={kv}")))
    problems += learner_memory_problems(cfg, model_config)
    problems += colocated_memory_problems(cfg, model_config)
    problems += sync_receive_problems(cfg, model_config)
    problems += reference_memory_problems(cfg, model_config)
    context = model_context_length(model_config)
    if context is not None and cfg.rollout.max_model_len > context:
        problems.append(("rollout.max_model_len",
                         (f"{cfg.rollout.max_model_len} exceeds the policy's context of {context} positions "
                          f"(vLLM refuses it): at most {context}, with data.max_prompt_tokens + "
                          f"rollout.max_new_tokens within it")))
    return problems


@dataclass(frozen=True)
class LearnerMemory:
    """Bytes one learner rank holds on its GPU during a training step, by what holds them."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def _attention_dims(model_config: dict[str, Any], hidden: int, heads: int) -> tuple[int, int]:
    """(key/value heads, head dimension): grouped-query attention's, or all heads and hidden/heads."""
    return model_config.get("num_key_value_heads") or heads, model_config.get("head_dim") or hidden // heads


def _model_dtype_bytes(cfg) -> int:
    """Bytes per weight in ``model.dtype`` (what the engines and the frozen scorers hold)."""
    return 4 if cfg.model.dtype == "float32" else 2


def parameter_count(model_config: dict[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its ``config.json`` (norms and biases left
    out); None when the config lacks a field it needs."""
    h, layers, vocab, inter = (model_config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                              "intermediate_size"))
    heads = model_config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (h, layers, vocab, inter, heads)):
        return None
    kv, head_dim = _attention_dims(model_config, h, heads)
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q and o; k and v (grouped)
    embeddings = vocab * h * (1 if model_config.get("tie_word_embeddings") else 2)
    return embeddings + layers * (attention + 3 * h * inter)  # gate, up and down projections


def learner_memory(lc, model_config: dict[str, Any], tokens_per_row: int, lm_head: bool) -> LearnerMemory | None:
    """One rank of a learner section ``lc`` (policy or critic) training on micro-batches of
    ``micro_batch_size`` rows of ``tokens_per_row``. Model states by ZeRO stage and offload (bf16
    mixed precision: 2 B weights and grads, 12 B fp32 master and Adam moments per parameter);
    activations as Korthikanti et al. (2022) count them with flash attention, 34 B per token per
    hidden unit per layer in half precision, or with gradient checkpointing only each layer's input
    plus one layer recomputed; the fp32 logits of the LM head (policy only)."""
    params = parameter_count(model_config)
    if params is None:
        return None
    h, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    n, stage, half = lc.num_ranks, lc.zero_stage, 2
    weight_bytes = 2 if lc.bf16 else 4
    optimizer_bytes = 12 if lc.bf16 else 8  # fp32 master (bf16 only) and two Adam moments
    tokens = lc.micro_batch_size * tokens_per_row
    per_layer = 34 * h * tokens * weight_bytes / half
    activations = (layers * 2 * h * tokens * weight_bytes / half + per_layer if lc.gradient_checkpointing
                   else layers * per_layer)
    return LearnerMemory(
        weights=0.0 if lc.offload_params else weight_bytes * params / (n if stage == 3 else 1),
        grads=weight_bytes * params / (n if stage >= 2 else 1),
        optimizer=0.0 if lc.offload_optimizer else optimizer_bytes * params / (n if stage >= 1 else 1),
        activations=activations,
        logits=4 * tokens * vocab if lm_head else 0.0)


# Left of a GPU's memory for the CUDA context, NCCL buffers, ZeRO-3 prefetch and fragmentation.
GPU_MEMORY_USABLE = 0.9


def learner_memory_problems(cfg, model_config: dict[str, Any]) -> list[Problem]:
    """Learner ranks whose training step cannot fit ``cluster.gpu_memory_gb`` (the config's GPU);
    nothing when that is 0 or the model's shape is unknown."""
    gpu_gb = cfg.cluster.gpu_memory_gb
    if gpu_gb <= 0:
        return []
    tokens = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens  # a PPO row's longest
    sections = [("policy", cfg.policy, True)]
    if cfg.uses_critic and not cfg.model.critic:  # a critic started from the policy has its shape
        sections.append(("critic", cfg.critic, False))
    problems: list[Problem] = []
    for name, lc, lm_head in sections:
        if lc.num_gpus <= 0:
            continue
        need = learner_memory(lc, model_config, tokens, lm_head)
        # A colocated engine's sleeping residue shares the policy's GPU during the training step.
        beside = SLEEPING_ENGINE_BYTES if name == "policy" and cfg.rollout.colocate else 0.0
        if need is None or need.total + beside <= GPU_MEMORY_USABLE * gpu_gb * 1e9:
            continue
        parts = ", ".join(f"{k} {getattr(need, k) / 1e9:.1f}" for k in ("weights", "grads", "optimizer",
                                                                         "activations", "logits"))
        fixes = [f"{name}.gradient_checkpointing=true" if not lc.gradient_checkpointing else "",
                 f"a smaller {name}.micro_batch_size" if lc.micro_batch_size > 1 else "",
                 f"{name}.offload_optimizer=true" if not lc.offload_optimizer and lc.zero_stage >= 1 else "",
                 f"more {name}.num_ranks" if lc.zero_stage >= 2 else ""]
        key = f"{name}.gradient_checkpointing" if not lc.gradient_checkpointing else f"{name}.micro_batch_size"
        message = (f"one {name} rank needs ~{need.total / 1e9:.0f} GB for a training step ({parts} GB, "
                   f"micro_batch_size {lc.micro_batch_size} x {tokens} tokens"
                   + (f"; + {beside / 1e9:.0f} GB of the sleeping colocated engine" if beside else "")
                   + ") but a GPU of "
                   f"cluster.gpu_memory_gb={gpu_gb:g} leaves ~{GPU_MEMORY_USABLE * gpu_gb:.0f} GB; "
                   f"try {', '.join(f for f in fixes if f)}")
        problems.append((key, message))
    return problems


# What a sleeping colocated vLLM engine keeps on its GPU while the learner trains (CUDA context,
# CUDA-graph pools, allocator slack; its weights are in host memory and its KV cache released): the
# 1-2 GB verl and OpenRLHF users report for vLLM's sleep level 1, taken at its upper end.
SLEEPING_ENGINE_BYTES = 2e9


def colocated_memory_problems(cfg, model_config: dict[str, Any]) -> list[Problem]:
    """``rollout.colocate`` on GPUs: while the engine generates, the learner rank beside it still
    holds its model states (weights, gradients, optimizer: only activations are freed), and vLLM
    takes ``rollout.gpu_memory_utilization`` of the whole GPU besides. (The training phase is
    checked by ``learner_memory_problems``, with the sleeping engine's residue added.)"""
    gpu_gb, ro, pol = cfg.cluster.gpu_memory_gb, cfg.rollout, cfg.policy
    if gpu_gb <= 0 or not ro.colocate or pol.num_gpus <= 0:
        return []
    need = learner_memory(pol, model_config, cfg.data.max_prompt_tokens + ro.max_new_tokens, True)
    if need is None:
        return []
    # The learner's two IPC slots stay allocated across phases (a bucket each).
    resident = need.weights + need.grads + need.optimizer + 2 * bucket_bytes(cfg)
    engine = ro.gpu_memory_utilization * gpu_gb * 1e9
    if resident + engine <= GPU_MEMORY_USABLE * gpu_gb * 1e9:
        return []
    room = max(0.0, GPU_MEMORY_USABLE * gpu_gb * 1e9 - resident) / (gpu_gb * 1e9)
    return [("rollout.gpu_memory_utilization",
             f"{ro.gpu_memory_utilization:g} of a {gpu_gb:g} GB GPU ({engine / 1e9:.0f} GB) for the colocated engine, "
             f"beside the {resident / 1e9:.0f} GB the policy rank keeps while it generates (weights "
             f"{need.weights / 1e9:.1f}, grads {need.grads / 1e9:.1f}, optimizer {need.optimizer / 1e9:.1f}, "
             f"weight-sync slots {2 * bucket_bytes(cfg) / 1e9:.1f} GB), "
             f"exceeds the ~{GPU_MEMORY_USABLE * gpu_gb:.0f} GB usable: "
             + (f"set it to at most {room:.2f}" if room >= 0.05 else "no share is left")
             + (", or policy.offload_optimizer=true" if not pol.offload_optimizer and pol.zero_stage >= 1 else "")
             + (", or more policy.num_ranks" if pol.zero_stage >= 1 else ""))]


# Of a scorer's GPUs, what a frozen model's weights may take (models/placement.py spreads them);
# the rest holds a micro-batch's activations and logits.
SCORER_WEIGHT_SHARE = 0.8


def reference_memory_problems(cfg, model_config: dict[str, Any]) -> list[Problem]:
    """A reference (the policy's shape, in ``model.dtype``) whose weights cannot fit the GPUs of
    its actor, ``scorers.num_gpus`` of them, spread layer by layer."""
    gpu_gb, sc = cfg.cluster.gpu_memory_gb, cfg.scorers
    params = parameter_count(model_config)
    if gpu_gb <= 0 or sc.num_gpus <= 0 or params is None:
        return []
    weights = params * _model_dtype_bytes(cfg)
    room = SCORER_WEIGHT_SHARE * sc.num_gpus * gpu_gb * 1e9
    if weights <= room:
        return []
    gpus = math.ceil(weights / (SCORER_WEIGHT_SHARE * gpu_gb * 1e9))
    return [("scorers.num_gpus",
             (f"{sc.num_gpus:g} GPU(s) of {gpu_gb:g} GB hold {room / 1e9:.0f} GB of frozen weights "
              f"({SCORER_WEIGHT_SHARE:g} of each; the rest is for activations) but the reference, the policy's shape "
              f"in {cfg.model.dtype}, has {weights / 1e9:.0f} GB: give each scorer at least {gpus} GPUs "
              f"(its layers are spread over them)"))]


def bucket_bytes(cfg) -> int:
    """The largest bucket a weight sync sends: ``sync.bucket_mb`` (larger tensors travel in parts)."""
    return cfg.sync.bucket_mb << 20


def largest_layer_elements(model_config: dict[str, Any]) -> int | None:
    """Elements of the largest layer vLLM loads as one: the embedding or LM head, the fused q/k/v
    projection, or the fused gate/up projection; None when the config lacks a field it needs."""
    h, vocab, inter, heads = (model_config.get(k) for k in ("hidden_size", "vocab_size", "intermediate_size",
                                                             "num_attention_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (h, vocab, inter, heads)):
        return None
    kv, head_dim = _attention_dims(model_config, h, heads)
    return max(vocab * h, h * (heads + 2 * kv) * head_dim, 2 * h * inter)


# The weight-sync communicator's own device buffers on an engine worker (NCCL_BUFFSIZE, 4 MiB per
# channel and direction, up to 32 channels), beside the receive buffers.
SYNC_COMMUNICATOR_BYTES = 0.3e9


def sync_receive_bytes(cfg, model_config: dict[str, Any]) -> float | None:
    """Device memory one engine worker needs outside vLLM's share to take a weight sync. Every
    tensor-parallel worker receives whole, unsharded buckets; vLLM's in-place reload keeps the
    tensors of a layer until the whole layer arrived, then builds the layer's shard before copying
    it into place; the next bucket is in flight meanwhile. So: the largest layer unsharded and
    its shard, two buckets, and the communicator's buffers."""
    elements = largest_layer_elements(model_config)
    if elements is None:
        return None
    layer = elements * _model_dtype_bytes(cfg)  # on the wire in the engine's dtype
    return layer * (1 + 1 / cfg.rollout.tensor_parallel_size) + 2 * bucket_bytes(cfg) + SYNC_COMMUNICATOR_BYTES


def sync_receive_problems(cfg, model_config: dict[str, Any]) -> list[Problem]:
    """Engines on their own GPUs whose ``rollout.gpu_memory_utilization`` leaves too little of the
    GPU to take a weight sync (vLLM's share is its own; what a sync receives lives outside it).
    Colocated engines receive while their KV cache sleeps, so the generate phase bounds them."""
    gpu_gb, ro = cfg.cluster.gpu_memory_gb, cfg.rollout
    if gpu_gb <= 0 or ro.colocate or ro.num_gpus <= 0:
        return []
    need = sync_receive_bytes(cfg, model_config)
    if need is None:
        return []
    engines_per_gpu = max(1, round(1 / ro.num_gpus))  # a fractional share: engines beside each other
    outside = (1 - ro.gpu_memory_utilization * engines_per_gpu) * gpu_gb * 1e9
    if engines_per_gpu * need <= outside:
        return []
    elements = largest_layer_elements(model_config)
    most = (1 - engines_per_gpu * need / (gpu_gb * 1e9)) / engines_per_gpu
    return [("rollout.gpu_memory_utilization",
             f"{ro.gpu_memory_utilization:g} of a {gpu_gb:g} GB GPU"
             + (f" for each of {engines_per_gpu} engines" if engines_per_gpu > 1 else "")
             + f" leaves {max(0.0, outside) / 1e9:.1f} GB outside vLLM, but an engine worker needs "
             f"~{need / 1e9:.1f} GB there to take a weight sync (its largest layer of {elements / 1e6:.0f}M "
             f"parameters unsharded and its shard, two sync.bucket_mb={cfg.sync.bucket_mb} buckets, "
             f"the sync group's buffers): "
             + (f"set it to at most {most:.2f}" if most >= 0.05 else "give each engine a whole GPU")
             + (" or a smaller sync.bucket_mb" if cfg.sync.bucket_mb > 64 else ""))]


# The config fields vLLM reads a model's context length from; the smallest present one wins.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                 "max_sequence_length", "model_max_length")


def model_context_length(model_config: dict[str, Any]) -> int | None:
    """Positions the model takes, as vLLM derives them (RoPE scaling's factor included, except
    for llama3 and longrope scaling, whose factor is already in the position count); None when
    the config names none."""
    lengths = [v for k in _CONTEXT_KEYS if isinstance(v := model_config.get(k), int) and v > 0]
    if not lengths:
        return None
    context = min(lengths)
    scaling = model_config.get("rope_scaling")
    scaled = isinstance(scaling, dict) and isinstance(scaling.get("factor"), int | float) and \
        scaling.get("rope_type", scaling.get("type")) not in ("llama3", "longrope", "su", "default", None)
    if scaled:
        context = int(context * scaling["factor"])
    return context


def read_model_config(path: str) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a local model folder (or of a hub name already in the local
    HF cache); None for names that can only be resolved over the network (and ``builtin:``)."""
    if not path or path.startswith("builtin:"):
        return None
    folder = Path(os.path.expanduser(path))
    candidate: Path | None = folder / "config.json" if folder.is_dir() else None
    if candidate is None and path.count("/") == 1 and not folder.exists():
        try:  # cheap and offline: only looks at the cache folder
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            candidate = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - no hub library or odd cache: simply unknown
            candidate = None
    if candidate is None or not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _gpu_key(a: RoleAsk) -> str:
    return {"rollout": "rollout.tensor_parallel_size"}.get(a.role, f"{a.role}.num_gpus")


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


__all__ = ["RoleAsk", "model_problems", "plan_problems", "read_model_config", "role_asks"]
