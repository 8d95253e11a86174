"""Plan-vs-cluster and tensor-parallel-vs-model checks: pure, no Ray, no torch."""

import json
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.config.cluster_fit import model_problems, plan_problems, read_model_config, role_asks

CONFIGS = Path(__file__).parent.parent / "configs"
GPU_8B = CONFIGS / "llama8b_2x8gpu_ppo.yaml"
GPU_70B = CONFIGS / "llama70b_zero3_offload_ppo.yaml"
LLAMA_8B = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
LLAMA_70B = {"num_attention_heads": 64, "num_key_value_heads": 8, "hidden_size": 8192}


def gpu(overrides=(), path=GPU_8B):
    return load_config(path, list(overrides), check=False)


def test_load_config_rejects_a_plan_that_does_not_fit():
    with pytest.raises(ConfigError, match="cluster.nodes: the plan asks for 20 GPUs"):
        load_config(GPU_8B, ["rollout.num_engines=6"])


def keys(problems):
    return [k for k, _ in problems]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_fit_their_cluster(path):
    assert plan_problems(load_config(path)) == []


def test_gpu_configs_fill_their_cluster_exactly():
    for path, total in ((GPU_8B, 16), (GPU_70B, 40)):
        cfg = gpu(path=path)
        assert sum(a.total_gpus for a in role_asks(cfg)) == total
        assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == total


def test_no_cluster_means_no_fit_check():
    cfg = gpu(["cluster.nodes=0", "rollout.num_engines=64"])
    assert plan_problems(cfg) == []


def test_too_many_gpus_names_the_numbers():
    (key, msg), = plan_problems(gpu(["rollout.num_engines=6"]))
    assert key == "cluster.nodes"
    assert "asks for 20 GPUs" in msg and "2 nodes x 8 GPUs = 16" in msg
    assert "rollout 12 (6 engines x tensor_parallel_size 2 x num_gpus 1)" in msg


def test_rollout_scales_without_touching_learners():
    # Trade engines for tensor parallelism: same GPUs, nothing else changes.
    assert plan_problems(gpu(["rollout.num_engines=8", "rollout.tensor_parallel_size=1"])) == []
    assert plan_problems(gpu(["rollout.num_engines=2", "rollout.tensor_parallel_size=4"])) == []
    # Growing the cluster is the only other change needed for more engines.
    assert plan_problems(gpu(["rollout.num_engines=8", "cluster.nodes=3"])) == []


def test_one_bundle_cannot_span_nodes():
    problems = plan_problems(gpu(["rollout.num_engines=1", "rollout.tensor_parallel_size=16"]))
    assert ("rollout.tensor_parallel_size",
            ("one rollout bundle asks for 16 GPUs (one engine = tensor_parallel_size 16 x num_gpus 1) "
            "but one node has cluster.gpus_per_node=8; a bundle cannot span nodes")) in problems


def test_single_bundle_check_is_independent_of_total():
    cfg = gpu(["rollout.num_engines=1", "rollout.tensor_parallel_size=16", "cluster.nodes=4"])
    assert keys(plan_problems(cfg)) == ["rollout.tensor_parallel_size"]


def test_critic_counts_only_with_gae():
    # grpo drops the critic's 2 GPUs: two more rollout GPUs fit.
    over = ["rollout.num_engines=5", "rollout.samples_per_prompt=4"]
    assert keys(plan_problems(gpu(over))) == ["cluster.nodes"]
    assert plan_problems(gpu(over + ["ppo.advantage_estimator=grpo"])) == []


def test_colocated_scorers_ride_on_rank0_bundle():
    cfg = gpu(["scorers.colocate_with_learners=true"])
    policy = next(a for a in role_asks(cfg) if a.role == "policy")
    assert policy.bundles()[0] == (8 + 2 * 4, 1 + 2 * 1) and policy.bundles()[1] == (8, 1)
    assert "scorers" not in [a.role for a in role_asks(cfg)]
    assert plan_problems(cfg) == []
    too_big = plan_problems(gpu(["scorers.colocate_with_learners=true", "scorers.num_gpus=4"]))
    assert any(k == "policy.num_gpus" and "asks for 9 GPUs" in m for k, m in too_big)


def test_fractional_gpus_above_one_are_rejected():
    problems = plan_problems(gpu(["policy.num_gpus=1.5"]))
    assert any(k == "policy.num_gpus" and "1.5 GPUs" in m and "whole GPUs" in m for k, m in problems)


def test_tensor_parallel_engines_hold_whole_gpus_in_one_actor():
    """One bundle of tensor_parallel_size whole GPUs per engine, its workers started by vLLM's
    multiprocessing executor inside the actor (vLLM's Ray executor refuses a bundle of more than one
    GPU); a worker cannot share a GPU, and a CUDA run's engines need GPUs at all."""
    from rlhf_ray.platform import detect

    assert detect("cuda").vllm_engine_kwargs(0.9, 2)["distributed_executor_backend"] == "mp"
    assert "distributed_executor_backend" not in detect("cuda").vllm_engine_kwargs(0.9, 1)
    rollout = next(a for a in role_asks(gpu(["rollout.tensor_parallel_size=2"])) if a.role == "rollout")
    assert rollout.bundles()[0][1] == 2  # the engine's one bundle: both workers' GPUs
    for bad, why in ((["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"], "one whole GPU"),
                     (["backend=cuda", "rollout.num_gpus=0"], "0 leaves the engine without any")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, bad)


def test_cpus_checked_when_given():
    problems = plan_problems(gpu(["policy.num_cpus=100"]))
    assert ("policy.num_cpus", ("one policy bundle asks for 100 CPUs but one node has "
            "cluster.cpus_per_node=96")) in problems
    assert any(k == "cluster.cpus_per_node" and "the plan asks for" in m for k, m in problems)
    assert plan_problems(gpu(["policy.num_cpus=100", "cluster.cpus_per_node=0"])) == []


def test_gpus_asked_of_a_cpu_cluster():
    cfg = load_config(CONFIGS / "cpu_smoke_ppo.yaml", ["rollout.num_gpus=1"], check=False)
    problems = plan_problems(cfg)
    assert ("cluster.nodes" in keys(problems)) and "rollout.tensor_parallel_size" in keys(problems)


@pytest.mark.parametrize("tp,model,ok", [
    (2, LLAMA_8B, True), (8, LLAMA_8B, True), (3, LLAMA_8B, False), (16, LLAMA_8B, True),
    (4, LLAMA_70B, True), (16, LLAMA_70B, True), (12, LLAMA_70B, False),
    (4, {"num_attention_heads": 28, "num_key_value_heads": 4}, True),  # Qwen2.5-7B
    (8, {"num_attention_heads": 28, "num_key_value_heads": 4}, False),
    (6, {"num_attention_heads": 12, "num_key_value_heads": 4}, False),  # heads ok, kv heads not
])
def test_tensor_parallel_vs_heads(tp, model, ok):
    cfg = gpu([f"rollout.tensor_parallel_size={tp}", "cluster.nodes=0"])
    problems = model_problems(cfg, model)
    assert (problems == []) is ok, problems
    if not ok:
        assert all(k == "rollout.tensor_parallel_size" for k in keys(problems))
        assert str(tp) in problems[0][1]


def test_heads_message_lists_valid_sizes():
    (_key, msg), kv = model_problems(gpu(["rollout.tensor_parallel_size=3"]), LLAMA_8B)
    assert kv[1] == "3 neither divides nor is a multiple of the policy's num_key_value_heads=8"
    assert msg == "3 does not divide the policy's num_attention_heads=32 (valid sizes: 1, 2, 4, 8, 16, 32)"


def test_model_problems_reads_nested_text_config_and_tolerates_unknowns():
    cfg = gpu(["rollout.tensor_parallel_size=3"])
    assert model_problems(cfg, {"text_config": LLAMA_8B})
    assert model_problems(cfg, None) == [] and model_problems(cfg, {}) == []


def test_read_model_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    assert read_model_config(str(folder)) == LLAMA_8B
    assert read_model_config("builtin:tiny") is None
    assert read_model_config(str(tmp_path / "missing")) is None
    assert read_model_config("some-org/surely-not-cached-model-x") is None
    (folder / "config.json").write_text("{not json")
    assert read_model_config(str(folder)) is None


@pytest.mark.parametrize("model,context", [
    ({"max_position_embeddings": 256}, 256),
    ({"n_positions": 1024, "n_ctx": 1024}, 1024),  # GPT-2
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 16384),
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 131072),
    ({"max_position_embeddings": 32768, "model_max_length": 8192}, 8192),  # the smallest wins, as in vLLM
])
def test_max_model_len_beyond_the_model_context_is_refused(model, context):
    from rlhf_ray.config.cluster_fit import model_context_length

    assert model_context_length(model) == context
    fits = load_config(None, [f"rollout.max_model_len={context}"], check=False)
    assert model_problems(fits, model) == []
    over = load_config(None, [f"rollout.max_model_len={context + 32}"], check=False)
    (key, msg), = model_problems(over, model)
    assert key == "rollout.max_model_len" and f"exceeds the policy's context of {context} positions" in msg


def test_context_check_reads_the_checkpoint_folder(tmp_path):
    """The first run of compare_trl --max-new-tokens 128 died inside the engine actor after two
    minutes; the same mismatch now stops before any actor starts, naming the key."""
    from rlhf_ray.stages.common import check_model_fits

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256, "num_attention_heads": 4}))
    cfg = load_config(None, ["rollout.max_model_len=288", "data.max_prompt_tokens=32", "rollout.max_new_tokens=128"])
    with pytest.raises(ConfigError, match="rollout.max_model_len: 288 exceeds the policy's context of 256"):
        check_model_fits(cfg, str(tmp_path))


# Llama-3.1-8B's and Llama-3.3-70B's config.json shapes (what the checker reads from the folder).
SHAPE_8B = {**LLAMA_8B, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
            "max_position_embeddings": 131072}
SHAPE_70B = {**LLAMA_70B, "num_hidden_layers": 80, "vocab_size": 128256, "intermediate_size": 28672,
             "max_position_embeddings": 131072}


# Qwen2.5-1.5B-Instruct's config.json shape.
SHAPE_QWEN_1_5B = {"num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 1536, "num_hidden_layers": 28,
                   "vocab_size": 151936, "intermediate_size": 8960, "max_position_embeddings": 32768,
                   "tie_word_embeddings": True}


def test_the_one_gpu_qwen_config_of_a_users_own_task_fits_its_gpu():
    """configs/qwen2.5_1.5b_1gpu_gsm8k_grpo.yaml: the learner, the colocated engine and the scorers
    on one 80 GB GPU; the same plan with 16 times the micro batch, or twice the engine's share, is refused."""
    path = CONFIGS / "qwen2.5_1.5b_1gpu_gsm8k_grpo.yaml"
    cfg = load_config(path)
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 1 and not cfg.data.task
    assert (cfg.data.prompts, cfg.data.subset, cfg.data.eval_split) == ("openai/gsm8k", "main", "test")
    assert model_problems(cfg, SHAPE_QWEN_1_5B) == []
    for change, key in (("policy.micro_batch_size=128", "policy.micro_batch_size"),
                        ("rollout.gpu_memory_utilization=0.7", "rollout.gpu_memory_utilization")):
        assert keys(model_problems(gpu([change], path=path), SHAPE_QWEN_1_5B)) == [key]


def test_parameter_count_from_the_config_shape():
    from rlhf_ray.config.cluster_fit import parameter_count

    assert abs(parameter_count(SHAPE_8B) - 8.03e9) / 8.03e9 < 0.01
    assert abs(parameter_count(SHAPE_70B) - 70.6e9) / 70.6e9 < 0.01
    assert parameter_count({"hidden_size": 64}) is None  # unknown shape: no estimate, no check


def test_a_learner_step_that_cannot_fit_its_gpu_is_refused():
    """The 70B plan as shipped fits its 80 GB GPUs because it checkpoints activations; without that
    a micro-batch needs ~69 GB of activations on top of the model states, and the checker says so,
    naming the fixes. The 8B plan fits as it is."""
    assert model_problems(gpu(path=GPU_70B), SHAPE_70B) == []
    assert model_problems(gpu(path=GPU_8B), SHAPE_8B) == []
    problems = model_problems(gpu(["policy.gradient_checkpointing=false"], path=GPU_70B), SHAPE_70B)
    (key, message), = problems
    assert key == "policy.gradient_checkpointing", problems
    assert "activations 68.5" in message and "policy.gradient_checkpointing=true" in message, message
    # Without a GPU size in the config, or for a shape it cannot read, nothing is claimed.
    assert model_problems(gpu(["policy.gradient_checkpointing=false", "cluster.gpu_memory_gb=0"], path=GPU_70B),
                          SHAPE_70B) == []
    # ZeRO stage and offload count: all of Adam on one 80 GB GPU is far too much for 8B weights.
    (key, message), = model_problems(gpu(["policy.zero_stage=0", "policy.num_ranks=1", "critic.num_ranks=1",
                                          "policy.gradient_checkpointing=true"]), SHAPE_8B)
    assert key == "policy.micro_batch_size" and "optimizer 96.4" in message, message


def test_an_engine_share_that_leaves_no_room_to_take_a_weight_sync_is_refused():
    """What a sync receives lives outside vLLM's share: at 70B the 2.1 GB embedding unsharded and
    its TP-4 shard, two 1 GB buckets and the communicator's buffers (~5 GB). The shipped 0.9 leaves
    8 GB of an 80 GB GPU; 0.96 leaves 3.2 GB and is refused with the share that would fit."""
    from rlhf_ray.config.cluster_fit import sync_receive_bytes

    assert sync_receive_bytes(gpu(path=GPU_70B), SHAPE_70B) / 1e9 == pytest.approx(
        128256 * 8192 * 2 * 1.25 / 1e9 + 2 * 1.073741824 + 0.3, rel=1e-6)
    assert model_problems(gpu(path=GPU_70B), SHAPE_70B) == []
    (key, message), = model_problems(gpu(["rollout.gpu_memory_utilization=0.96"], path=GPU_70B), SHAPE_70B)
    assert key == "rollout.gpu_memory_utilization"
    assert ("leaves 3.2 GB outside vLLM, but an engine worker needs ~5.1 GB there to take a weight sync "
            "(its largest layer of 1051M parameters unsharded and its shard, two sync.bucket_mb=1024 buckets") in message
    assert "set it to at most 0.94 or a smaller sync.bucket_mb" in message, message
    # Smaller buckets are the other way out: the largest layer stays, the buckets shrink.
    assert model_problems(gpu(["rollout.gpu_memory_utilization=0.95", "sync.bucket_mb=64"], path=GPU_70B),
                          SHAPE_70B) == []
    # Two engines sharing a GPU share what is left outside both of their shares.
    (key, message), = model_problems(gpu(["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=1",
                                          "rollout.gpu_memory_utilization=0.48"]), SHAPE_8B)
    assert key == "rollout.gpu_memory_utilization" and "for each of 2 engines" in message, message


def test_a_reference_that_cannot_fit_its_scorer_gpus_is_refused():
    """The 70B reference (141 GB in bf16) spread over its 4 GPUs fits; over 2 it does not."""
    assert model_problems(gpu(path=GPU_70B), SHAPE_70B) == []
    (key, message), = model_problems(gpu(["scorers.num_gpus=2", "rollout.num_engines=4"], path=GPU_70B), SHAPE_70B)
    assert key == "scorers.num_gpus"
    assert message == ("2 GPU(s) of 80 GB hold 128 GB of frozen weights (0.8 of each; the rest is for activations) "
                       "but the reference, the policy's shape in bfloat16, has 141 GB: give each scorer at least 3 GPUs "
                       "(its layers are spread over them)")
