"""The checkpoints users bring: tiny random-weight models of each architecture in the matrix,
built offline with transformers' own config classes, and the learner -> vLLM weight sync on
each (``rlhf-ray check-sync``: real vLLM, two syncs, parity after each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_ray.models.tiny import ARCHITECTURES, build_tiny_architecture

TIED = {"llama-tied", "qwen2", "qwen3", "gemma", "gpt2"}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: str(build_tiny_architecture(root / arch, arch)) for arch in ARCHITECTURES}


def test_matrix_builds_each_architecture_with_its_traits(arch_dirs):
    from transformers import AutoModelForCausalLM

    assert TIED < set(ARCHITECTURES) and {"llama", "mistral", "phi3", "olmo"} <= set(ARCHITECTURES)
    for arch, path in arch_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (arch in TIED), arch
        names = {n for n, _ in model.named_parameters()}
        if arch == "qwen2":
            assert any(n.endswith("q_proj.bias") for n in names)
        if arch == "qwen3":
            assert any(n.endswith("q_norm.weight") for n in names)
        if arch == "phi3":
            assert any(n.endswith("qkv_proj.weight") for n in names)
            assert any(n.endswith("gate_up_proj.weight") for n in names)
        if arch == "gpt2":
            assert "transformer.wpe.weight" in names  # learned positions
        assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(path))
        # Deterministic: a second build of the same spec is reused, not rebuilt differently.
        first = next(iter(model.state_dict().values())).clone()
        again = AutoModelForCausalLM.from_pretrained(build_tiny_architecture(path, arch))
        assert torch.equal(first, next(iter(again.state_dict().values())))


# Attention projections as each architecture names them (what users write in lora.target_modules).
ATTENTION = {"phi3": ["qkv_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}


def test_lora_targets_are_checked_against_each_architectures_modules(arch_dirs):
    """On a meta-device skeleton (no weights read): Llama-style names fit every architecture but
    Phi-3 (fused qkv) and GPT-2 (Conv1D c_attn), which are refused naming their own layers."""
    from rlhf_ray.models.lora import missing_target_modules

    for arch, path in arch_dirs.items():
        missing, linear = missing_target_modules(path, ["q_proj", "v_proj"])
        assert missing == ([] if arch not in ATTENTION else ["q_proj", "v_proj"]), arch
        assert missing_target_modules(path, ATTENTION.get(arch, ["q_proj", "o_proj"]))[0] == [], arch
        assert set(ATTENTION.get(arch, ["q_proj", "o_proj"])) <= set(linear), (arch, linear)


def test_a_lora_target_the_model_lacks_stops_the_stage_before_ray(arch_dirs, tmp_path, capsys, monkeypatch):
    from rlhf_ray.cli import main
    from rlhf_ray.stages import sft

    monkeypatch.setattr(sft, "begin", lambda *a: pytest.fail("bad input was not caught before Ray started"))
    argv = ["sft", f"run_dir={tmp_path}", f"model.policy={arch_dirs['gpt2']}", "policy.lora.rank=4",
            "policy.lora.target_modules=[q_proj, v_proj]", "data.max_prompt_tokens=32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-ray: policy.lora.target_modules: q_proj, v_proj name no module of ") and \
        "its linear layers: c_attn, c_fc, c_proj" in err, err


def test_unknown_architecture_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'bloom'.*gemma"):
        build_tiny_architecture(tmp_path / "x", "bloom")


@pytest.mark.slow
def test_weight_sync_keeps_parity_on_every_architecture(arch_dirs):
    """One process checks every checkpoint in turn. Before the fix, each tied model (Llama-3.2
    style, Qwen2/3, Gemma, GPT-2) kept scoring with its first LM head after a sync on CPU."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "check-sync", *arch_dirs.values()],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    reports = {r["model"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert len(reports) == len(arch_dirs), out.stderr[-3000:]
    for arch, path in arch_dirs.items():
        r = reports[path]
        assert r["tied_embeddings"] == (arch in TIED), arch
        assert r["gap_before"] <= r["atol"], (arch, r)
        assert r["gap_stale"] > 10 * r["atol"], (arch, r)  # the check can fail: unsent weights show
        assert max(r["gap_after_sync"]) <= r["atol"] and r["greedy_equal_after_sync"], (arch, r)
        assert r["ok"], (arch, r)
    assert out.returncode == 0


def _pairs_batch(tokenizer):
    """Rows of uneven prompt and response lengths, left-padded as every role receives them."""
    from rlhf_ray.data.tokenize import encode_pairs

    prompts, responses = ["12+7=", "3+4=", "100+250="], ["19", "7 and more", "350"]
    return encode_pairs(tokenizer, prompts, responses, max_prompt_tokens=16, max_seq_len=32)


def test_every_architecture_trains_as_policy_critic_and_reward_model(arch_dirs):
    """What the SFT, RM and PPO learners compute, on every architecture of the matrix, in one process
    (the Ray and DeepSpeed plumbing around it is architecture-blind and runs on the built-in model
    elsewhere): response log-probs through left padding and packing equal each row's own forward;
    an SFT step and a PPO step move the policy the right way; the critic's values and the reward
    model's Bradley-Terry loss train through each backbone; LoRA with no target list adapts every
    linear layer (GPT-2's Conv1D included)."""
    from rlhf_ray import algo
    from rlhf_ray.engines.scoring import response_logprobs, response_values
    from rlhf_ray.models.heads import RewardModel, ValueModel
    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ray.models.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    for arch, path in arch_dirs.items():
        tokenizer, policy = load_tokenizer(path), load_causal_lm(path)
        batch = _pairs_batch(tokenizer)
        mask = batch.response_mask
        with torch.no_grad():
            batched = response_logprobs(policy.eval(), batch)
            for i in range(batch.size):  # row by row, no padding at all
                real = batch.attention_mask[i].bool()
                alone = batch.select(slice(i, i + 1))
                ids = alone.sequences[:, real]
                logits = policy(input_ids=ids).logits[0, :-1]
                own = algo.token_logprobs(logits[None], ids[:, 1:])[0][-int(mask[i].sum()):]
                assert torch.allclose(batched[i][mask[i].bool()], own, atol=1e-4), arch

        optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)  # small plain steps: first order holds
        policy.train()
        sft_before = algo.language_model_loss(response_logprobs(policy, batch), mask)
        sft_before.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert algo.language_model_loss(response_logprobs(policy, batch), mask) < sft_before, arch
        old = response_logprobs(policy, batch).detach()
        advantages = torch.where(torch.arange(batch.size)[:, None] == 0, 1.0, -1.0).expand_as(old)
        loss = algo.ppo_policy_loss(response_logprobs(policy, batch), old, advantages, mask, 0.2, "token-mean").loss
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            moved = response_logprobs(policy, batch) - old
        assert algo.masked_mean(advantages * moved, mask) > 0, arch  # the surrogate objective rose

        critic = ValueModel.from_base(path)
        values = response_values(critic, batch)
        assert values.shape == mask.shape, arch
        value_loss = algo.masked_mean((values - 1.0) ** 2, mask)
        value_loss.backward()
        assert critic.head.weight.grad is not None and any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in critic.backbone.parameters()), arch

        reward = RewardModel.from_base(path)
        chosen, rejected = (encode_pairs_ids(tokenizer, text) for text in ("1+1=2", "1+1=5"))
        rm_opt = torch.optim.AdamW(reward.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            bt = algo.bradley_terry_loss(reward(*chosen), reward(*rejected))
            losses.append(bt.item())
            bt.backward()
            rm_opt.step()
            rm_opt.zero_grad()
        assert losses[-1] < losses[0], (arch, losses)

        adapted = apply_lora(load_causal_lm(path), LoraSettings(rank=4, alpha=8))
        trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable), arch
        wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
        assert wrapped >= set(ATTENTION.get(arch, ["q_proj", "o_proj"])), (arch, wrapped)


def encode_pairs_ids(tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer([text], return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]
