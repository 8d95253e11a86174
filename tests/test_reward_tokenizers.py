"""A reward model whose tokenizer is not the policy's reads its own tokenization of the texts
(with its own chat template for chat prompts); one with the policy's tokenizer reads the policy's
ids as they are. The reward actor runs in-process (no Ray)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.actors.scorers import RewardActor
from rlhf_ray.data.formats import ChatPrompt, render_prompt
from rlhf_ray.data.tokenize import encode_pairs, tokenizer_identity
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.models.tiny import build_tiny_reward_model

MESSAGES = [[{"role": "user", "content": "What is 12+30?"}], [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "7*6?"}]]
RESPONSES = ["42, I think.", "42"]


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _transformers_score(path, token_ids: list[int]) -> float:
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return classifier(input_ids=torch.tensor([token_ids])).logits[0, 0].item()


def _actor_scores(rm_path, policy_dir, policy_tokenizer, prompts: list[str]) -> tuple[RewardActor, torch.Tensor]:
    actor = RewardActor([str(rm_path)], "mean", [], [], "cpu", 8, batch_tokenizer=policy_dir)
    batch = encode_pairs(policy_tokenizer, prompts, RESPONSES, 64, 128)  # the policy's ids, EOS included
    return actor, actor.score(batch, prompts, RESPONSES)["reward/rm0"]


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_reward_model_with_another_tokenizer_reads_the_text_its_own_way(tmp_path, tiny_model_dir, policy_tokenizer,
                                                                           bpe_tokenizer, chat):
    bpe = bpe_tokenizer
    rm_path = build_tiny_reward_model(tmp_path / "qwen-rm", "qwen2", tokenizer=bpe)
    # The policy (no chat template) renders chat prompts as plain text; the prompt carries its messages.
    prompts = [ChatPrompt(render_prompt(m, policy_tokenizer), m) if chat else m[-1]["content"] + " "
               for m in MESSAGES]
    actor, scores = _actor_scores(rm_path, tiny_model_dir, policy_tokenizer, prompts)
    assert actor.models[0].own_tokenizer is not None
    rm_tokenizer = load_tokenizer(rm_path)
    if chat:  # the reward model's own template, the response as the assistant's turn
        texts = [bpe.apply_chat_template([*m, {"role": "assistant", "content": r}], tokenize=False)
                 for m, r in zip(MESSAGES, RESPONSES)]
        assert texts[1].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        ids = [rm_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        ids = [rm_tokenizer(p + r)["input_ids"] for p, r in zip(prompts, RESPONSES)]
    expected = [_transformers_score(rm_path, i) for i in ids]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-5)


def test_a_reward_model_with_the_policys_tokenizer_reads_the_policys_ids(tmp_path, tiny_model_dir, policy_tokenizer):
    """Sameness is read from the tokenizer itself (a copy saved elsewhere is the same), and the
    batch's own ids are scored, EOS included."""
    rm_path = build_tiny_reward_model(tmp_path / "llama-rm", "llama")  # the character tokenizer, its own copy
    used = load_tokenizer(rm_path)
    used(["a", "abc"], padding=True, truncation=True, max_length=2)  # leaves padding settings behind
    assert tokenizer_identity(used) == tokenizer_identity(policy_tokenizer)
    prompts = [m[-1]["content"] + " " for m in MESSAGES]
    actor, scores = _actor_scores(rm_path, tiny_model_dir, policy_tokenizer, prompts)
    assert actor.models[0].own_tokenizer is None
    batch = encode_pairs(policy_tokenizer, prompts, RESPONSES, 64, 128)
    expected = [_transformers_score(rm_path, p + r) for p, r in zip(batch.prompt_token_lists(),
                                                                    batch.response_token_lists())]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-5)


def test_chat_prompts_survive_pickling_as_text_with_their_messages():
    """Ray ships prompts between processes by pickling them."""
    import pickle

    prompt = ChatPrompt("User: hi\nAssistant: ", MESSAGES[0])
    back = pickle.loads(pickle.dumps([prompt]))[0]
    assert back == "User: hi\nAssistant: " and back.messages == MESSAGES[0] and isinstance(back, str)
