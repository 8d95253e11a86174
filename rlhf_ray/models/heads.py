"""Value (critic) and reward models: a causal LM's backbone plus a linear head on hidden states.

Saved as a folder: the backbone as an HF model folder, the head in ``head.safetensors`` and its
kind in ``head.json``. Loading one kind's folder as the other kind is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_ray.data.batch import position_ids_from_mask
from rlhf_ray.models.loading import atomic_dir, check_model_path, load_backbone
from rlhf_ray.models.lora import unwrap

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


class _HeadModel(nn.Module):
    """Backbone + ``Linear(hidden, 1)`` applied at every position."""

    kind: str  # set by subclasses, stored in head.json

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            hidden = backbone.config.hidden_size
            head = nn.Linear(hidden, 1, dtype=backbone.dtype)
            # Small start so early values/rewards are near zero and do not swamp the first updates.
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(head.bias)
        self.head = head

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Head output at every position, ``[B, L]``."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1)

    @classmethod
    def from_base(cls, causal_lm_path: str | os.PathLike, dtype: str = "float32",
                  trust_remote_code: bool = False):
        """Backbone from a causal LM checkpoint (its LM head dropped), freshly initialised head."""
        return cls(load_backbone(causal_lm_path, dtype, trust_remote_code))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32",
                        trust_remote_code: bool = False):
        """Loads a folder written by :meth:`save_pretrained`."""
        path = Path(check_model_path(path))
        config_file = path / HEAD_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {HEAD_CONFIG}: not a {cls.kind} model")
        kind = json.loads(config_file.read_text())["kind"]
        if kind != cls.kind:
            raise ValueError(f"{str(path)!r} holds a {kind} model, not a {cls.kind} model")
        model = cls(load_backbone(path, dtype, trust_remote_code))
        model.head.load_state_dict(load_file(path / HEAD_WEIGHTS))
        return model

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                        tokenizer=None) -> None:
        """Writes the folder atomically. ``state_dict`` (full tensors, this module's names)
        replaces the module's own, e.g. when the weights were gathered from ZeRO-3 shards."""
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_sd = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                       if k.startswith("backbone.")}
        with atomic_dir(out_dir) as tmp:
            # A LoRA backbone saves as its base model (the caller passes merged weights).
            unwrap(self.backbone).save_pretrained(tmp, state_dict=backbone_sd)
            save_head(self, state_dict, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


    def add_lora(self, peft_config) -> None:
        """LoRA adapters on the backbone; the head stays whole and trainable."""
        from peft import get_peft_model

        self.backbone = get_peft_model(self.backbone, peft_config)

    def save_adapter(self, state_dict: dict, out_dir: str | os.PathLike) -> None:
        """The backbone's adapter in peft's format, beside this head (full tensors, this module's names)."""
        self.backbone.save_pretrained(out_dir, state_dict={k.removeprefix("backbone."): v for k, v in
                                                           state_dict.items() if k.startswith("backbone.")})
        save_head(self, state_dict, out_dir)


def save_head(model: _HeadModel, state_dict: dict, out_dir: str | os.PathLike) -> None:
    """Writes the head's weights (the ``head.`` entries of ``state_dict``) and kind into ``out_dir``."""
    head_sd = {k.removeprefix("head."): v.detach().contiguous().cpu()
               for k, v in state_dict.items() if k.startswith("head.")}
    save_file(head_sd, Path(out_dir) / HEAD_WEIGHTS)
    (Path(out_dir) / HEAD_CONFIG).write_text(json.dumps({"kind": model.kind}))


class ValueModel(_HeadModel):
    """Critic: a value per token, ``forward(...) -> [B, L]``."""

    kind = "value"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_scores(input_ids, attention_mask, position_ids)


class RewardModel(_HeadModel):
    """Scalar reward per sequence, read at its last real token: ``forward(...) -> [B]``."""

    kind = "reward"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.token_scores(input_ids, attention_mask, position_ids)
        # Position of the last 1 in each mask row: right for left, right or no padding.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)
        return scores.gather(1, last[:, None]).squeeze(1)
