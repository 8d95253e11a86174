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
