"""Where a frozen scorer's layers live: on its actor's one GPU, or spread over the several it holds.

A 70B reference (141 GB in bf16) cannot sit on one 80 GB GPU. Its actor holds ``scorers.num_gpus``
GPUs; the model is split into contiguous runs of whole decoder layers, one run per GPU, balanced by
bytes (accelerate's device map, as ``from_pretrained(device_map="balanced")`` does), and each
forward pass walks the GPUs in turn. Frozen models need no gradients or optimizer, so this naive
pipeline costs only the idle GPUs' time, and nothing of the learners' ZeRO machinery.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlhf_ray.config.cluster_fit import SCORER_WEIGHT_SHARE
from rlhf_ray.errors import BadInputError


def no_split_classes(model: nn.Module) -> list[str]:
    """The module classes a device map must keep whole (a decoder layer's residual stream cannot
    cross GPUs mid-layer): transformers names them per architecture in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return sorted(names)


def spread_device_map(model: nn.Module, gpu_bytes: Sequence[int], what: str) -> dict[str, int]:
    """Module name -> GPU index: contiguous runs of whole layers over ``len(gpu_bytes)`` GPUs, each
    run within its GPU's ``gpu_bytes``, balanced so every GPU takes a share. ``model`` may live on
    the ``meta`` device (the plan needs shapes, not weights). Raises, naming ``what`` and the
    sizes, when the model does not fit."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = no_split_classes(model)
    budget = {i: int(b) for i, b in enumerate(gpu_bytes)}
    balanced = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    if any(not isinstance(device, int) for device in device_map.values()):
        # The balanced budget leaves room for the largest layer on each GPU; give it all before refusing.
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    spilled = [name for name, device in device_map.items() if not isinstance(device, int)]
    if spilled:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        raise BadInputError(f"{what} ({size / 1e9:.1f} GB of weights) does not fit the {len(gpu_bytes)} GPU(s) of its "
                            f"actor ({sum(gpu_bytes) / 1e9:.1f} GB for weights; {spilled[0]!r} and "
                            f"{len(spilled) - 1} more modules left over): raise scorers.num_gpus")
    return device_map


def place_frozen(model: nn.Module, device: torch.device, what: str) -> nn.Module:
    """``model`` (frozen, loaded in host memory) on this actor's accelerator: whole on ``device``
    with one GPU (or none), spread over all of them by :func:`spread_device_map` with several.
    Batches then go to the first GPU (the embedding's) and come out of the last."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return model.to(device)
    from accelerate import dispatch_model

    # Of each GPU's free memory, weights take a share; the rest holds a micro-batch's activations
    # and logits (an fp32 logit row of a 128k vocabulary is 0.5 MB per token).
    free = [int(torch.cuda.mem_get_info(i)[0] * SCORER_WEIGHT_SHARE) for i in range(gpus)]
    return dispatch_model(model, spread_device_map(model, free, what))
