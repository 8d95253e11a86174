"""A CPU rollout engine on transformers' ``generate``, with the verbs of ``VLLMEngine`` (no Ray here).

For small models on a few CPU cores plain ``generate`` can outrun vLLM's CPU backend
(``benchmarks/bench_rollout.py`` measures both); ``rollout.engine=hf`` picks it. GPU clusters
keep vLLM (paged KV cache, continuous batching). Weight sync is
the same transport as vLLM's workers (``WeightSyncWorkerExtension``): only the last step, putting
the received tensors into the model, differs.
"""

from __future__ import annotations

import torch

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring
from rlhf_ray.engines.sampling import Generation, SamplingSpec
from rlhf_ray.sync.vllm_worker import WeightSyncWorkerExtension


class _ModelReceiver(WeightSyncWorkerExtension):
    """The sync extension's receiving side on a plain HF model: one worker, rank 0 of its engine."""

    rank = 0

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def reload_weights(self, weights_iterator) -> None:
        # state_dict lists tied weights under every name; each copy lands in the shared storage.
        params = self.model.state_dict()
        for name, tensor in weights_iterator:
            if name not in params:
                raise KeyError(f"weight sync sent {name!r}, which the rollout model does not have")
            params[name].copy_(tensor)


class HFEngine:
    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        score_micro_batch_size: int = 64,
        **_vllm_only,  # backend, tensor_parallel_size, KV-cache and prefix-caching settings: not used here
    ) -> None:
        from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.seed = seed
        self.score_micro_batch_size = score_micro_batch_size
        self.receiver = _ModelReceiver(self.model)

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        """``spec.n`` samples per prompt, prompt-major, with the log-prob of each sampled token
        under the distribution sampled from (temperature and top-p applied, as vLLM's
        ``processed_logprobs``)."""
        torch.manual_seed(self.seed if spec.seed is None else spec.seed)
        stop = list(spec.stop_token_ids) or [self.eos_id]
        ids, mask = self._left_padded(prompt_token_ids)
        # Temperature 0 is greedy, as in vLLM.
        sampling = ({"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
                    if spec.temperature else {"do_sample": False})
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, **sampling, max_new_tokens=spec.max_new_tokens,
            min_new_tokens=spec.min_new_tokens, num_return_sequences=spec.n, eos_token_id=stop,
            pad_token_id=self.pad_id, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [B*n, T, V]
        token_lp = logprobs.gather(-1, new[..., None]).squeeze(-1)
        generations = []
        for row, (tokens, lps) in enumerate(zip(new.tolist(), token_lp.tolist())):
            length, finish = _cut_at_stop(tokens, stop)
            generations.append(Generation(prompt_index=row // spec.n, prompt_ids=list(prompt_token_ids[row // spec.n]),
                                          response_ids=tokens[:length], logprobs=lps[:length], finish_reason=finish))
        return generations

    def score(self, prompt_ids_list: list[list[int]], response_ids_list: list[list[int]]) -> list[list[float]]:
        """Log-prob of each response token given its prompt and the response so far (temperature 1)."""
        batch = RolloutBatch.from_token_lists(prompt_ids_list, response_ids_list, self.pad_id)
        logprobs, _ = scoring.batched_logprobs(self.model, batch, self.score_micro_batch_size)
        return [row[: len(r)].tolist() for row, r in zip(logprobs, response_ids_list)]

    @torch.no_grad()
    def greedy(self, prompt_token_ids: list[list[int]], max_new_tokens: int,
               stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
        """Greedy responses, ending at EOS or any of ``stop_token_ids``."""
        stop = list(dict.fromkeys([self.eos_id, *stop_token_ids]))
        ids, mask = self._left_padded(prompt_token_ids)
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=stop, pad_token_id=self.pad_id)
        new = out[:, ids.shape[1]:].tolist()
        return [tokens[: _cut_at_stop(tokens, stop)[0]] for tokens in new]

    def join_weight_sync(self, master_addr: str, master_port: int, world_size: int, rank_offset: int, backend: str,
                         timeout: float = 300.0, shm_path: str | None = None) -> list[int]:
        """As ``VLLMEngine.join_weight_sync``, for this engine's single worker."""
        return [self.receiver.join_weight_sync(master_addr, master_port, world_size, rank_offset, backend, timeout,
                                               shm_path)]

    def join_colocated_sync(self, master_addr: str, master_port: int, peer: str, timeout: float = 300.0) -> None:
        """As ``VLLMEngine.join_colocated_sync``."""
        self.receiver.join_colocated_sync(master_addr, master_port, peer, timeout)

    def device_uuids(self) -> list[str | None]:
        return [None]  # a CPU engine

    def receive_weights(self, manifest: dict) -> int:
        return self.receiver.receive_weights(manifest)

    def shutdown(self) -> None:
        """Nothing runs outside this process."""

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask


def _cut_at_stop(tokens: list[int], stop: list[int]) -> tuple[int, str]:
    """(length up to and including the first stop token, finish reason), as vLLM reports them."""
    for i, t in enumerate(tokens):
        if t in stop:
            return i + 1, "stop"
    return len(tokens), "length"
