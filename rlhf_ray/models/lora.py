"""LoRA adapters through peft, and the model's weights as the base model names them.

A LoRA model trains only its adapters (and a value/reward head); everything that leaves the
learner (weight sync into vLLM, the HF save) is the MERGED weight ``W + scaling * B @ A`` under
the base model's parameter names, so readers need no LoRA support at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_DIR = "adapter"  # the peft adapter's folder inside a saved model folder
ADAPTER_NAME = "default"  # peft's name of the one adapter we train
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names


@dataclass(frozen=True)
class LoraSettings:
    """Plain values of a LoRA adapter (rlhf_ray.config's LoraConfig)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: every linear layer but the LM head
    save_merged: bool = True  # HF saves also write the merged model, not only the adapter


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adds LoRA adapters and freezes everything else. A causal LM becomes a ``PeftModel``; a
    head model (value/reward) gets adapters on its backbone and keeps its head trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules) or "all-linear", bias="none")
    if hasattr(model, "add_lora"):  # a head model (rlhf_ray.models.heads) adapts its backbone itself
        model.add_lora(config)
        return model
    return get_peft_model(model, config)


def missing_target_modules(model_path: str, targets: list[str], trust_remote_code: bool = False
                           ) -> tuple[list[str], list[str]]:
    """(the ``targets`` that name no module of the model, the names of its linear layers), read
    from a skeleton of the model on the meta device: no weight is loaded. peft matches a target
    against a module's full name or its last parts, as here; GPT-2's linear layers are ``Conv1D``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, nn.Linear | Conv1D)})
    return missing, linear


def is_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def base_name(name: str) -> str:
    """A LoRA model's parameter/buffer name -> the name the base model gives the same tensor."""
    return name.replace(_PEFT_PREFIX, "", 1).replace(".base_layer.", ".")


def unwrap(model: nn.Module) -> nn.Module:
    """The model peft wrapped (itself for a plain model); its ``save_pretrained`` writes HF folders."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


@dataclass
class ExportedTensor:
    """One tensor of the base model's naming: the parameters it is computed from (to gather
    under ZeRO-3 first) and how to compute it once they are whole."""

    name: str
    params: list[nn.Parameter]
    value: Callable[[], torch.Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        param = self.params[0]
        return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 holds a shard; ds_shape is whole

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


def exported_tensors(model: nn.Module) -> Iterator[ExportedTensor]:
    """The model's parameters as the base model would have them, in ``named_parameters`` order:
    adapters are folded into their base weights and not listed themselves. For a model without
    LoRA, exactly its named parameters."""
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        if owner.endswith(".base_layer") and leaf == "weight":
            layer = modules[layer_name]
            adapter = [p for n, p in layer.named_parameters() if n.startswith("lora_")]
            yield ExportedTensor(base_name(name), [param, *adapter], _merged(param, layer))
        else:
            yield ExportedTensor(base_name(name), [param], _plain(param))


def _plain(param: nn.Parameter) -> Callable[[], torch.Tensor]:
    return lambda: param.data


def _merged(weight: nn.Parameter, layer) -> Callable[[], torch.Tensor]:
    @torch.no_grad()  # a value to send or save, not part of any graph
    def value() -> torch.Tensor:
        return weight.data + layer.get_delta_weight(ADAPTER_NAME).to(weight.dtype)

    return value


def save_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> None:
    """Writes the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).
    ``state_dict`` holds full tensors under ``model``'s names (gathered from ZeRO-3 shards); a
    head model writes its own (its backbone's adapter and its head)."""
    if hasattr(model, "save_adapter"):
        model.save_adapter(state_dict, out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict)
