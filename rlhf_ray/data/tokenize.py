"""Text pairs -> the token layout every role shares (``RolloutBatch``)."""

from __future__ import annotations

from rlhf_ray.data.batch import RolloutBatch


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                 max_seq_len: int, add_eos: bool = True) -> RolloutBatch:
    """Prompts keep their last ``max_prompt_tokens`` tokens (the part nearest the response);
    responses end with EOS (the model must learn to stop) and are cut to fit ``max_seq_len``."""
    prompt_ids = [ids[-max_prompt_tokens:] for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    if add_eos:
        response_ids = [ids + [tokenizer.eos_token_id] for ids in response_ids]
    response_ids = [r[: max(1, max_seq_len - len(p))] for p, r in zip(prompt_ids, response_ids)]
    return RolloutBatch.from_token_lists(prompt_ids, response_ids, tokenizer.pad_token_id)


def encode_texts(tokenizer, texts: list[str], max_seq_len: int) -> RolloutBatch:
    """Plain texts for language modelling, each ending with EOS and cut to ``max_seq_len`` tokens.
    The first token is the "prompt" and the rest the "response", so ``response_mask`` marks every
    token that has a prediction and the response log-probs are the text's next-token log-probs."""
    ids = [(row + [tokenizer.eos_token_id])[:max_seq_len]
           for row in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return RolloutBatch.from_token_lists([row[:1] for row in ids], [row[1:] for row in ids],
                                         tokenizer.pad_token_id)
