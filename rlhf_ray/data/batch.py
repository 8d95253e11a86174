"""The one batch type passed between roles.

Rows are (prompt, response) pairs laid out as ``[prompt left-padded to P | response right-padded
to R]`` so every row's response starts at column P: per-token quantities over the response
(log-probs, values, advantages) are all ``[B, R]`` and align with ``response_mask``.

``response_mask`` marks the tokens the policy generated, the only ones trained on. In a
multi-turn row (``rlhf_ray.agents``) the response also holds tokens the policy observed (tool
results, the environment's replies): real tokens (``attention_mask`` 1) with ``response_mask`` 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class RolloutBatch:
    sequences: torch.Tensor  # [B, P+R] token ids
    attention_mask: torch.Tensor  # [B, P+R] 1 on real prompt and response tokens
    response_mask: torch.Tensor  # [B, R] 1 on response tokens the policy generated
    prompt_len: int  # P
    # Optional per-token [B, R] or per-sequence [B] tensors, filled in as the iteration goes.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]

    def response_lengths(self) -> torch.Tensor:
        """``[B]`` real response tokens per row, generated and observed."""
        return self.attention_mask[:, self.prompt_len:].sum(-1)

    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    def with_extras(self, **tensors: torch.Tensor) -> RolloutBatch:
        return replace(self, extras={**self.extras, **tensors})

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same rows on ``device`` (itself when already there): learners move what they are
        sent onto their accelerator and send CPU tensors back to a driver that may have none."""
        if self.sequences.device == torch.device(device):
            return self
        return RolloutBatch(self.sequences.to(device), self.attention_mask.to(device),
                            self.response_mask.to(device), self.prompt_len,
                            {k: v.to(device) for k, v in self.extras.items()})

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        return RolloutBatch(
            sequences=self.sequences[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_len=self.prompt_len,
            extras={k: v[index] for k, v in self.extras.items()},
        )

    def chunk(self, n: int) -> list[RolloutBatch]:
        """Splits rows into ``n`` contiguous shards of near-equal size (one per learner rank)."""
        bounds = torch.linspace(0, self.size, n + 1).round().long().tolist()
        return [self.select(slice(a, b)) for a, b in itertools.pairwise(bounds)]

    def trimmed(self) -> RolloutBatch:
        """The same rows without the columns that are padding in every row (the left of the prompt
        block, the right of the response block); per-token extras are cut to match. Forward passes
        over it equal those over the full batch: positions count real tokens only and the cut
        columns were masked out of attention."""
        R = self.response_mask.shape[1]
        P = max(1, int(self.attention_mask[:, : self.prompt_len].sum(-1).max()))
        kept_r = max(1, int(self.response_lengths().max()))
        cols = slice(self.prompt_len - P, self.prompt_len + kept_r)
        return RolloutBatch(
            sequences=self.sequences[:, cols],
            attention_mask=self.attention_mask[:, cols],
            response_mask=self.response_mask[:, :kept_r],
            prompt_len=P,
            extras={k: v[:, :kept_r] if v.dim() == 2 and v.shape[1] == R else v for k, v in self.extras.items()},
        )

    def length_sorted_micro_batches(self, rows: int) -> list[tuple[torch.Tensor, RolloutBatch]]:
        """(row indices, trimmed micro-batch) pairs of at most ``rows`` rows covering every row once.
        Rows are sorted by real length so each micro-batch holds similar lengths and sheds most of
        its padding. Always ``ceil(size / rows)`` micro-batches, as unsorted slicing gives: ZeRO-3
        ranks must run the same number of forward passes."""
        order = torch.argsort(self.attention_mask.sum(-1), stable=True)
        return [(index, self.select(index).trimmed()) for index in order.split(rows)]

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        first = batches[0]
        assert all(b.prompt_len == first.prompt_len for b in batches), "prompt widths differ"
        return RolloutBatch(
            sequences=torch.cat([b.sequences for b in batches]),
            attention_mask=torch.cat([b.attention_mask for b in batches]),
            response_mask=torch.cat([b.response_mask for b in batches]),
            prompt_len=first.prompt_len,
            extras={k: torch.cat([b.extras[k] for b in batches]) for k in first.extras},
        )

    @staticmethod
    def from_token_lists(
        prompts: list[list[int]], responses: list[list[int]], pad_id: int,
        policy_masks: list[list[int]] | None = None,
    ) -> RolloutBatch:
        """``policy_masks``: per response token, 1 if the policy generated it (multi-turn rows);
        by default every response token is the policy's."""
        P = max(len(p) for p in prompts)
        R = max(1, max(len(r) for r in responses))
        B = len(prompts)
        seq = torch.full((B, P + R), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + R), dtype=torch.long)
        resp_mask = torch.zeros((B, R), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            seq[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p) : P] = 1
            if r:
                seq[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
                attn[i, P : P + len(r)] = 1
                resp_mask[i, : len(r)] = 1 if policy_masks is None else torch.tensor(policy_masks[i],
                                                                                      dtype=torch.float32)
        return RolloutBatch(seq, attn, resp_mask, P)

    def response_token_lists(self) -> list[list[int]]:
        lengths = self.response_lengths().tolist()
        return [self.responses[i, :n].tolist() for i, n in enumerate(lengths)]

    def prompt_token_lists(self) -> list[list[int]]:
        out = []
        for i in range(self.size):
            row = self.sequences[i, : self.prompt_len]
            out.append(row[self.attention_mask[i, : self.prompt_len].bool()].tolist())
        return out



def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-token rows as ``[len(rows), width]``, zero-padded on the right."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out
