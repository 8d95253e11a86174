"""The rollout role: a thin Ray actor around one ``VLLMEngine`` (or ``HFEngine``). No policy logic here; the driver
decides what to generate and when to sync weights.

``RolloutActor`` is a plain class (testable without Ray); ``ray.remote(RolloutActor)`` makes the
actor, as ``create_rollout_actors`` does."""

from __future__ import annotations

import ray

from rlhf_ray.engines.sampling import Generation, SamplingSpec
from rlhf_ray.platform import detect


class RolloutActor:
    def __init__(self, model: str, backend: str = "auto", engine: str = "vllm", **engine_kwargs) -> None:
        """``engine`` is ``rollout.engine``: vllm, or hf (transformers ``generate``, CPU)."""
        detect(backend).apply_env()  # before vLLM is imported in this process
        if engine == "hf":
            from rlhf_ray.engines.hf_engine import HFEngine as Engine
        else:
            from rlhf_ray.engines.vllm_engine import VLLMEngine as Engine

        self.engine = Engine(model, backend=backend, **engine_kwargs)

    def ready(self) -> bool:
        return True

    def generate(self, prompt_token_ids: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        return self.engine.generate(prompt_token_ids, spec)

    def score(
        self, prompt_ids_list: list[list[int]], response_ids_list: list[list[int]]
    ) -> list[list[float]]:
        return self.engine.score(prompt_ids_list, response_ids_list)

    def greedy(self, prompt_token_ids: list[list[int]], max_new_tokens: int,
               stop_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
        return self.engine.greedy(prompt_token_ids, max_new_tokens, stop_token_ids)

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
        return self.engine.join_weight_sync(
            master_addr, master_port, world_size, rank_offset, backend, timeout, shm_path
        )

    def join_colocated_sync(self, master_addr: str, master_port: int, peer: str) -> None:
        self.engine.join_colocated_sync(master_addr, master_port, peer)

    def device_uuids(self) -> list[str | None]:
        return self.engine.device_uuids()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self, tags: list[str]) -> None:
        self.engine.wake_up(tags)

    def receive_weights(self, manifest: dict) -> int:
        return self.engine.receive_weights(manifest)


def create_rollout_actors(
    num_engines: int,
    model: str,
    *,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    num_cpus: float = 1,
    num_gpus: float = 0,
    placement_group=None,
    backend: str = "auto",
    **engine_kwargs,
) -> list:
    """Starts ``num_engines`` actors (engine i seeded ``seed + i`` so unseeded sampling differs
    across engines) and waits until all are ready. With a placement group, engine i takes bundle i,
    which must hold ``num_cpus``/``num_gpus``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actors = []
    for i in range(num_engines):
        options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=i
            )
        actors.append(
            ray.remote(RolloutActor)
            .options(**options)
            .remote(
                model,
                backend=backend,
                tensor_parallel_size=tensor_parallel_size,
                seed=seed + i,
                **engine_kwargs,
            )
        )
    ray.get([a.ready.remote() for a in actors])
    return actors
