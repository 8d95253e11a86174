"""The rollout engine: one ``vllm.LLM`` in this process (no Ray here), speaking token ids.

Generation returns per-token log-probs of the sampled tokens; ``score`` recomputes log-probs of
given responses under the current weights (the parity check after a weight sync). Weight sync
verbs forward to ``rlhf_ray.sync.vllm_worker.WeightSyncWorkerExtension`` in every worker.
"""

from __future__ import annotations

from rlhf_ray.engines.sampling import Generation, SamplingSpec
from rlhf_ray.platform import detect

WORKER_EXTENSION = "rlhf_ray.sync.vllm_worker.WeightSyncWorkerExtension"


class VLLMEngine:
    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = False,
        gpu_memory_utilization: float = 0.9,
        backend: str = "auto",
        trust_remote_code: bool = False,
        logprobs_mode: str = "raw_logprobs",
        sleep_mode: bool = False,
        **llm_kwargs,
    ) -> None:
        """``backend`` is the config's auto/cpu/cuda; ``llm_kwargs`` pass through to ``vllm.LLM``.
        ``sleep_mode`` (``rollout.colocate``): the engine can release its GPU memory between
        generate phases; vLLM supports it on CUDA only, so elsewhere the engine stays resident."""
        platform = detect(backend)
        platform.apply_env()
        from vllm import LLM

        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_mode = sleep_mode and not platform.is_cpu
        self.on_cpu = platform.is_cpu
        self.llm = LLM(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            logprobs_mode=logprobs_mode,
            worker_extension_cls=WORKER_EXTENSION,
            **({"enable_sleep_mode": True} if self.sleep_mode else {}),
            **platform.vllm_engine_kwargs(gpu_memory_utilization, tensor_parallel_size),
            **llm_kwargs,
        )

    def generate(self, prompt_token_ids: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        """``spec.n`` samples per prompt, flattened prompt-major: prompt 0 samples 0..n-1, prompt 1, ...

        On CPU, prompts go in calls whose prefill fits one scheduler step: vLLM 0.32's CPU backend
        crashes ("CPU Generator does not use offset") when it splits a seeded request's prefill over
        steps. Each prompt keeps its own seed (``spec.to_vllm(i)``), so the samples are the same."""
        params = [spec.to_vllm(i) for i in range(len(prompt_token_ids))]
        outputs = []
        for calls in self._prefill_sized_calls(prompt_token_ids, spec.n if spec.seed is not None else 0):
            outputs += self._run([prompt_token_ids[i] for i in calls], [params[i] for i in calls])
        generations = []
        for i, (prompt, out) in enumerate(zip(prompt_token_ids, outputs)):
            for sample in sorted(out.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                generations.append(
                    Generation(
                        prompt_index=i,
                        prompt_ids=list(prompt),
                        response_ids=ids,
                        logprobs=[float(lp[t].logprob) for lp, t in zip(sample.logprobs, ids)],
                        finish_reason=str(sample.finish_reason),
                    )
                )
        return generations

    def score(
        self, prompt_ids_list: list[list[int]], response_ids_list: list[list[int]]
    ) -> list[list[float]]:
        """Log-prob of each response token given its prompt and the response so far, under the
        engine's current weights (prompt log-probs of prompt + response; one token is generated
        and discarded)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        full = [list(p) + list(r) for p, r in zip(prompt_ids_list, response_ids_list)]
        outputs = self._run(full, params)
        scores = []
        for prompt, seq, out in zip(prompt_ids_list, full, outputs):
            # prompt_logprobs[j] is the log-prob of seq[j] given seq[:j] (None at j = 0).
            lps = out.prompt_logprobs
            scores.append([float(lps[j][seq[j]].logprob) for j in range(len(prompt), len(seq))])
        return scores

    def greedy(self, prompt_token_ids: list[list[int]], max_new_tokens: int,
               stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
        """Greedy responses, ending at the model's EOS or any of ``stop_token_ids``."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                detokenize=False)
        return [list(out.outputs[0].token_ids) for out in self._run(prompt_token_ids, params)]

    def join_weight_sync(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        rank_offset: int,
        backend: str,
        timeout: float = 300.0,
        shm_path: str | None = None,
    ) -> list[int]:
        """Every worker joins the learner's broadcast group, or with ``shm_path`` (an engine on the
        learner's node) maps that segment and joins the shared-memory group; returns their ranks.
        Blocks until the learner (rank 0) and all other engines join: call it concurrently."""
        return self.llm.collective_rpc(
            "join_weight_sync", args=(master_addr, master_port, world_size, rank_offset, backend, timeout, shm_path)
        )

    def join_colocated_sync(self, master_addr: str, master_port: int, peer: str, timeout: float = 300.0) -> None:
        """The one worker (``rollout.colocate`` runs tensor_parallel_size 1) maps the slots of
        ``peer``, the learner rank on its device, and takes later syncs from them."""
        self.llm.collective_rpc("join_colocated_sync", args=(master_addr, master_port, peer, timeout))

    def device_uuids(self) -> list[str | None]:
        """Each worker's GPU UUID (None on CPU)."""
        return self.llm.collective_rpc("device_uuid")

    def sleep(self) -> None:
        """Releases the GPU memory while the learners train: the KV cache is dropped and the weights
        are moved to host memory (vLLM's sleep level 1; level 2 would drop them, and the in-place
        reload of the next sync needs the loaded model's structure intact)."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str]) -> None:
        """``["weights"]`` before a sync (the KV cache stays released while the buckets arrive),
        then ``["kv_cache"]`` before generating."""
        self.llm.wake_up(tags=tags)

    def receive_weights(self, manifest: dict) -> int:
        """Receives one broadcast sync (concurrently with the learner's send); returns its bytes."""
        received = self.llm.collective_rpc("receive_weights", args=(manifest,))
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        return received[0]

    def shutdown(self) -> None:
        """Stops the engine's processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def _prefill_sized_calls(self, prompt_token_ids: list[list[int]], n: int) -> list[range]:
        """Consecutive runs of prompt indices, each prefilling at most one scheduler step's tokens
        (``n`` samples of each prompt are prefilled apiece) on CPU with seeded sampling (``n`` > 0);
        one run of all of them otherwise."""
        everything = [range(len(prompt_token_ids))]
        if not (self.on_cpu and n):
            return everything
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        runs, start, used = [], 0, 0
        for i, prompt in enumerate(prompt_token_ids):
            cost = len(prompt) * n
            if used + cost > budget and i > start:
                runs.append(range(start, i))
                start, used = i, 0
            used += cost
        return [*runs, range(start, len(prompt_token_ids))] if prompt_token_ids else everything

    def _run(self, prompt_token_ids: list[list[int]], params):
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        return self.llm.generate(prompts, params, use_tqdm=False)
