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
    assert model.head.weight.std() < 0.2 and model.head.bias.abs().max() == 0


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
        torch.testing.assert_close(model(ids, mask), loaded(ids, mask), rtol=0, atol=0)
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
