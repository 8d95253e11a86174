"""The colocated hybrid engine (``rollout.colocate``) without a GPU: its plan (bundles, refusals,
the memory arithmetic of both phases) and its hand-over protocol (``rlhf_ray.sync.ipc``) between
real processes over shared memory, the CPU twin of CUDA IPC. The whole PPO run with colocated vLLM
engines is ``tests/test_ppo.py::test_colocated_engines_take_their_weights_from_the_rank_beside_them``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.config.cluster_fit import SLEEPING_ENGINE_BYTES, model_problems, plan_problems, role_asks
from rlhf_ray.ports import free_port
from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync.group import open_store
from rlhf_ray.sync.ipc import SLOTS, IpcReceiver, IpcSender, device_index_for_uuid

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
COLOCATED = CONFIGS / "llama8b_1x8gpu_colocate_grpo.yaml"
SHAPE_8B = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "num_hidden_layers": 32,
            "vocab_size": 128256, "intermediate_size": 14336, "max_position_embeddings": 131072}


def colocated(*overrides: str, check: bool = False):
    return load_config(COLOCATED, list(overrides), check=check)


# --- the plan -------------------------------------------------------------------------------------
def test_engines_ride_in_the_policy_bundles_and_ask_no_gpus_of_their_own():
    cfg = colocated(check=True)
    asks = {a.role: a for a in role_asks(cfg)}
    assert "rollout" not in asks
    assert asks["policy"].count == cfg.rollout.num_engines == 6
    assert asks["policy"].cpus == cfg.policy.num_cpus + cfg.rollout.num_cpus
    assert sum(a.total_gpus for a in asks.values()) == 8 == cfg.cluster.gpus_per_node
    assert plan_problems(cfg) == []
    # The same engines apart from the learners would need GPUs of their own: 6 more than the node has.
    apart = colocated("rollout.colocate=false", "rollout.num_gpus=1")
    assert [k for k, _ in plan_problems(apart)] == ["cluster.nodes"]


@pytest.mark.parametrize(("override", "key"), [
    ("rollout.num_engines=3", "rollout.num_engines"),
    ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
    ("rollout.elastic=true", "rollout.elastic"),
    ("ppo.overlap=true", "ppo.overlap"),
])
def test_plans_colocation_cannot_run_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: .*colocat"):
        colocated(override, check=True)


def test_both_phases_must_fit_the_shared_gpu():
    """Generate phase: the learner keeps its model states beside vLLM's share of the GPU. Training
    phase: the learner's whole step beside the sleeping engine's residue."""
    assert model_problems(colocated(), SHAPE_8B) == []
    (key, message), = model_problems(colocated("rollout.gpu_memory_utilization=0.9"), SHAPE_8B)
    assert key == "rollout.gpu_memory_utilization"
    assert "beside the 22 GB the policy rank keeps" in message and "weight-sync slots 1.1 GB" in message
    assert "at most 0.62" in message, message
    # Without colocation the same share is the engine's own GPU: nothing to refuse.
    assert model_problems(colocated("rollout.gpu_memory_utilization=0.9", "rollout.colocate=false",
                                    "rollout.num_gpus=1"), SHAPE_8B) == []
    # Training phase: a step that fits alone is refused once the sleeping engine sits beside it.
    tight = ("cluster.gpu_memory_gb=29", "rollout.gpu_memory_utilization=0.05")
    problems = model_problems(colocated(*tight), SHAPE_8B)
    assert [k for k, _ in problems] == ["policy.micro_batch_size"], problems
    assert f"+ {SLEEPING_ENGINE_BYTES / 1e9:.0f} GB of the sleeping colocated engine" in problems[0][1]
    assert model_problems(colocated(*tight, "rollout.colocate=false", "rollout.num_gpus=1"), SHAPE_8B) == []


def test_a_handle_names_its_gpu_by_uuid_not_by_index():
    """Processes with different CUDA_VISIBLE_DEVICES number one GPU differently."""
    assert device_index_for_uuid("GPU-b", ["GPU-a", "GPU-b"]) == 1
    with pytest.raises(RuntimeError, match="GPU-c is not visible here .* must share its learner rank's GPU"):
        device_index_for_uuid("GPU-c", ["GPU-a", "GPU-b"])


# --- the hand-over protocol -----------------------------------------------------------------------
def test_weights_cross_to_another_process_byte_for_byte_through_two_slots(tiny_model_dir):
    """A spawned process (the engine) takes a learner's weights, twice, through the learner's two
    slots; there are several times more buckets than slots, so each slot is reused under the
    protocol's hand-shake."""
    from rlhf_ray.engines.ipc_check import ipc_handover

    result = ipc_handover(str(tiny_model_dir), "cpu", "float32", syncs=2)
    assert result["ok"], result
    assert result["buckets"] >= 3 * SLOTS and result["syncs"] == 2


def _sender(port: int, peer: str, timeout_s: float, slot_bytes: int = 4096) -> IpcSender:
    return IpcSender(open_store("127.0.0.1", port, True, 10), slot_bytes, torch.device("cpu"), peer, timeout_s)


def test_a_silent_peer_ends_the_handover_with_an_error_naming_it():
    with pytest.raises(TimeoutError, match="rollout engine 3 did not map the learner's slots within 0.5 s"):
        _sender(free_port(), "rollout engine 3", 0.5).wait_joined()
    port = free_port()
    store = open_store("127.0.0.1", port, True, 10)  # a learner that never publishes its slots
    with pytest.raises(TimeoutError, match="policy rank 1 did not publish its slots within 0.5 s"):
        IpcReceiver(open_store("127.0.0.1", port, False, 10), "policy rank 1", timeout_s=0.5)
    del store


def test_an_engine_that_stops_taking_buckets_stops_the_learner_with_the_bucket_named():
    """The learner never packs into a slot the engine has not released: with the engine gone
    after bucket 0, it waits for bucket 1's release, then says which peer and bucket it waited for."""
    port = free_port()
    sender = _sender(port, "rollout engine 0", 0.5, slot_bytes=64)
    receiver = IpcReceiver(open_store("127.0.0.1", port, False, 10), "policy rank 0", timeout_s=10)
    sender.wait_joined()
    weights = [(f"w{i}", torch.full((16,), float(i))) for i in range(4)]  # 64 bytes each: one per bucket
    manifest = mf.manifest_for(weights, bucket_bytes=64)
    assert len(manifest["buckets"]) == 4
    taken: list[torch.Tensor] = []

    def take_one():
        _, bucket = next(receiver.buckets(manifest))
        taken.append(bucket.clone())

    engine = threading.Thread(target=take_one)
    engine.start()
    with pytest.raises(TimeoutError, match="rollout engine 0 did not take bucket 1 of sync 0"):
        sender.send(iter(weights), manifest)
    engine.join()
    assert torch.equal(mf.view(taken[0], manifest["buckets"][0]["tensors"][0]), weights[0][1])
