"""LoRA on the tiny model in one process: what trains, and the merged weights under base names
(the distributed side, ZeRO-3 gathers and saving, is in test_deepspeed_strategy.py)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.models.heads import ValueModel
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.lora import LoraSettings, apply_lora, exported_tensors, is_lora

SETTINGS = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "up_proj"))


def _train_adapters(model: torch.nn.Module) -> None:
    """Stands in for training: LoRA's B starts at zero, so the adapters would add nothing yet."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)


def _exported(model) -> dict[str, torch.Tensor]:
    return {t.name: t.value().clone() for t in exported_tensors(model)}


def test_causal_lm_exports_merged_weights_under_base_names(tiny_model_dir):
    base = load_causal_lm(tiny_model_dir)
    names = [n for n, _ in base.named_parameters()]
    model = apply_lora(load_causal_lm(tiny_model_dir), SETTINGS)
    assert is_lora(model) and not is_lora(base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _train_adapters(model)
    exported = _exported(model)
    assert list(exported) == names  # same names, same order (the sync manifest's order)
    reference = model.merge_and_unload().state_dict()  # peft's own merge
    for name, tensor in exported.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name
    changed = {n for n in names if not torch.equal(exported[n], base.state_dict()[n])}
    assert changed == {n for n in names if n.endswith(("q_proj.weight", "up_proj.weight"))}


def test_value_model_lora_keeps_its_head_trainable_and_its_names(tiny_model_dir):
    plain = ValueModel.from_base(tiny_model_dir)
    model = apply_lora(ValueModel.from_base(tiny_model_dir), SETTINGS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".lora_" in n for n in trainable)
    _train_adapters(model)
    exported = _exported(model)
    assert list(exported) == [n for n, _ in plain.named_parameters()]
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    plain.load_state_dict(exported)  # the merged weights in a plain model compute what LoRA computes
    with torch.no_grad():
        assert torch.allclose(plain(ids, mask), model(ids, mask), atol=1e-5)


def test_lora_config_is_off_by_default_and_checked():
    from rlhf_ray.actors.placement import lora_settings

    cfg = load_config(None, [])
    assert cfg.policy.lora.rank == 0 and lora_settings(cfg.policy.lora) is None
    assert not cfg.policy.gradient_checkpointing
    cfg = load_config(None, ["policy.lora.rank=8", "policy.lora.target_modules=[q_proj, v_proj]",
                             "critic.lora.rank=4"])
    assert lora_settings(cfg.policy.lora) == LoraSettings(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    for bad, key in (("policy.lora.rank=-1", "policy.lora.rank"), ("critic.lora.alpha=0", "critic.lora.alpha"),
                     ("policy.lora.dropout=1.0", "policy.lora.dropout"),
                     ("critic.offload_optimizer=true", "critic.offload_optimizer")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad, "critic.zero_stage=0"])
