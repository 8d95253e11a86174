"""Value and reward heads, and model loading errors (single process, tiny model)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.models.heads import RewardModel, ValueModel
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _padded(tokenizer, texts: list[str], side: str):
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["1+1=2", "12*3=36 ok", "hi"]


def test_tokenizer_pads_left_with_a_pad_token(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None


def test_value_model_shape_and_padding_isolation(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = ValueModel.from_base(tiny_model_dir).eval()
    ids, mask = _padded(tokenizer, TEXTS, "left")
    with torch.no_grad():
        values = model(ids, mask)
        # Garbage in the padded slots must not reach real positions.
        noisy = torch.where(mask.bool(), ids, torch.randint_like(ids, 4, len(tokenizer)))
        values_noisy = model(noisy, mask)
    assert values.shape == ids.shape
    real = mask.bool()
    torch.testing.assert_close(values[real], values_noisy[real])


@pytest.mark.parametrize("kind", [ValueModel, RewardModel])
def test_head_starts_small(tiny_model_dir, kind):
    model = kind.from_base(tiny_model_dir)
    assert model.head.weight.std() < 0.2
    # A reward head has no bias (transformers' classifiers have none); a critic's starts at 0.
    assert model.head.bias is None if kind is RewardModel else model.head.bias.abs().max() == 0


def test_reward_reads_last_real_token_for_left_and_right_padding(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = RewardModel.from_base(tiny_model_dir).eval()
    with torch.no_grad():
        left = model(*_padded(tokenizer, TEXTS, "left"))
        right = model(*_padded(tokenizer, TEXTS, "right"))
        alone = torch.cat([model(*_padded(tokenizer, [t], "left")) for t in TEXTS])
        # The score is the head at the last real token of the unpadded sequence.
        ids, mask = _padded(tokenizer, [TEXTS[1]], "left")
        last_token_value = model.token_scores(ids, mask)[0, -1]
    assert left.shape == (len(TEXTS),)
    torch.testing.assert_close(left, right)
    torch.testing.assert_close(left, alone)
    torch.testing.assert_close(left[1], last_token_value)


@pytest.mark.parametrize("kind", [ValueModel, RewardModel])
def test_save_load_round_trip(tiny_model_dir, tokenizer, tmp_path, kind):
    torch.manual_seed(0)
    model = kind.from_base(tiny_model_dir).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")  # overwriting an existing folder works
    loaded = kind.from_pretrained(tmp_path / "m").eval()
    ids, mask = _padded(tokenizer, TEXTS, "left")
    with torch.no_grad():
        # Same weights; a loaded tensor's memory alignment may change the CPU kernel's summation order.
        torch.testing.assert_close(model(ids, mask), loaded(ids, mask), rtol=0, atol=1e-6)
    other = RewardModel if kind is ValueModel else ValueModel
    with pytest.raises(ValueError, match="model, not a"):
        other.from_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_missing_paths_are_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for load in (load_causal_lm, load_tokenizer, ValueModel.from_base, RewardModel.from_pretrained):
        with pytest.raises(FileNotFoundError, match="no-such-model"):
            load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*not a model folder"):
        load_causal_lm(tmp_path / "empty")


def test_gradient_checkpointing_reaches_the_backbone(tiny_model_dir):
    model = ValueModel.from_base(tiny_model_dir).train()
    model.gradient_checkpointing_enable()
    assert model.backbone.is_gradient_checkpointing
    ids = torch.tensor([[5, 6, 7]])
    model(ids, torch.ones_like(ids)).sum().backward()
    assert model.head.weight.grad is not None


# --- the sequence-classification format (Skywork-Reward, TRL, OpenRLHF) -------------------------

SEQ_CLASS_ARCHS = ["llama", "qwen2", "gpt2"]  # GPT-2: another head prefix (transformer.), learned positions


def _transformers_scores(classifier, tokenizer, texts: list[str]) -> torch.Tensor:
    """transformers' own logits, each text alone (no padding to interpret)."""
    with torch.no_grad():
        return torch.cat([classifier(**tokenizer([t], return_tensors="pt")).logits[:, 0] for t in texts])


@pytest.mark.parametrize("arch", SEQ_CLASS_ARCHS)
def test_sequence_classifier_scores_as_transformers_does(tmp_path, tokenizer, arch):
    """A one-label AutoModelForSequenceClassification folder loads as a reward model (in the asked
    dtype) and scores padded batches as transformers scores each text; as a critic's start it
    brings its head."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(tmp_path / arch, arch, tokenizer=tokenizer)
    expected = _transformers_scores(AutoModelForSequenceClassification.from_pretrained(path).eval(), tokenizer, TEXTS)
    model = RewardModel.from_pretrained(path).eval()
    with torch.no_grad():
        for side in ("left", "right"):
            torch.testing.assert_close(model(*_padded(tokenizer, TEXTS, side)), expected, rtol=0, atol=1e-5)
    assert {p.dtype for p in RewardModel.from_pretrained(path, dtype="bfloat16").parameters()} == {torch.bfloat16}
    critic = ValueModel.from_base(path, dtype="bfloat16")
    assert critic.head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(critic.head.weight.float(), model.head.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="holds a reward model, not a value model"):
        ValueModel.from_pretrained(path)


@pytest.mark.parametrize("arch", SEQ_CLASS_ARCHS)
def test_trained_reward_models_save_as_transformers_classifiers(tmp_path, tokenizer, arch):
    """What the reward-model stage writes loads with plain transformers, with the same scores."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.tiny import build_tiny_architecture

    torch.manual_seed(0)
    model = RewardModel.from_base(build_tiny_architecture(tmp_path / "base", arch)).eval()
    model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    assert not (tmp_path / "rm" / "head.json").exists()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        ours = model(*_padded(tokenizer, TEXTS, "left"))
    torch.testing.assert_close(_transformers_scores(classifier, tokenizer, TEXTS), ours, rtol=0, atol=1e-5)


def test_old_head_folders_still_load(tiny_model_dir, tokenizer, tmp_path):
    """A reward model in the project's earlier format (backbone folder + head.json, a head with a
    bias) loads with its scores: the same weights, bias included."""
    from safetensors.torch import save_file

    from rlhf_ray.models.loading import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(tiny_model_dir)
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    backbone.save_pretrained(tmp_path / "old")
    save_file({"weight": head.weight.detach(), "bias": head.bias.detach()}, tmp_path / "old" / "head.safetensors")
    (tmp_path / "old" / "head.json").write_text('{"kind": "reward"}')
    expected = RewardModel(backbone, head).eval()
    loaded = RewardModel.from_pretrained(tmp_path / "old").eval()
    assert torch.equal(loaded.head.bias, head.bias)
    with torch.no_grad():
        # Not bitwise: the loaded tensors sit at other memory alignments than the in-memory model's,
        # which may change the CPU kernel's summation order (see test_save_load_round_trip). A
        # dropped bias or head would move the scores by the head's size, far beyond 1e-6.
        torch.testing.assert_close(loaded(*_padded(tokenizer, TEXTS, "left")),
                                   expected(*_padded(tokenizer, TEXTS, "left")), rtol=0, atol=1e-6)


def test_multi_label_classifier_is_refused_naming_num_labels(tmp_path, tokenizer):
    from rlhf_ray.errors import BadInputError
    from rlhf_ray.models.heads import check_score_head
    from rlhf_ray.models.tiny import build_tiny_reward_model

    path = build_tiny_reward_model(tmp_path / "two", "llama", num_labels=2, tokenizer=tokenizer)
    for refuse in (check_score_head, RewardModel.from_pretrained, ValueModel.from_base):
        with pytest.raises(BadInputError, match=r"two/config.json: num_labels is 2 .*num_labels: 1"):
            refuse(path)
