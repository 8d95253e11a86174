"""Weight sync learner -> rollout: bucket plans, the broadcast and shared-memory transports, the
transport plan, parity checks, and two real vLLM engines in Ray actors fed by a sender actor that
changes its weights, over broadcast, shared memory and a mix of both."""

from __future__ import annotations

import os
import threading

import pytest
import ray
import torch

from rlhf_ray.actors.learner import WeightSyncSource
from rlhf_ray.platform import detect
from rlhf_ray.ports import free_port
from rlhf_ray.sync import (
    WeightSender,
    WeightSyncParityError,
    build_manifest,
    check_greedy_parity,
    check_parity,
    manifest_for,
    parity_tolerance,
    rank_layout,
    shm,
    tie_tolerant_argmax,
)
from rlhf_ray.sync import manifest as mf
from rlhf_ray.sync.group import open_group, plan_sync

# Two ranks inside this process share host memory: the CPU platform's backend, on any machine.
HOST_BACKEND = detect("cpu").dist_backend

# --- bucket plans, transport and parity without vLLM ---------------------------------------------


def test_buckets_respect_size_and_order():
    specs = [
        ("a", "float32", [10]),
        ("b", torch.float32, [10]),
        ("big", "float32", [1000]),
        ("c", "bfloat16", [3]),
    ]
    man = build_manifest(specs, bucket_bytes=200)
    # 4000 bytes of "big" in parts of 50 elements, each part a bucket of its own: no buffer on
    # either side is ever larger than a bucket.
    assert [[t["name"] for t in b["tensors"]] for b in man["buckets"]] == [["a", "b"], *[["big"]] * 20, ["c"]]
    parts = [t["part"] for b in man["buckets"][1:21] for t in b["tensors"]]
    assert parts == [[s, s + 50] for s in range(0, 1000, 50)]
    assert all(t["offset"] % mf.ALIGN == 0 for b in man["buckets"] for t in b["tensors"])
    assert all(b["nbytes"] <= 200 for b in man["buckets"])
    assert man["total_bytes"] == 104 + 4000 + 6
    assert mf.names(man) == ["a", "b", "big", "c"]


def test_floating_tensors_travel_in_the_engines_dtype():
    """fp32 learner weights to a bf16 engine: bf16 on the wire (half the bytes); integer
    tensors keep their dtype."""
    specs = [("w", torch.float32, [8, 4]), ("steps", torch.int64, [3]), ("h", "bfloat16", [2])]
    man = build_manifest(specs, wire_dtype="bfloat16")
    assert [t["dtype"] for b in man["buckets"] for t in b["tensors"]] == ["bfloat16", "int64", "bfloat16"]
    assert man["total_bytes"] < build_manifest(specs)["total_bytes"]
    up = build_manifest(specs, wire_dtype=torch.float32)
    assert [t["dtype"] for b in up["buckets"] for t in b["tensors"]] == ["float32", "int64", "float32"]


def receive_by_broadcast(port: int, man: dict, syncs: int, out: list) -> None:
    """A receiver thread (rank 1 of 2) of the broadcast transport: one dict of clones per sync."""
    group = open_group("127.0.0.1", port, 1, 2, HOST_BACKEND)

    def arrived():
        for i, bucket in enumerate(man["buckets"]):
            buf = torch.empty(bucket["nbytes"], dtype=torch.uint8)
            group.broadcast(buf).wait()
            yield i, buf

    for _ in range(syncs):
        out.append({n: t.clone() for n, t in mf.tensors_of(arrived(), man)})


def test_transport_roundtrip_in_host_memory():
    """Sender and receiver in two threads of this process: every byte arrives, across buckets,
    dtypes, a wire dtype cast, and buffer reuse over two syncs."""
    tensors = {
        "w": torch.randn(33, 7),
        "step": torch.arange(5),
        "half": torch.randn(100, 3).bfloat16(),
        "scalar": torch.tensor(2.5),
    }
    man = manifest_for(tensors.items(), bucket_bytes=256)
    assert any("part" in t for b in man["buckets"] for t in b["tensors"])  # "w" travels in parts
    port, received = free_port(), []

    worker = threading.Thread(target=receive_by_broadcast, args=(port, man, 2, received))
    worker.start()
    sender = WeightSender()
    sender.open("127.0.0.1", port, 2, HOST_BACKEND, timeout=30)
    assert sender.send(tensors.items(), man) == man["total_bytes"]
    tensors["w"] += 1
    sender.send(tensors.items(), man)
    worker.join(timeout=30)
    assert len(received) == 2
    assert all(torch.equal(received[1][k], v) for k, v in tensors.items())
    assert torch.equal(received[0]["w"] + 1, received[1]["w"])


def group_pair(timeout_s: float = 300.0):
    """(port, learner rank 0, engine rank 1) of a two-rank host group; the learner joins from a thread."""
    port, learner = free_port(), {}
    joining = threading.Thread(target=lambda: learner.update(
        group=open_group("127.0.0.1", port, 0, 2, HOST_BACKEND, timeout_s=timeout_s)))
    joining.start()
    engine = open_group("127.0.0.1", port, 1, 2, HOST_BACKEND, timeout_s=timeout_s)
    joining.join()
    return port, learner["group"], engine


def test_a_sender_that_goes_silent_ends_the_receive_with_an_error_naming_it():
    """Every wait of a sync has the group's timeout, and the error says between whom, not gloo's
    bare "Timed out waiting ... for recv operation"."""
    port, _learner, engine = group_pair(timeout_s=1.0)
    with pytest.raises(RuntimeError, match=r"weight sync: bucket 0 of 3 between engine worker 1 and learner "
                                           rf"rank 0 \(127.0.0.1:{port}\) of group 'weights' failed or timed out"):
        engine.wait(engine.broadcast(torch.zeros(4)), "bucket 0 of 3")  # the learner never sends


def test_closing_a_group_tears_it_down_and_its_members_can_form_a_new_one():
    """An engine re-joining after a replacement aborts its old communicators instead of dropping
    them (NCCL's would hold their buffers and threads); the same processes then form a new group."""
    _, learner, engine = group_pair(timeout_s=2.0)
    for group in (engine, learner):
        group.close()
    with pytest.raises(RuntimeError, match="a broadcast on a closed group"):  # an error, never a hang
        learner.wait(learner.broadcast(torch.zeros(1)), "a broadcast on a closed group")
    _, learner, engine = group_pair()
    sent, got = torch.arange(5.0), torch.zeros(5)
    work = learner.broadcast(sent)
    engine.wait(engine.broadcast(got), "a broadcast on the new group")
    learner.wait(work, "a broadcast on the new group")
    assert torch.equal(got, sent)


def test_shared_memory_and_broadcast_from_one_pack():
    """One sender, a shared-memory receiver and a broadcast receiver (threads of this process):
    both get every byte over two syncs, and no segment name outlives the group's formation."""
    tensors = {"w": torch.randn(40, 9), "b": torch.randn(300).bfloat16(), "n": torch.arange(7)}
    man = manifest_for(tensors.items(), bucket_bytes=512)
    assert len(man["buckets"]) > 2
    port, received = free_port(), {"shm": [], "broadcast": []}
    sender = WeightSender()
    path = sender.create_segment(man)
    assert os.path.basename(path) in shm.segment_names()

    def receive_shm():
        segment = shm.map_segment(path)
        group = open_group("127.0.0.1", port, 1, 2, HOST_BACKEND, name="shm")
        offsets = shm.bucket_offsets(man)

        def arrived():
            for i, (bucket, off) in enumerate(zip(man["buckets"], offsets)):
                group.broadcast(torch.zeros(1, dtype=torch.int64)).wait()  # "bucket packed"
                yield i, segment[off : off + bucket["nbytes"]]

        for _ in range(2):
            received["shm"].append({n: t.clone() for n, t in mf.tensors_of(arrived(), man)})

    workers = [
        threading.Thread(target=receive_shm),
        threading.Thread(target=receive_by_broadcast, args=(port, man, 2, received["broadcast"])),
    ]
    for w in workers:
        w.start()
    sender.open("127.0.0.1", port, 2, HOST_BACKEND, timeout=30, shm_world_size=2)
    assert shm.segment_names() == set()  # mapped by everyone, so the name is gone already
    sender.send(tensors.items(), man)
    tensors["w"] += 1
    sender.send(tensors.items(), man)
    for w in workers:
        w.join(timeout=30)
    for got in received.values():
        assert len(got) == 2
        assert all(torch.equal(got[1][k], v) for k, v in tensors.items())
        assert torch.equal(got[0]["w"] + 1, got[1]["w"])
    with pytest.raises(ValueError, match="outgrew"):
        sender.send(tensors.items(), manifest_for([("big", torch.zeros(10_000))]))
    sender.close()
    assert shm.segment_names() == set()


def test_transport_plan():
    # auto: shared memory for the engines on the learner's node, broadcast for the others
    mixed = plan_sync("auto", [True, False, True], 2, shm_supported=True)
    assert mixed.uses_shm == [True, False, True]
    assert (mixed.shm_world, mixed.broadcast_world) == (5, 3)
    assert mixed.rank_offsets == [1, 1, 3]
    assert mixed.engine_group(1) == {"world_size": 3, "rank_offset": 1, "shm": False}
    assert plan_sync("auto", [True, True], 1, shm_supported=True).broadcast_world == 1
    assert plan_sync("broadcast", [True, True], 1, shm_supported=True).uses_shm == [False, False]
    # the CUDA platform hands no host memory over: auto falls back to broadcast, shm is refused
    assert plan_sync("auto", [True], 1, shm_supported=False).uses_shm == [False]
    with pytest.raises(ValueError, match="sync.transport=shm"):
        plan_sync("shm", [True], 1, shm_supported=False)
    with pytest.raises(ValueError, match=r"engines \[1\]"):
        plan_sync("shm", [True, False], 1, shm_supported=True)
    with pytest.raises(ValueError, match="sync.transport"):
        plan_sync("nccl", [True], 1, shm_supported=True)


def test_send_rejects_tensors_out_of_manifest_order():
    sender = WeightSender()
    sender.group = open_group("127.0.0.1", free_port(), 0, 1, HOST_BACKEND)  # a world of one
    tensors = [("a", torch.zeros(2)), ("b", torch.zeros(2))]
    with pytest.raises(ValueError, match="order"):
        sender.send(reversed(tensors), manifest_for(tensors))
    with pytest.raises(ValueError, match="fewer tensors than the manifest lists: nothing for 'b'"):
        sender.send(tensors[:1], manifest_for(tensors))
    with pytest.raises(ValueError, match="more tensors"):
        sender.send(tensors, manifest_for(tensors[:1]))


def test_parity_report_and_errors():
    report = check_parity([[-1.0, -2.0], [-0.5]], [[-1.0, -2.0005], [-0.5]], atol=1e-3)
    assert report.ok and report.num_tokens == 3 and abs(report.max_abs_diff - 5e-4) < 1e-9
    masked = check_parity(
        torch.tensor([[0.0, -9.0]]), torch.tensor([[0.0, 0.0]]), mask=torch.tensor([[1, 0]])
    )
    assert masked.ok and masked.num_tokens == 1
    with pytest.raises(WeightSyncParityError, match="differ"):
        check_parity([[-1.0]], [[-1.1]], atol=1e-3)
    with pytest.raises(ValueError):
        check_parity([[-1.0, -1.0]], [[-1.0]])
    assert check_greedy_parity([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    with pytest.raises(WeightSyncParityError, match="position 1"):
        check_greedy_parity([[1, 2, 3]], [[1, 4, 3]])


def test_parity_tolerance_by_dtype_passes_kernel_noise_and_catches_a_broken_sync():
    """bf16: a per-token gap of a few hundredths (vLLM's kernels vs HF's) and one near-tie that
    parts greedy decoding half-way pass; a stale or shuffled bucket (nats everywhere) does not."""
    bf16, fp32 = parity_tolerance("bfloat16"), parity_tolerance("float32")
    gen = torch.Generator().manual_seed(0)
    learner = -torch.rand(4, 16, generator=gen) * 3
    kernel_noise = learner + torch.randn(4, 16, generator=gen) * 0.03
    report = check_parity(learner, kernel_noise, atol=bf16.max_abs, mean_atol=bf16.mean_abs)
    assert report.ok and report.mean_abs_diff > fp32.mean_abs  # fp32's tolerance would stop it
    with pytest.raises(WeightSyncParityError):
        check_parity(learner, kernel_noise, atol=fp32.max_abs, mean_atol=fp32.mean_abs)
    broken = learner + torch.randn(4, 16, generator=gen).abs() * 0.8  # a stale or shuffled bucket
    with pytest.raises(WeightSyncParityError, match="mean"):
        check_parity(learner, broken, atol=bf16.max_abs, mean_atol=bf16.mean_abs)
    near_tie = [[5, 6, 7, 8], [5, 6, 9, 9]]  # row 2 parts at its third token
    assert check_greedy_parity(near_tie, [[5, 6, 7, 8], [5, 6, 7, 8]], bf16.greedy_agreement) == 0.75
    with pytest.raises(WeightSyncParityError, match="agreement 0.75"):
        check_greedy_parity(near_tie, [[5, 6, 7, 8], [5, 6, 7, 8]], fp32.greedy_agreement)
    with pytest.raises(WeightSyncParityError, match="agreement 0.00"):
        check_greedy_parity([[1, 2], [3, 4]], [[9, 9], [9, 9]], bf16.greedy_agreement)


def test_a_near_tie_is_no_greedy_disagreement_in_float32():
    """float32 asks for every greedy token, but two top logits millionths apart are broken one way
    by one summation order (an engine's kernels, another CPU's) and the other way by another: the
    learner's teacher-forced argmax takes the engine's token where it scores within the tie
    tolerance of the learner's top logit, and only there."""
    fp32 = parity_tolerance("float32")
    logits = torch.tensor([[[2.0, 2.0 - 3e-6, -1.0], [0.5, 1.0, 0.9], [0.0, 3.0, 2.0], [1.0, 1.0, 0.0]]])
    engine = torch.tensor([[1, 1, 2, 1]])  # a near-tie, the argmax, a token 1.0 behind, an exact tie
    assert tie_tolerant_argmax(logits, engine).tolist() == [[0, 1, 1, 1]]  # exact ties only
    learner = tie_tolerant_argmax(logits, engine, fp32.greedy_tie_atol)
    assert learner.tolist() == [[1, 1, 1, 1]]  # the real disagreement stays
    with pytest.raises(WeightSyncParityError, match="position 2"):
        check_greedy_parity(learner.tolist(), engine.tolist(), fp32.greedy_agreement)
    assert check_greedy_parity(tie_tolerant_argmax(logits[:, :2], engine[:, :2], fp32.greedy_tie_atol).tolist(),
                               engine[:, :2].tolist(), fp32.greedy_agreement) == 1.0
    # The tolerance is far below what a stale or shuffled bucket moves (nats); the sync.parity_* keys
    # leave it alone, and bf16/fp16 keep exact ties only (their agreement lets half of a row part).
    assert fp32.greedy_tie_atol == 1e-4 and parity_tolerance("float32", 0.5, 0.1, 0.9).greedy_tie_atol == 1e-4
    assert parity_tolerance("bfloat16").greedy_tie_atol == parity_tolerance("float16").greedy_tie_atol == 0.0


def test_the_learners_greedy_tokens_take_the_engines_token_only_at_a_near_tie(tiny_model_dir):
    """``greedy_tokens`` on the tiny model, teacher-forced on its own greedy answer with one token
    swapped for the runner-up: the runner-up comes back where the tie tolerance covers its gap."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from rlhf_ray.actors.learner import PolicyLearnerActor
    from rlhf_ray.data.batch import RolloutBatch
    from rlhf_ray.engines import scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    learner = SimpleNamespace(engine=model, device=torch.device("cpu"))
    prompt = [1, 10, 11, 12, 13]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    batch = RolloutBatch.from_token_lists([prompt], [greedy], pad_id=0)
    tie = parity_tolerance("float32").greedy_tie_atol  # generate() and the teacher-forced pass sum differently
    assert PolicyLearnerActor.greedy_tokens(learner, batch, tie)[0].tolist() == greedy
    with torch.no_grad():
        top2 = scoring.response_logits(model, batch)[0, -1].topk(2)
    gap = (top2.values[0] - top2.values[1]).item()
    assert gap > 2 * tie
    runner_up = greedy[:-1] + [int(top2.indices[1])]  # the last token: nothing comes after it
    swapped = RolloutBatch.from_token_lists([prompt], [runner_up], pad_id=0)
    assert PolicyLearnerActor.greedy_tokens(learner, swapped, gap / 2)[0].tolist() == greedy
    assert PolicyLearnerActor.greedy_tokens(learner, swapped, gap * 2)[0].tolist() == runner_up


class Llama3RotaryEmbedding(torch.nn.Module):
    """What vLLM's Llama-3 rotary layer holds: a computed cos/sin cache, no parameter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.zeros(16, 4), persistent=False)


class TiedToy(torch.nn.Module):
    """An embedding and an output layer that holds the embedding's parameter, as vLLM ties them,
    and a rotary layer of Llama-3's class."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.rotary = Llama3RotaryEmbedding()
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_weight_aliases_are_the_later_holders_of_a_shared_parameter():
    from rlhf_ray.sync.vllm_worker import weight_aliases

    tied = TiedToy()
    assert weight_aliases(tied) == [tied.head]
    untied = TiedToy()
    untied.head.weight = torch.nn.Parameter(untied.embed.weight.detach().clone())
    assert weight_aliases(untied) == []


def test_only_the_expected_reload_warnings_are_dropped():
    """The rotary cache always, a tied head's and a computed layer's class (Llama-3's rotary) once
    they are named; any other still shows."""
    import logging

    from rlhf_ray.sync import vllm_worker

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        vllm_worker.quiet_known_reload_warnings()
        logger.warning("%s: Failed to load weights", "Linear")
        toy = TiedToy()
        assert vllm_worker.computed_layers(toy) == [toy.rotary]
        vllm_worker.quiet_known_reload_warnings([*vllm_worker.weight_aliases(toy),
                                                 *vllm_worker.computed_layers(toy)])  # again: one filter
        for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "QKVParallelLinear", "Linear", "Embedding"):
            logger.warning("%s: Failed to load weights", layer)
    finally:
        logger.removeHandler(handler)
    assert seen == ["Linear: Failed to load weights", "QKVParallelLinear: Failed to load weights",
                    "Embedding: Failed to load weights"]
    assert sum(isinstance(f, vllm_worker._ExpectedReloadWarnings) for f in logger.filters) == 1


def test_rank_layout():
    assert rank_layout(2, 1) == (3, [1, 2])
    assert rank_layout(3, 2) == (7, [1, 3, 5])


# --- two vLLM engines in Ray actors and a sender actor ---------------------------------------------

PROMPTS = [[1, 10, 11, 12], [1, 20, 21, 22, 23, 24], [1, 40]]


@ray.remote(num_cpus=1)
class PerturbingSender(WeightSyncSource):
    """Stands in for learner rank 0 (its sync set-up verbs included): an HF model whose weights
    change, pushed with WeightSender."""

    rank, platform = 0, detect("cpu")

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()

    def segment_names(self) -> set[str]:
        return shm.segment_names()

    @torch.no_grad()
    def perturb(self, seed: int, scale: float = 0.05) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)

    def manifest(self, bucket_bytes: int) -> dict:
        return manifest_for(self.model.state_dict().items(), bucket_bytes)

    def send(self, manifest: dict) -> int:
        return self.weight_sender.send(self.model.state_dict().items(), manifest)

    def send_with_a_shuffled_bucket(self, manifest: dict, bucket: int) -> int:
        """Failure injection: every tensor of one bucket arrives with its elements permuted (what a
        packing or offset bug does), the rest intact."""
        shuffled = {t["name"] for t in manifest["buckets"][bucket]["tensors"]}
        gen = torch.Generator().manual_seed(bucket)

        def permuted(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1)[torch.randperm(t.numel(), generator=gen)].reshape(t.shape)

        return self.weight_sender.send(((n, permuted(t) if n in shuffled else t)
                                        for n, t in self.model.state_dict().items()), manifest)

    @torch.no_grad()
    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """Through the learner's own scoring path: left-padded batch, position ids, temperature 1."""
        from rlhf_ray.data.batch import RolloutBatch
        from rlhf_ray.engines.scoring import response_logprobs

        batch = RolloutBatch.from_token_lists(prompts, responses, pad_id=0)
        return response_logprobs(self.model, batch), batch.response_mask

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return [
            self.model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model_dir):
    from rlhf_ray.actors.rollout import create_rollout_actors
    from rlhf_ray.engines.sampling import SamplingSpec

    sender = PerturbingSender.remote(tiny_model_dir)
    engines = create_rollout_actors(
        2,
        tiny_model_dir,
        tensor_parallel_size=1,
        num_cpus=1,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.3,
    )
    connect(sender, engines, plan_sync("broadcast", [True, True], 1, shm_supported=True))
    # Fixed responses to score: sampled once from the original weights.
    gens = ray.get(engines[0].generate.remote(PROMPTS, SamplingSpec(max_new_tokens=12, seed=0)))
    responses = [g.response_ids for g in gens]
    yield sender, engines, responses
    for actor in [sender, *engines]:
        ray.kill(actor)


def connect(sender, engines, layout, bucket_bytes: int = 1 << 20) -> None:
    """The driver's own set-up: learner rank 0 and every engine join at the same time. A shared-
    memory segment is sized for the manifest of ``bucket_bytes`` (smaller buckets take a little
    more: each starts aligned)."""
    from rlhf_ray.actors.rollout_pool import open_weight_sync

    open_weight_sync(sender, engines, ray.get(sender.manifest.remote(bucket_bytes)), layout, HOST_BACKEND)


def sync(sender, engines, bucket_bytes: int) -> dict:
    manifest = ray.get(sender.manifest.remote(bucket_bytes))
    sent, *received = ray.get(
        [sender.send.remote(manifest)] + [e.receive_weights.remote(manifest) for e in engines]
    )
    assert received == [sent] * len(engines)
    return manifest


def assert_parity(sender, engine, responses, atol=1e-4):
    learner, mask = ray.get(sender.logprobs.remote(PROMPTS, responses))
    scored = ray.get(engine.score.remote(PROMPTS, responses))
    engine_lp = torch.zeros_like(learner)
    for i, row in enumerate(scored):
        engine_lp[i, : len(row)] = torch.tensor(row)
    report = check_parity(learner, engine_lp, mask, atol=atol)
    check_greedy_parity(
        ray.get(sender.greedy.remote(PROMPTS, 10)), ray.get(engine.greedy.remote(PROMPTS, 10))
    )
    return report


@pytest.mark.slow
def test_engines_match_learner_before_any_change(cluster):
    sender, engines, responses = cluster
    for engine in engines:
        assert_parity(sender, engine, responses)


@pytest.mark.slow
def test_stale_engine_fails_parity(cluster):
    sender, engines, responses = cluster
    ray.get(sender.perturb.remote(seed=1))  # the learner moved; nothing was sent
    with pytest.raises(WeightSyncParityError):
        assert_parity(sender, engines[0], responses)


@pytest.mark.slow
def test_one_shuffled_bucket_fails_parity_even_at_bf16_tolerances(cluster):
    """The loose bf16 tolerances still catch a broken sync: one bucket of many arrives shuffled."""
    sender, engines, responses = cluster
    manifest = ray.get(sender.manifest.remote(40_000))
    middle = len(manifest["buckets"]) // 2
    ray.get([sender.send_with_a_shuffled_bucket.remote(manifest, middle)]
            + [e.receive_weights.remote(manifest) for e in engines])
    bf16 = parity_tolerance("bfloat16")
    learner, mask = ray.get(sender.logprobs.remote(PROMPTS, responses))
    scored = ray.get(engines[0].score.remote(PROMPTS, responses))
    engine_lp = torch.zeros_like(learner)
    for i, row in enumerate(scored):
        engine_lp[i, : len(row)] = torch.tensor(row)
    with pytest.raises(WeightSyncParityError):
        check_parity(learner, engine_lp, mask, atol=bf16.max_abs, mean_atol=bf16.mean_abs)
    sync(sender, engines, bucket_bytes=40_000)  # whole again, for the tests after this one
    assert_parity(sender, engines[0], responses)


@pytest.mark.slow
def test_sync_restores_parity_on_every_engine(cluster):
    sender, engines, responses = cluster
    ray.get(sender.perturb.remote(seed=2))
    manifest = sync(sender, engines, bucket_bytes=mf.DEFAULT_BUCKET_BYTES)
    assert len(manifest["buckets"]) == 1
    for engine in engines:
        assert_parity(sender, engine, responses)


@pytest.mark.slow
def test_many_small_buckets_and_buffer_reuse(cluster):
    """Buckets smaller than an MLP projection: q/k/v split across broadcasts, and each projection
    split into parts that vLLM's reload gets whole; a second sync with the same plan reuses the
    receive buffers."""
    sender, engines, responses = cluster
    for seed in (3, 4):
        ray.get(sender.perturb.remote(seed=seed))
        manifest = sync(sender, engines, bucket_bytes=40_000)
        for engine in engines:
            assert_parity(sender, engine, responses)
    assert len(manifest["buckets"]) > 10
    assert {t["name"] for b in manifest["buckets"] for t in b["tensors"] if "part" in t} >= {
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    assert max(b["nbytes"] for b in manifest["buckets"]) <= 40_000


@pytest.mark.slow
def test_auto_uses_shared_memory_on_one_node(cluster):
    """On one node, auto hands both engines the weights through shared memory; parity holds after
    syncs with one bucket and with many (buffer reuse), and no segment name is left behind."""
    from rlhf_ray.actors.rollout_pool import weight_sync_layout

    sender, engines, responses = cluster
    layout = weight_sync_layout(sender, engines, "auto", 1, detect("cpu"))
    assert layout.uses_shm == [True, True] and layout.broadcast_world == 1
    connect(sender, engines, layout, bucket_bytes=40_000)
    assert ray.get(sender.segment_names.remote()) == set()
    for seed, bucket_bytes in ((5, mf.DEFAULT_BUCKET_BYTES), (6, 40_000)):
        ray.get(sender.perturb.remote(seed=seed))
        sync(sender, engines, bucket_bytes)
        for engine in engines:
            assert_parity(sender, engine, responses)


@pytest.mark.slow
def test_mixed_shared_memory_and_broadcast(cluster):
    """Engine 0 on shared memory, engine 1 as if on another node (broadcast from the same pack)."""
    sender, engines, responses = cluster
    connect(sender, engines, plan_sync("auto", [True, False], 1, shm_supported=True), bucket_bytes=100_000)
    ray.get(sender.perturb.remote(seed=7))
    sync(sender, engines, bucket_bytes=100_000)
    for engine in engines:
        assert_parity(sender, engine, responses)


def test_an_engine_on_the_learners_gpu_is_found_by_uuid():
    """NCCL refuses two ranks on one GPU; processes name their devices by index differently, so
    the check compares UUIDs (None: a CPU process, never a clash)."""
    from rlhf_ray.sync.group import engines_on_sender_gpu

    engines = [["GPU-a", "GPU-b"], ["GPU-c"], [None]]
    assert engines_on_sender_gpu("GPU-b", engines) == [0]
    assert engines_on_sender_gpu("GPU-z", engines) == []
    assert engines_on_sender_gpu(None, [[None], [None]]) == []
