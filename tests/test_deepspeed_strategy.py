"""DeepSpeedStrategy across 2 Ray actors on the tiny causal LM: ZeRO stages 0-3 and the memory
savers (bf16, ZeRO-3 with CPU offload, gradient checkpointing, LoRA), each shown to train."""

from __future__ import annotations

import hashlib
import math
import socket
import sys

import pytest

from rlhf_ray.engines.deepspeed_strategy import DeepSpeedStrategy

pytestmark = pytest.mark.slow

WORLD = 2
TEXTS = ["1+1=2", "2+2=4", "3*3=9", "10-4=6", "7+8=15", "6/2=3", "9-9=0", "5*5=25"]
PROBE = ["4+4=8", "12+1=13"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardEverything(DeepSpeedStrategy):
    """ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default, which is all of
    the tiny model's: shard them all so the gather path is exercised."""

    def ds_config(self) -> dict:
        config = super().ds_config()
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config


class Learner:
    """One rank. The process group is set up once; each stage builds a fresh engine."""

    def __init__(self, rank: int, master_port: int):
        import torch

        torch.set_num_threads(1)
        self.group = (rank, WORLD, "127.0.0.1", master_port)
        DeepSpeedStrategy().init_distributed(*self.group)

    def _strategy(self, zero_stage: int, lr: float, **settings) -> DeepSpeedStrategy:
        strategy = ShardEverything(zero_stage=zero_stage, lr=lr,
                                   micro_batch_size=len(TEXTS) // WORLD, seed=0, **settings)
        strategy.init_distributed(*self.group)  # already joined: re-seeds only
        return strategy

    def _inputs(self, tokenizer, texts: list[str] | None = None) -> dict:
        """``texts``, or this rank's share of TEXTS, right-padded."""
        if texts is None:
            per_rank = len(TEXTS) // WORLD
            texts = TEXTS[self.group[0] * per_rank:(self.group[0] + 1) * per_rank]
        return dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="right"))

    def train(self, settings: dict, model_dir: str, out_dir: str, steps: int) -> dict:
        """``steps`` optimizer steps under ``settings`` (DeepSpeedStrategy fields), then the full
        weights, a save and, for LoRA, the adapter and a resumable checkpoint read back."""
        import torch

        from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

        settings = dict(settings)
        strategy = self._strategy(settings.pop("zero_stage"), lr=settings.pop("lr", 2e-3), **settings)
        tokenizer = load_tokenizer(model_dir)
        with strategy.model_init():
            model = load_causal_lm(model_dir)
        held_at_build = sum(p.data.numel() for p in model.parameters())  # before DeepSpeed's engine exists
        engine = strategy.prepare(model)
        inputs = self._inputs(tokenizer)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        # Forward runs of the first decoder layer: gradient checkpointing reruns it in backward.
        layer_calls = []
        next(m for n, m in engine.module.named_modules() if n.endswith("layers.0")).register_forward_pre_hook(
            lambda *_: layer_calls.append(1))
        engine.train()  # HF models load in eval mode, where checkpointing is off
        losses = []
        for _ in range(steps):
            loss = engine(**inputs, labels=labels).loss
            strategy.backward(loss, engine)
            strategy.step(engine)
            losses.append(strategy.all_reduce_mean({"loss": loss.item()})["loss"])
        layer_calls_per_step = len(layer_calls) / steps

        # Elements this rank holds of each parameter outside a gather.
        held = sum(p.data.numel() for p in engine.module.parameters())
        trainable = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
        digest = hashlib.sha256()
        shapes, unchanged = {}, []
        base = load_causal_lm(model_dir).state_dict()
        for name, tensor in strategy.full_named_parameters(engine):
            digest.update(name.encode() + tensor.float().contiguous().numpy().tobytes())
            shapes[name] = tuple(tensor.shape)
            if torch.equal(tensor.float(), base[name]):
                unchanged.append(name)
        specs = [(name, tuple(shape)) for name, _, shape in strategy.weight_specs(engine)]

        probe = self._inputs(tokenizer, PROBE)
        engine.eval()
        with torch.no_grad():
            logits = engine(**probe).logits.float()  # under ZeRO-3 a collective: every rank runs it
        strategy.save_hf(engine, tokenizer, out_dir)
        result = {"losses": losses, "digest": digest.hexdigest(), "shapes": shapes, "held": held,
                  "held_at_build": held_at_build,
                  "specs": specs, "trainable": trainable, "unchanged": unchanged,
                  "layer_calls_per_step": layer_calls_per_step,
                  "param_dtype": str(next(engine.module.parameters()).dtype)}
        if strategy.lora is not None:
            strategy.save_checkpoint(engine, f"{out_dir}-ckpt")
            resumed = strategy.prepare(load_causal_lm(model_dir))
            strategy.load_checkpoint(resumed, f"{out_dir}-ckpt")
            resumed.eval()
            with torch.no_grad():
                result["resumed_logit_diff"] = (resumed(**probe).logits - logits).abs().max().item()
            resumed.destroy()
        if self.group[0] == 0:
            with torch.no_grad():
                saved_logits = load_causal_lm(out_dir).eval()(**probe).logits
                result["saved_logit_diff"] = (saved_logits - logits).abs().max().item()
                if strategy.lora is not None:
                    from peft import PeftModel

                    adapted = PeftModel.from_pretrained(load_causal_lm(model_dir), f"{out_dir}/adapter").eval()
                    result["adapter_logit_diff"] = (adapted(**probe).logits - logits).abs().max().item()
            load_tokenizer(out_dir)
        engine.destroy()
        return result

    def train_value_model(self, model_dir: str, out_dir: str, lora=None) -> dict:
        """Two ZeRO-3 steps of a value model towards 1.0, then save_hf and reload."""
        import torch

        from rlhf_ray.models.heads import ValueModel
        from rlhf_ray.models.loading import load_tokenizer

        strategy = self._strategy(3, lr=1e-4 if lora is None else 1e-2, lora=lora)
        tokenizer = load_tokenizer(model_dir)
        engine = strategy.prepare(ValueModel.from_base(model_dir))
        inputs = self._inputs(tokenizer)
        mask = inputs["attention_mask"]
        losses = []
        for _ in range(2):
            loss = (((engine(**inputs) - 1.0) ** 2) * mask).sum() / mask.sum()
            strategy.backward(loss, engine)
            strategy.step(engine)
            losses.append(loss.item())
        probe = self._inputs(tokenizer, PROBE)
        engine.eval()
        with torch.no_grad():
            values = engine(**probe)
        strategy.save_hf(engine, tokenizer, out_dir)
        saved_value_diff = None
        if self.group[0] == 0:
            with torch.no_grad():
                saved_values = ValueModel.from_pretrained(out_dir).eval()(**probe)
            saved_value_diff = (saved_values - values).abs().max().item()
        trainable = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
        engine.destroy()
        return {"losses": losses, "saved_value_diff": saved_value_diff, "trainable": trainable}


@pytest.fixture(scope="module")
def learners(ray_session):
    ray = ray_session
    # Ray workers cannot import test modules by name: ship this module's code by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(num_cpus=0.5)(Learner)
    port = _free_port()
    group = [actor.remote(rank, port) for rank in range(WORLD)]
    yield group
    for handle in group:
        ray.kill(handle)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_zero_stage_trains_syncs_and_saves(ray_session, learners, tiny_model_dir, tmp_path,
                                          zero_stage):
    from rlhf_ray.models.loading import load_causal_lm

    out_dir = str(tmp_path / "saved")
    results = ray_session.get([a.train.remote({"zero_stage": zero_stage}, tiny_model_dir, out_dir, 4)
                               for a in learners])

    losses = results[0]["losses"]
    assert losses == results[1]["losses"]  # all_reduce_mean agrees on every rank
    assert losses[-1] < losses[0] - 0.3, losses
    assert results[0]["digest"] == results[1]["digest"]
    hf_shapes = {k: tuple(v.shape) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
    assert results[0]["shapes"] == hf_shapes
    assert results[0]["saved_logit_diff"] < 1e-5
    total = sum(math.prod(shape) for shape in hf_shapes.values())
    assert all(r["held"] == (0 if zero_stage == 3 else total) for r in results)
    # ZeRO-3 loads each rank's shard straight from the checkpoint: no rank ever held the whole model.
    assert all(r["held_at_build"] == (0 if zero_stage == 3 else total) for r in results)


def test_config_validation_and_cpu_optimizer():
    with pytest.raises(ValueError, match="offload_params"):
        DeepSpeedStrategy(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer"):
        DeepSpeedStrategy(zero_stage=0, offload_optimizer=True)
    cfg = DeepSpeedStrategy(zero_stage=3, offload_optimizer=True, backend="cpu",
                            micro_batch_size=2, grad_accum_steps=3).ds_config()
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 3)


def test_value_model_under_zero3_saves_in_head_format(ray_session, learners, tiny_model_dir,
                                                      tmp_path):
    out_dir = str(tmp_path / "critic")
    results = ray_session.get([a.train_value_model.remote(tiny_model_dir, out_dir)
                               for a in learners])
    for r in results:
        assert r["losses"][1] < r["losses"][0]
    assert results[0]["saved_value_diff"] < 1e-5


def _train(ray_session, learners, model_dir, out_dir, steps=4, **settings) -> list[dict]:
    return ray_session.get([a.train.remote(settings, model_dir, str(out_dir), steps) for a in learners])


def _assert_trains(results: list[dict], min_drop: float) -> None:
    losses = results[0]["losses"]
    assert losses == results[1]["losses"]
    assert losses[-1] < losses[0] - min_drop, losses
    assert results[0]["digest"] == results[1]["digest"]


def test_bf16_mixed_precision_trains(ray_session, learners, tiny_model_dir, tmp_path):
    results = _train(ray_session, learners, tiny_model_dir, tmp_path / "bf16", zero_stage=2, bf16=True)
    assert results[0]["param_dtype"] == "torch.bfloat16"  # the module computes in bf16
    _assert_trains(results, 0.3)
    assert results[0]["unchanged"] == []


def test_zero3_with_cpu_offload_of_optimizer_and_params_trains(ray_session, learners, tiny_model_dir,
                                                               tmp_path):
    results = _train(ray_session, learners, tiny_model_dir, tmp_path / "offload", zero_stage=3,
                     offload_optimizer=True, offload_params=True)
    _assert_trains(results, 0.3)
    assert all(r["held"] == 0 for r in results)  # sharded to nothing outside a gather
    assert results[0]["unchanged"] == []
    assert results[0]["saved_logit_diff"] < 1e-5


def test_gradient_checkpointing_recomputes_and_trains(ray_session, learners, tiny_model_dir, tmp_path):
    results = _train(ray_session, learners, tiny_model_dir, tmp_path / "gc", zero_stage=2,
                     gradient_checkpointing=True)
    assert results[0]["layer_calls_per_step"] == 2  # the forward, and its rerun in backward
    _assert_trains(results, 0.3)
    assert results[0]["saved_logit_diff"] < 1e-5


def test_lora_under_zero3_trains_adapters_and_exports_merged_base_weights(ray_session, learners,
                                                                         tiny_model_dir, tmp_path):
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.models.lora import LoraSettings

    out_dir = tmp_path / "lora"
    results = _train(ray_session, learners, tiny_model_dir, out_dir, zero_stage=3, lr=2e-2,
                     gradient_checkpointing=True, lora=LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    _assert_trains(results, 0.3)
    r = results[0]
    assert r["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in r["trainable"])
    assert len(r["trainable"]) == 2 * 3 * 2  # A and B of 3 modules in each of 2 layers
    # Exported under the base model's names and shapes, the sync manifest's order included.
    hf_shapes = {k: tuple(v.shape) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
    assert r["shapes"] == hf_shapes
    assert r["specs"] == list(r["shapes"].items())
    # Adapted weights carry the update merged in; every other weight is the frozen base.
    adapted = {n for n in hf_shapes if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    assert set(r["unchanged"]) == set(hf_shapes) - adapted
    assert r["layer_calls_per_step"] == 2
    # The merged HF folder, the peft adapter and the resumable checkpoint all give the same model.
    assert r["saved_logit_diff"] < 1e-4
    assert r["adapter_logit_diff"] < 1e-4
    assert all(x["resumed_logit_diff"] < 1e-6 for x in results)
    assert (out_dir / "adapter" / "adapter_model.safetensors").exists()


def test_critic_lora_keeps_the_value_head_trainable(ray_session, learners, tiny_model_dir, tmp_path):
    from rlhf_ray.models.lora import LoraSettings

    out_dir = tmp_path / "critic-lora"
    results = ray_session.get([a.train_value_model.remote(tiny_model_dir, str(out_dir), LoraSettings(rank=4, alpha=8))
                               for a in learners])
    for r in results:
        assert r["losses"][1] < r["losses"][0]
    trainable = results[0]["trainable"]
    assert {"head.weight", "head.bias"} <= set(trainable)
    assert all(n.startswith("head.") or ".lora_" in n for n in trainable)
    assert results[0]["saved_value_diff"] < 1e-4
    assert {p.name for p in (out_dir / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                 "head.safetensors"}
