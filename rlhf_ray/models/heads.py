"""Value (critic) and reward models: a causal LM's backbone plus a linear head on hidden states.

Two folder formats load:

* transformers' sequence-classification format (``XForSequenceClassification`` in config.json,
  ``num_labels: 1``; the backbone under its usual prefix and the head as ``score.weight``): what
  Skywork-Reward, TRL's and OpenRLHF's reward trainers write, and what this project writes for
  reward models (their head has no bias), so ``AutoModelForSequenceClassification.from_pretrained``
  loads them as they are and gives the same scores.
* the project's own format: the backbone as an HF model folder, the head in ``head.safetensors``
  and its kind in ``head.json``. Critics (their head has a bias) are saved this way, and reward
  models from older folders load from it. Loading one kind's folder as the other kind is refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_ray.data.batch import position_ids_from_mask
from rlhf_ray.errors import BadInputError
from rlhf_ray.models.loading import (
    CONFIG_FILE,
    atomic_dir,
    check_model_path,
    load_backbone,
    load_config,
    load_sequence_classifier,
)
from rlhf_ray.models.lora import unwrap

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
SEQUENCE_CLASSIFIER = "ForSequenceClassification"  # the suffix of transformers' class names
SCORE_HEAD = "score"  # the attribute holding the head in transformers' decoder classifiers


def score_count(config: dict) -> int | None:
    """How many scores per sequence a sequence-classification checkpoint's head gives, counted as
    transformers counts them (``id2label``'s entries, else ``num_labels``, else its default 2), from
    its config.json as a dict; None when the config is not a sequence classifier's."""
    if not any(name.endswith(SEQUENCE_CLASSIFIER) for name in config.get("architectures") or []):
        return None
    if "id2label" in config:
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def check_score_head(path: str | os.PathLike) -> None:
    """Refuses a local sequence-classification folder whose head gives other than one score per
    sequence (a classifier, a multi-objective head), from its config.json alone."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        return  # a hub name: checked when it loads
    count = score_count(json.loads(config_file.read_text()))
    if count not in (None, 1):
        raise BadInputError(f"{config_file}: num_labels is {count} (id2label has {count} entries); a reward or "
                            f"value model needs a head with one output (num_labels: 1)")


class _HeadModel(nn.Module):
    """Backbone + ``Linear(hidden, 1)`` applied at every position."""

    kind: str  # set by subclasses, stored in head.json
    head_bias: bool  # whether a freshly initialised head has a bias

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            hidden = backbone.config.hidden_size
            head = nn.Linear(hidden, 1, bias=self.head_bias, dtype=backbone.dtype)
            # Small start so early values/rewards are near zero and do not swamp the first updates.
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
            if head.bias is not None:
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
    def from_base(cls, path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False):
        """The starting point of training: a checkpoint with a one-output head (either format,
        e.g. a reward model initialising a critic) brings its head; a causal LM gives its backbone
        (its LM head dropped) and a freshly initialised head."""
        path = check_model_path(path)
        if _has_project_head(path) or _is_sequence_classifier(path, trust_remote_code):
            backbone, head = _load_backbone_and_head(path, dtype, trust_remote_code)
            return cls(backbone, head)
        return cls(load_backbone(path, dtype, trust_remote_code))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32",
                        trust_remote_code: bool = False):
        """Loads a folder written by :meth:`save_pretrained` or a sequence-classification checkpoint
        (a reward model's format: loading it as a value model is refused)."""
        path = check_model_path(path)
        if _has_project_head(path):
            kind = json.loads((Path(path) / HEAD_CONFIG).read_text())["kind"]
        elif _is_sequence_classifier(path, trust_remote_code):
            kind = RewardModel.kind
        else:
            raise FileNotFoundError(f"{path!r} is not a {cls.kind} model: it has no {HEAD_CONFIG} and is not a "
                                    f"sequence-classification checkpoint (config.json architectures "
                                    f"*{SEQUENCE_CLASSIFIER})")
        if kind != cls.kind:
            raise ValueError(f"{path!r} holds a {kind} model, not a {cls.kind} model")
        return cls(*_load_backbone_and_head(path, dtype, trust_remote_code))

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                        tokenizer=None) -> None:
        """Writes the folder atomically: a bias-free head (every new reward model's) in the
        sequence-classification format, a head with a bias in the project's. ``state_dict``
        (full tensors, this module's names) replaces the module's own, e.g. when the weights
        were gathered from ZeRO-3 shards."""
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_sd = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                       if k.startswith("backbone.")}
        with atomic_dir(out_dir) as tmp:
            # A LoRA backbone saves as its base model (the caller passes merged weights).
            backbone = unwrap(self.backbone)
            if self.head.bias is None:
                classifier = _sequence_classifier(backbone, self.head)
                prefix = classifier.base_model_prefix
                classifier.save_pretrained(tmp, state_dict={**{f"{prefix}.{k}": v for k, v in backbone_sd.items()},
                                                            f"{SCORE_HEAD}.weight": state_dict["head.weight"]})
            else:
                backbone.save_pretrained(tmp, state_dict=backbone_sd)
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


def _has_project_head(path: str | os.PathLike) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def _is_sequence_classifier(path: str | os.PathLike, trust_remote_code: bool) -> bool:
    return score_count(load_config(path, trust_remote_code).to_dict()) is not None


def _load_backbone_and_head(path: str | os.PathLike, dtype: str | torch.dtype,
                            trust_remote_code: bool) -> tuple[nn.Module, nn.Linear]:
    """(backbone, one-output head) of a folder in either format."""
    if _has_project_head(path):
        head_sd = load_file(Path(path) / HEAD_WEIGHTS)
        backbone = load_backbone(path, dtype, trust_remote_code)
        head = nn.Linear(backbone.config.hidden_size, 1, bias="bias" in head_sd, dtype=backbone.dtype)
        head.load_state_dict(head_sd)
        return backbone, head
    check_score_head(path)
    classifier = load_sequence_classifier(path, dtype, trust_remote_code)
    head = getattr(classifier, SCORE_HEAD, None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise BadInputError(f"{str(path)!r}: {type(classifier).__name__} has no one-output linear head named "
                            f"{SCORE_HEAD!r} (num_labels {classifier.config.num_labels})")
    return classifier.base_model, head


def _sequence_classifier(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """transformers' sequence-classification model of ``backbone``'s architecture holding
    ``backbone`` and ``head`` themselves (its own layers made on the meta device: no copy)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = 1
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=backbone.dtype)
    setattr(classifier, classifier.base_model_prefix, backbone)
    setattr(classifier, SCORE_HEAD, head)
    return classifier


def save_head(model: _HeadModel, state_dict: dict, out_dir: str | os.PathLike) -> None:
    """Writes the head's weights (the ``head.`` entries of ``state_dict``) and kind into ``out_dir``."""
    head_sd = {k.removeprefix("head."): v.detach().contiguous().cpu()
               for k, v in state_dict.items() if k.startswith("head.")}
    save_file(head_sd, Path(out_dir) / HEAD_WEIGHTS)
    (Path(out_dir) / HEAD_CONFIG).write_text(json.dumps({"kind": model.kind}))


class ValueModel(_HeadModel):
    """Critic: a value per token, ``forward(...) -> [B, L]``."""

    kind = "value"
    head_bias = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_scores(input_ids, attention_mask, position_ids)


class RewardModel(_HeadModel):
    """Scalar reward per sequence, read at its last real token: ``forward(...) -> [B]``. This is
    what transformers' ``XForSequenceClassification`` returns as ``logits`` for rows without pad
    tokens inside them (it finds the last token that is not ``config.pad_token_id``)."""

    kind = "reward"
    # No bias: the Bradley-Terry loss sees only score differences, so a bias never moves from its
    # start, and transformers' decoder classifiers have none (the folder loads there as it is).
    head_bias = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.token_scores(input_ids, attention_mask, position_ids)
        # Position of the last 1 in each mask row: right for left, right or no padding.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)
        return scores.gather(1, last[:, None]).squeeze(1)
