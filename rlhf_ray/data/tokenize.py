"""Text pairs -> the token layout every role shares (``RolloutBatch``)."""

from __future__ import annotations

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.errors import BadInputError


def stop_token_ids(tokenizer, stop: list[str]) -> tuple[int, ...]:
    """EOS and the token of each ``rollout.stop`` string: a chat template's end of turn
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``) is one special token, and engines compare
    token ids (they never detokenize), so a stop string must be exactly one token."""
    ids = [tokenizer.eos_token_id]
    for text in stop:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise BadInputError(f"rollout.stop: {text!r} is {len(tokens)} tokens for this tokenizer "
                                f"({tokenizer.convert_ids_to_tokens(tokens)}); each stop string must be one token, "
                                f"such as the chat template's end-of-turn marker")
        ids.append(tokens[0])
    return tuple(dict.fromkeys(ids))


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, special tokens included, cut to its last ``max_prompt_tokens``
    (the part nearest the response): what every role is given as a prompt."""
    if not prompts:
        return []
    bos = tokenizer.bos_token_id
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    # A chat template that writes BOS itself (Llama-3's) plus the tokenizer's own would double it.
    encoded = [ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids for ids in encoded]
    return [ids[-max_prompt_tokens:] for ids in encoded]


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                 max_seq_len: int, add_eos: bool = True) -> RolloutBatch:
    """Prompts keep their last ``max_prompt_tokens`` tokens (the part nearest the response);
    responses end with EOS (the model must learn to stop) and are cut to fit ``max_seq_len``.
    An empty prompt (plain text, with a tokenizer that adds no BOS) takes the response's first
    token: every predicted token needs one before it."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    if add_eos:
        response_ids = [ids + [tokenizer.eos_token_id] for ids in response_ids]
    for prompt, response in zip(prompt_ids, response_ids):
        if not prompt and response:
            prompt.append(response.pop(0))
    response_ids = [r[: max(1, max_seq_len - len(p))] for p, r in zip(prompt_ids, response_ids)]
    return RolloutBatch.from_token_lists(prompt_ids, response_ids, tokenizer.pad_token_id)
