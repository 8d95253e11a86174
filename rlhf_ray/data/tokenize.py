"""Text pairs -> the token layout every role shares (``RolloutBatch``)."""

from __future__ import annotations

import json

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
    return _fitted_batch(prompt_ids, response_ids, [[1] * len(ids) for ids in response_ids], max_seq_len,
                         tokenizer.pad_token_id)


def encode_examples(tokenizer, examples: list, max_prompt_tokens: int, max_seq_len: int) -> RolloutBatch:
    """SFT examples (``formats.SFTExample``) as the learners' batch, row for row: a prompt/response
    pair as ``encode_pairs`` encodes it; a multi-turn demonstration (one with ``turns``) token for
    token as the rollout lays out a trajectory (``rlhf_ray.agents.render.demonstration``), its
    observed tokens (tool results, replies, the next generation prompt) in the sequence with
    ``response_mask`` 0, so only the policy's turns are trained on."""
    from rlhf_ray.agents.render import demonstration, turn_format

    layout = turn_format(tokenizer)
    prompt_ids, response_ids, policy_masks = [], [], []
    for example in examples:
        if example.turns:
            trajectory = demonstration(layout, tokenizer, example.prompt, example.turns)
            prompt_ids.append(trajectory.prompt_ids[-max_prompt_tokens:])
            response_ids.append(trajectory.response_ids)
            policy_masks.append(trajectory.policy_mask)
        else:
            pair = encode_pairs(tokenizer, [example.prompt], [example.response], max_prompt_tokens, max_seq_len)
            prompt_ids += pair.prompt_token_lists()
            response_ids += pair.response_token_lists()
            policy_masks.append([1] * len(response_ids[-1]))
    return _fitted_batch(prompt_ids, response_ids, policy_masks, max_seq_len, tokenizer.pad_token_id)


def _fitted_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], policy_masks: list[list[int]],
                  max_seq_len: int, pad_id: int) -> RolloutBatch:
    """The rows as a batch, each response cut to fit ``max_seq_len`` with its prompt; an empty
    prompt takes the response's first token."""
    for prompt, response, mask in zip(prompt_ids, response_ids, policy_masks):
        if not prompt and response:
            prompt.append(response.pop(0))
            mask.pop(0)
    keep = [max(1, max_seq_len - len(p)) for p in prompt_ids]
    return RolloutBatch.from_token_lists(prompt_ids, [r[:k] for r, k in zip(response_ids, keep)], pad_id,
                                         [m[:k] for m, k in zip(policy_masks, keep)])


def tokenizer_identity(tokenizer) -> tuple[str, str | None]:
    """What decides the ids a tokenizer gives a text and how it renders chats: its whole definition
    (vocabulary, merges, normaliser, pre-tokenizer, added tokens, post-processor) as the JSON of a
    fast tokenizer, else its vocabulary, and its chat template. Equal identities read text alike,
    wherever the files came from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(sorted(tokenizer.get_vocab().items())), getattr(tokenizer, "chat_template", None)
    definition = json.loads(backend.to_str())
    # Padding and truncation are left behind by the last padded call, not part of the tokenizer.
    definition.pop("padding", None)
    definition.pop("truncation", None)
    return json.dumps(definition, sort_keys=True), getattr(tokenizer, "chat_template", None)


def encode_conversations(tokenizer, prompts: list[str], responses: list[str]) -> RolloutBatch:
    """Each prompt + response as ``tokenizer`` reads it on its own: a chat prompt (a
    ``ChatPrompt``, carrying its messages) with a tokenizer that has a chat template is rendered by
    that template with the response as the assistant's turn; any other prompt is the text
    prompt + response with the tokenizer's special tokens. The whole text is tokenized at once (a
    BPE merges across the prompt/response boundary as it would in one text). The sequences sit in
    the batch's prompt block (its responses are empty): what a reward model reads at the last token."""
    ids = []
    for prompt, response in zip(prompts, responses):
        messages = getattr(prompt, "messages", None)
        if messages is not None and getattr(tokenizer, "chat_template", None):
            conversation = [*messages, {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has them
        else:
            ids.append(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
    return RolloutBatch.from_token_lists(ids, [[] for _ in ids], tokenizer.pad_token_id)
