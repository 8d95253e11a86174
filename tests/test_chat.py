"""Chat data end to end: a byte-level BPE tokenizer with a ChatML template (built offline), SFT on
``messages`` rows, a reward model on ``chosen``/``rejected`` message lists and PPO on prompts given
as message lists, all read from files in those formats (TRL's conversational format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_ray.data import formats
from rlhf_ray.data.tokenize import encode_pairs, encode_prompts
from rlhf_ray.models.tiny import IM_END
from rlhf_ray.tasks.arithmetic import ArithmeticTask

SYSTEM = {"role": "system", "content": "Answer with the number only."}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_chat_files(folder: Path, task: ArithmeticTask, n_sft: int, n_pairs: int, n_prompts: int) -> dict[str, Path]:
    """The built-in task's data as chat files: SFT ``messages``, preference message lists (the
    shared prompt inside each), and prompts as message lists."""
    folder.mkdir(parents=True, exist_ok=True)
    sft = [{"messages": [SYSTEM, _user(r["prompt"]), _assistant(r["response"])]} for r in task.sft_examples(n_sft)]
    pairs = [{"chosen": [_user(r["prompt"]), _assistant(r["chosen"])],
              "rejected": [_user(r["prompt"]), _assistant(r["rejected"])]} for r in task.preference_pairs(n_pairs)]
    prompts = [{"prompt": [SYSTEM, _user(p)]} for p in task.prompts(n_prompts)]
    paths = {}
    for name, rows in (("sft", sft), ("preferences", pairs), ("prompts", prompts)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


def test_the_bpe_tokenizer_round_trips_any_text_and_ends_turns_with_eos(tokenizer):
    for text in ("12+7=19", " naïve café — 東京 🚀", "tabs\tand\nnewlines  "):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte level: nothing is unknown
    assert tokenizer.eos_token == IM_END and tokenizer.convert_tokens_to_ids(IM_END) == tokenizer.eos_token_id
    # Merges were learnt: a two-digit number is one token, not two bytes.
    assert len(tokenizer("19", add_special_tokens=False)["input_ids"]) == 1


def test_sft_messages_train_on_the_assistant_turn_only(tokenizer, tmp_path):
    files = write_chat_files(tmp_path, ArithmeticTask(), n_sft=8, n_pairs=4, n_prompts=4)
    examples, report = formats.load_sft(str(files["sft"]), tokenizer=tokenizer)
    assert report.n_skipped == 0 and len(examples) == 8
    row = json.loads(files["sft"].read_text().splitlines()[0])
    first = examples[0]
    assert first.prompt == tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False,
                                                         add_generation_prompt=True)
    assert first.response == row["messages"][-1]["content"]
    batch = encode_pairs(tokenizer, [first.prompt], [first.response], 64, 128)
    real = batch.attention_mask[0].bool()
    ids = batch.sequences[0][real].tolist()
    trained = torch.cat([torch.zeros(batch.prompt_len), batch.response_mask[0]])[real].bool().tolist()
    # The whole sequence is what the template renders for the full conversation (less the
    # newline after the last end of turn), and the loss covers exactly the answer and its <|im_end|>.
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode(ids) == full.removesuffix("\n")
    answer = tokenizer(first.response + IM_END, add_special_tokens=False)["input_ids"]
    assert [t for t, m in zip(ids, trained) if m] == answer
    assert tokenizer.decode([t for t, m in zip(ids, trained) if not m]).endswith("<|im_start|>assistant\n")


def test_preference_message_lists_and_prompt_message_lists_render_with_the_template(tokenizer, tmp_path):
    files = write_chat_files(tmp_path, ArithmeticTask(), n_sft=4, n_pairs=4, n_prompts=4)
    pairs, _ = formats.load_preferences(str(files["preferences"]), tokenizer=tokenizer)
    row = json.loads(files["preferences"].read_text().splitlines()[0])
    assert pairs[0].prompt == tokenizer.apply_chat_template(row["chosen"][:1], tokenize=False,
                                                            add_generation_prompt=True)
    assert (pairs[0].chosen, pairs[0].rejected) == (row["chosen"][1]["content"], row["rejected"][1]["content"])
    prompts, _ = formats.load_prompts(str(files["prompts"]), tokenizer=tokenizer)
    assert prompts[0].endswith("<|im_start|>assistant\n") and prompts[0].startswith("<|im_start|>system\n")


def test_a_template_that_writes_bos_is_not_given_a_second_one():
    """Llama-3's template starts with <|begin_of_text|>, which its tokenizer also adds."""
    from tokenizers import processors

    from rlhf_ray.models.tiny import BOS, build_tokenizer

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_token_id)])
    plain, templated = encode_prompts(tok, ["1+1=", f"{BOS}1+1="], 32)
    assert plain == templated and plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1


@pytest.mark.slow
def test_sft_rm_ppo_on_chat_files_with_a_bpe_tokenizer(ray_session, tmp_path):
    """SFT -> RM -> PPO on a tied Qwen2 with the BPE ChatML tokenizer, every stage reading chat
    files; the vLLM engines stop at <|im_end|>."""
    from rlhf_ray.config import load_config
    from rlhf_ray.models.tiny import build_tiny_architecture
    from rlhf_ray.stages.ppo import run_ppo
    from rlhf_ray.stages.rm import run_rm
    from rlhf_ray.stages.sft import run_sft

    base = build_tiny_architecture(tmp_path / "base", "qwen2", tokenizer="bpe-chatml")
    files = write_chat_files(tmp_path / "data", ArithmeticTask(), n_sft=384, n_pairs=128, n_prompts=16)
    common = ["data.task=", "data.max_prompt_tokens=32", "policy.num_ranks=1", "critic.num_ranks=1",
              "policy.micro_batch_size=32", "critic.micro_batch_size=32", "rollout.num_engines=1",
              "rollout.max_new_tokens=6", "rollout.max_model_len=64", "rollout.gpu_memory_utilization=0.05"]

    def cfg(stage: str, policy: Path, *more: str):
        return load_config(None, [f"run_dir={tmp_path / stage}", f"model.policy={policy}", *common, *more])

    sft = run_sft(cfg("sft", base, f"data.sft={files['sft']}", "sft.epochs=2", "sft.lr=3e-3", "sft.batch_size=32"))
    assert sft["held_out_loss"] < sft["held_out_loss_before"] - 0.5, sft
    rm = run_rm(cfg("rm", sft["model"], f"data.preferences={files['preferences']}", "rm.epochs=1", "rm.lr=1e-3",
                    "rm.batch_size=32"))
    assert rm["held_out_accuracy"] > 0.5, rm
    history = run_ppo(cfg("ppo", sft["model"], f"data.prompts={files['prompts']}", f"model.reward=[{rm['models'][0]}]",
                          "ppo.iterations=2", "ppo.prompts_per_iteration=8", "ppo.advantage_estimator=grpo",
                          "rollout.samples_per_prompt=2", "checkpoint.save_final=false"))
    assert len(history) == 2 and all("reward/rm0_mean" in r for r in history)
    samples = [json.loads(x) for x in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    # After SFT the policy answers with a number and ends its turn: most responses stop before the
    # token limit, and none runs on into a new turn.
    assert not any("<|im_start|>" in s["response"] for s in samples)
    assert history[-1]["response_length_mean"] < 6, history[-1]
