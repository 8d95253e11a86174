"""Builds a tiny Llama-architecture causal LM and a character-level tokenizer, offline.

No model hub is reachable in tests or on a laptop demo, so the system makes its own starting
checkpoint: an HF-format folder (safetensors) that transformers, vLLM, DeepSpeed and peft load
exactly as they load a real checkpoint. Deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Printable ASCII minus the characters that never occur in text we train on.
CHARSET = string.digits + string.ascii_letters + " +-*/=?.,:;!'\"()[]#\n"
# What tool calls in the Hermes/Qwen form (``<tool_call>{"name": ...}</tool_call>``) need beyond
# CHARSET; appended, so every other character keeps its id. Only models built with
# ``TinyModelSpec(tool_chars=True)`` have them (the multi-turn agent tasks): adding them to every
# tiny model would change its random weights.
TOOL_CHARS = "<>{}_"


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 256
    seed: int = 0
    tool_chars: bool = False  # the tokenizer knows TOOL_CHARS too

    @classmethod
    def of_width(cls, hidden_size: int, num_layers: int, intermediate_size: int = 0, seed: int = 0) -> TinyModelSpec:
        """Heads of size 32 (vLLM's CPU attention has no kernels for smaller ones); the MLP is
        twice the width unless given."""
        heads = hidden_size // 32
        return cls(hidden_size=hidden_size, num_layers=num_layers, num_heads=heads, num_kv_heads=heads,
                   intermediate_size=intermediate_size or 2 * hidden_size, seed=seed)


def build_tokenizer(tool_chars: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARSET, *(TOOL_CHARS if tool_chars else "")])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


# ChatML, as Qwen2/3 and many fine-tunes use it: each turn is "<|im_start|>role\ncontent<|im_end|>\n".
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chat_corpus() -> list[str]:
    """What the BPE merges are learnt from: sums and chat turns of the built-in task's shape."""
    texts = [f"{a}+{b}={a + b}" for a in range(20) for b in range(20)]
    for role in ("system", "user", "assistant"):
        texts += [f"{IM_START}{role}\n{t}{IM_END}\n" for t in texts[:50]]
    return texts + ["You are a helpful assistant. Answer with the number only."] * 20


def build_chat_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained offline (as GPT-2, Llama-3 and Qwen use), with the ChatML
    template and its end of turn ``<|im_end|>`` as EOS: generation stops where a turn ends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chat_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   bos_token=None, model_max_length=1024, chat_template=CHATML_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


# The tokenizers a tiny checkpoint can be built with.
TOKENIZERS = {"char": build_tokenizer, "bpe-chatml": build_chat_tokenizer}


def tiny_tokenizer(name: str):
    """The tokenizer of :data:`TOKENIZERS` called ``name``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def build_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Writes model + tokenizer into ``out_dir`` (created) and returns it. Reuses an identical build."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    marker = out / "tiny_spec.json"
    spec_json = json.dumps(spec.__dict__, sort_keys=True)
    if marker.exists() and marker.read_text() == spec_json:
        return out
    tokenizer = build_tokenizer(spec.tool_chars)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    with _replaced_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(spec_json)
    return out


@contextlib.contextmanager
def _replaced_dir(out: Path):
    """Write under a temporary name and rename, so a crash never leaves a half-built model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# The architectures users bring, each with what sets it apart from Llama: config class name and
# the fields that make a tiny random model of it. Heads of 32 (vLLM's CPU attention kernels).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),  # Llama-3.2 1B/3B
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 32}),  # q/k RMSNorm
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True, "head_dim": 32}),  # scaled embeddings
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),  # fused qkv and gate-up projections
    "gpt2": ("GPT2Config", {"tie_word_embeddings": True}),  # Conv1D weights, learned positions
    "olmo": ("OlmoConfig", {"tie_word_embeddings": False}),  # non-parametric layer norm
}


def tiny_config(arch: str, tokenizer, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 256):
    """The transformers config of a tiny ``arch`` (a key of :data:`ARCHITECTURES`) for ``tokenizer``."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config_name, fields = ARCHITECTURES[arch]
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    if config_name == "GPT2Config":
        return transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=num_layers,
                                       n_head=hidden_size // 32, n_positions=max_positions, **special, **fields)
    return getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32, max_position_embeddings=max_positions, **special, **fields)


def build_tiny_architecture(out_dir: str | os.PathLike, arch: str, hidden_size: int = 64, num_layers: int = 2,
                            max_positions: int = 256, seed: int = 0, tokenizer: str = "char") -> Path:
    """A tiny random-weight checkpoint of ``arch`` (a key of :data:`ARCHITECTURES`) with a
    tokenizer of :data:`TOKENIZERS`, written as safetensors into ``out_dir``; reuses an identical
    build."""
    import torch
    import transformers

    if tokenizer not in TOKENIZERS:  # refused before anything is written
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    out = Path(out_dir)
    marker = out / "tiny_spec.json"
    spec = {"arch": arch, "hidden_size": hidden_size, "num_layers": num_layers, "max_positions": max_positions,
            "seed": seed, **({"tokenizer": tokenizer} if tokenizer != "char" else {})}
    spec_json = json.dumps(spec, sort_keys=True)
    if marker.exists() and marker.read_text() == spec_json:
        return out
    tokenizer = tiny_tokenizer(tokenizer)
    cfg = tiny_config(arch, tokenizer, hidden_size, num_layers, max_positions)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with _replaced_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(spec_json)
    return out


def build_tiny_reward_model(out_dir: str | os.PathLike, arch: str, num_labels: int = 1, seed: int = 0,
                            tokenizer=None) -> Path:
    """A tiny random ``AutoModelForSequenceClassification`` checkpoint of ``arch`` (the folder format
    of Skywork-Reward and of TRL's and OpenRLHF's reward trainers) with ``tokenizer`` (default the
    character tokenizer), written as safetensors into ``out_dir``."""
    import torch
    import transformers

    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(arch, tokenizer)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    with _replaced_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
