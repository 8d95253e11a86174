"""Frozen scorers on the GPUs of their actor: the 70B reference spread over 4 GPUs, planned on the
``meta`` device (shapes only, no weights, no GPU)."""

from collections import Counter

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

from rlhf_ray.errors import BadInputError
from rlhf_ray.models.heads import RewardModel
from rlhf_ray.models.placement import place_frozen, spread_device_map

# Llama-3.3-70B's shape (configs/llama70b_zero3_offload_ppo.yaml: reference on scorers.num_gpus=4).
LLAMA_70B = LlamaConfig(num_attention_heads=64, num_key_value_heads=8, hidden_size=8192, num_hidden_layers=80,
                        vocab_size=128256, intermediate_size=28672)
H100 = 80e9


def meta(build):
    with torch.device("meta"):
        return build()


def bytes_on(model: nn.Module, device_map: dict[str, int]) -> Counter:
    per_gpu: Counter = Counter()
    for name, device in device_map.items():
        module = model.get_submodule(name)
        per_gpu[device] += sum(p.numel() * p.element_size() for p in module.parameters())
    return per_gpu


def test_the_70b_reference_is_spread_over_its_four_gpus_in_whole_balanced_layers():
    model = meta(lambda: AutoModelForCausalLM.from_config(LLAMA_70B, dtype=torch.bfloat16))
    device_map = spread_device_map(model, [int(0.8 * H100)] * 4, "the reference model")
    assert set(device_map.values()) == {0, 1, 2, 3}  # nothing left on the host or disk
    layers = [device_map[f"model.layers.{i}"] for i in range(80)]  # whole layers, none split
    assert layers == sorted(layers)  # contiguous runs: one pass walks the GPUs once, in order
    assert max(Counter(layers).values()) - min(Counter(layers).values()) <= 3
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 3
    per_gpu = bytes_on(model, device_map)
    assert sum(per_gpu.values()) == pytest.approx(141.1e9, rel=0.01)
    assert all(30e9 < b < 40e9 for b in per_gpu.values()), per_gpu  # ~35 GB each, as the config says


def test_a_reward_model_keeps_its_head_beside_the_last_layer():
    def build():
        backbone = AutoModel.from_config(LLAMA_70B, dtype=torch.bfloat16)
        return RewardModel(backbone, nn.Linear(8192, 1, bias=False, dtype=torch.bfloat16))

    model = meta(build)
    device_map = spread_device_map(model, [int(0.8 * H100)] * 4, "the reward model")
    assert device_map["backbone.embed_tokens"] == 0
    assert device_map["head"] == device_map["backbone.norm"] == device_map["backbone.layers.79"] == 3


def test_a_tied_lm_head_stays_on_the_gpu_of_the_embedding_it_shares():
    """Qwen2.5-3B's shape, tied: one tensor cannot live on two GPUs, so the head goes where the
    embedding is (the pass comes back to the first GPU for the logits)."""
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                         intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True)
    model = meta(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    device_map = spread_device_map(model, [4_000_000_000] * 2, "the reference model")
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == 0
    assert device_map["model.layers.35"] == 1


def test_a_model_that_does_not_fit_its_gpus_is_refused_naming_the_key():
    model = meta(lambda: AutoModelForCausalLM.from_config(LLAMA_70B, dtype=torch.bfloat16))
    with pytest.raises(BadInputError, match=r"the reference model \(141.\d GB of weights\) does not fit the 2 GPU\(s\) "
                                            r"of its actor \(128.0 GB for weights; .*raise scorers.num_gpus"):
        spread_device_map(model, [int(0.8 * H100)] * 2, "the reference model")


def test_without_several_gpus_the_model_stays_whole_on_the_actors_device(tiny_model_dir):
    from rlhf_ray.models.loading import load_causal_lm

    model = place_frozen(load_causal_lm(tiny_model_dir).eval(), torch.device("cpu"), "the reference model")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not hasattr(model, "hf_device_map")  # not dispatched: no hooks moving tensors around
