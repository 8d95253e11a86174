"""Learner actors: one Ray actor per DeepSpeed rank, for the policy and for the critic.

Thin by design: each wraps one DeepSpeed engine and exposes a few verbs (forward scores, one
optimiser step on a shard, save, send weights). Which batch, how many epochs and what to do with
the results is the driver's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch

from rlhf_ray import algo
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring
from rlhf_ray.models.lora import LoraSettings
from rlhf_ray.platform import detect, gpu_uuid


@dataclass(frozen=True)
class LearnerSpec:
    """What every rank of a learner group needs to build its engine (plain values only)."""

    model_path: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    lr: float
    weight_decay: float
    grad_clip: float
    micro_batch_size: int
    grad_accum_steps: int
    bf16: bool
    backend: str
    seed: int
    dtype: str = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None  # None: every parameter trains


class _LearnerBase:
    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        from rlhf_ray.engines.deepspeed_strategy import DeepSpeedStrategy

        self.platform = detect(spec.backend)
        self.platform.apply_env()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.strategy = DeepSpeedStrategy(
            zero_stage=spec.zero_stage,
            offload_optimizer=spec.offload_optimizer,
            offload_params=spec.offload_params,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            grad_clip=spec.grad_clip,
            micro_batch_size=spec.micro_batch_size,
            grad_accum_steps=spec.grad_accum_steps,
            bf16=spec.bf16,
            gradient_checkpointing=spec.gradient_checkpointing,
            lora=spec.lora,
            backend=spec.backend,
            seed=spec.seed,
        )
        self.strategy.init_distributed(rank, world_size, master_addr, master_port)
        torch.manual_seed(spec.seed)
        with self.strategy.model_init():  # ZeRO-3: each rank loads only its shard
            model = self.build_model()
        self.engine = self.strategy.prepare(model)
        self.device = torch.device(self.platform.device)  # under Ray, the one accelerator this actor sees

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def platform_name(self) -> str:
        """``cpu`` or ``cuda``: ``backend`` as this rank resolved it, where its devices are."""
        return self.platform.name

    def free_port(self) -> int:
        from rlhf_ray.ports import free_port

        return free_port()

    def _train_on(self, shard: RolloutBatch | tuple[RolloutBatch, ...], loss_fn) -> dict[str, float]:
        """One optimiser step over the shard. Every rank runs exactly ``grad_accum_steps``
        backward passes, so the gradient all-reduce lines up across ranks even when shards
        differ by a row. A tuple of batches (chosen and rejected; rollouts and ptx text) is split
        into micro-batches together, row-aligned. Each micro-batch drops its all-padding columns
        first (exact: same loss, less compute)."""
        self.engine.train()
        totals: dict[str, float] = {}
        n = self.spec.grad_accum_steps
        if isinstance(shard, tuple):
            micro = [tuple(b.trimmed().to(self.device) for b in mbs) for mbs in zip(*(b.chunk(n) for b in shard))]
        else:
            micro = [mb.trimmed().to(self.device) for mb in shard.chunk(n)]
        skipped_before = self.engine.skipped_steps
        for mb in micro:
            loss, stats = loss_fn(mb)
            self.strategy.backward(loss, self.engine)
            self.strategy.step(self.engine)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro)
        # DeepSpeed refuses an optimiser step whose gradient norm is not finite (the weights stay
        # as they were); the driver counts such steps as skipped non-finite batches.
        totals["skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        return self.strategy.all_reduce_mean(totals)

    def save(self, out_dir: str) -> None:
        self.strategy.save_hf(self.engine, self.tokenizer, out_dir)

    def save_checkpoint(self, out_dir: str) -> None:
        """Resumable state (weights, optimizer, RNG); every rank of the group takes part."""
        self.strategy.save_checkpoint(self.engine, out_dir)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        self.strategy.load_checkpoint(self.engine, ckpt_dir)

    def pid(self) -> int:
        return os.getpid()


class WeightSyncSource:
    """The sending side's set-up verbs, which the driver's ``open_weight_sync`` calls; only rank 0
    sends. The host class provides ``rank``, ``platform`` and ``node_ip()``."""

    weight_sender = None  # rank 0's WeightSender (broadcast, shared memory)
    ipc_sender = None  # every rank's IpcSender, to the engine on its device (rollout.colocate)

    def device_uuid(self) -> str | None:
        return gpu_uuid()

    def create_weight_segment(self, manifest: dict) -> str:
        """Rank 0 makes the shared-memory segment that engines on its node map before joining;
        returns its path. Comes before ``open_weight_sync`` when any engine uses shared memory."""
        self._new_weight_sender()
        return self.weight_sender.create_segment(manifest)

    def open_weight_sync(self, master_port: int, world_size: int, shm_world_size: int = 1) -> str:
        """Rank 0 opens the broadcast group (``world_size``) and the shared-memory group
        (``shm_world_size``) as their master; returns the address engines join."""
        address = self.node_ip()
        if self.rank == 0:
            if shm_world_size <= 1:
                self._new_weight_sender()
            self.weight_sender.open(address, master_port, world_size, self.platform.dist_backend,
                                    shm_world_size=shm_world_size)
        return address

    def open_colocated_sync(self, master_port: int, slot_bytes: int, peer: str) -> str:
        """Every rank (``rollout.colocate``): hosts the store on ``master_port`` and publishes two
        slots of ``slot_bytes`` on its device for ``peer``, the engine that shares that device
        (``rlhf_ray.sync.ipc``); returns the address it joins. ``wait_colocated_joined`` follows."""
        from rlhf_ray.sync.group import device_for, open_store
        from rlhf_ray.sync.ipc import IpcSender

        self._new_weight_sender(colocated=True)
        address = self.node_ip()
        self.ipc_sender = IpcSender(open_store(address, master_port, True), slot_bytes,
                                    device_for(self.platform.dist_backend), peer)
        return address

    def wait_colocated_joined(self) -> None:
        self.ipc_sender.wait_joined()

    def _new_weight_sender(self, colocated: bool = False) -> None:
        from rlhf_ray.sync.sender import WeightSender

        for previous in (self.weight_sender, self.ipc_sender):
            if previous is not None:
                previous.close()
        self.weight_sender = None if colocated else WeightSender()
        self.ipc_sender = None  # its slots go with it


class PolicyLearnerActor(WeightSyncSource, _LearnerBase):
    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        from rlhf_ray.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(spec.model_path, trust_remote_code=spec.trust_remote_code)
        super().__init__(spec, rank, world_size, master_addr, master_port)

    def build_model(self) -> torch.nn.Module:
        from rlhf_ray.models.loading import load_causal_lm

        return load_causal_lm(self.spec.model_path, dtype=self.spec.dtype,
                              trust_remote_code=self.spec.trust_remote_code)

    def logprobs(self, shard: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy) of the shard's responses under the current policy."""
        self.engine.eval()
        return scoring.batched_logprobs(self.engine, shard, self.spec.micro_batch_size, temperature)

    def train_step(self, shard: RolloutBatch, loss: algo.PolicyLossSpec, entropy_coef: float,
                   temperature: float, ptx: RolloutBatch | None = None, ptx_coef: float = 0.0,
                   distill_coef: float = 0.0, distill_kl: str = "k2") -> dict[str, float]:
        """One optimiser step of the policy objective (``loss``: PPO's clipped surrogate, GSPO or
        CISPO) on this rank's shard of a minibatch.
        The shard carries ``old_logprobs`` and ``advantages`` in its extras (and ``ref_logprobs``
        for the distillation term). The alignment-tax terms, both optional: ``ptx_coef`` times the
        language-model loss on ``ptx`` (text rows, as many as the shard's), ``distill_coef`` times
        KL(policy || reference) on the shard's tokens."""

        def loss_fn(rows: RolloutBatch | tuple[RolloutBatch, RolloutBatch]):
            mb, ptx_mb = rows if ptx is not None else (rows, None)
            total, stats = policy_objective(self.engine, mb, loss, entropy_coef, temperature, distill_coef, distill_kl)
            if ptx_mb is not None:
                # Plain language modelling: the model's own distribution, no sampling temperature.
                ptx_loss = algo.language_model_loss(scoring.response_logprobs(self.engine, ptx_mb),
                                                    ptx_mb.response_mask)
                total = total + ptx_coef * ptx_loss
                stats["ptx_loss"] = ptx_loss.item()
            return total, stats

        return self._train_on(shard if ptx is None else (shard, ptx), loss_fn)

    @torch.no_grad()
    def greedy_tokens(self, shard: RolloutBatch, tie_atol: float = 0.0) -> torch.Tensor:
        """The learner's argmax token at every response position, teacher-forced on the shard's
        responses (an engine's greedy ones), ``[B, R]``: equal to a greedy response token for token
        exactly when greedy decoding agrees. Where the learner scores the shard's own token within
        ``tie_atol`` of its top logit, that token: a near-tie the kernels may break either way."""
        from rlhf_ray.sync.parity import tie_tolerant_argmax

        self.engine.eval()
        shard = shard.to(self.device)
        return tie_tolerant_argmax(scoring.response_logits(self.engine, shard), shard.responses, tie_atol).cpu()

    def sft_step(self, shard: RolloutBatch) -> dict[str, float]:
        """One optimiser step of next-token loss on the response tokens only (prompt masked)."""

        def loss_fn(mb: RolloutBatch):
            loss = algo.language_model_loss(scoring.response_logprobs(self.engine, mb), mb.response_mask)
            return loss, {"sft_loss": loss.item()}

        return self._train_on(shard, loss_fn)

    def sft_eval_loss(self, shard: RolloutBatch) -> tuple[float, float]:
        """(summed response-token loss, token count) of the shard, for a held-out mean."""
        logprobs, _ = self.logprobs(shard, 1.0)
        return float(-(logprobs * shard.response_mask).sum()), float(shard.response_mask.sum())

    def sequence_logprobs(self, shard: RolloutBatch) -> torch.Tensor:
        """Each row's summed response log-probs ``[B]`` under the current policy (no gradients):
        DPO's reference pass before the first step and its held-out evaluation."""
        self.engine.eval()
        return scoring.batched_sequence_logprobs(self.engine, shard, self.spec.micro_batch_size)

    def dpo_step(self, chosen: RolloutBatch, rejected: RolloutBatch, beta: float, kind: str,
                 label_smoothing: float) -> dict[str, float]:
        """One optimiser step of DPO on this rank's shard of preference pairs: ``chosen`` and
        ``rejected`` are row-aligned and each carries the frozen reference's sequence log-probs in
        its ``ref_logps`` extra (``[B]``, computed once before training)."""
        return self._train_on((chosen, rejected),
                              lambda pair: dpo_pair_loss(self.engine, *pair, beta, kind, label_smoothing))

    # --- weight sync (driver sets it up; every rank takes part in the gather) ---------------
    def weight_manifest(self, bucket_bytes: int, engine_dtype: str) -> dict:
        from rlhf_ray.sync.manifest import build_manifest

        # Base-model names and full shapes (merged weights under LoRA), as send_weights yields them,
        # in the engines' dtype (bf16 mixed precision keeps fp32 weights here; engines run bf16).
        return build_manifest(self.strategy.weight_specs(self.engine), bucket_bytes, wire_dtype=engine_dtype)

    def send_weights(self, manifest) -> None:
        tensors = self.strategy.full_named_parameters(self.engine)  # collective under ZeRO-3
        if self.ipc_sender is not None:  # colocated: every rank hands the weights to its own engine
            self.ipc_sender.send(tensors, manifest)
        elif self.rank == 0:
            self.weight_sender.send(tensors, manifest)
        else:
            for _ in tensors:  # take part in the gathers, send nothing
                pass


def policy_objective(model, mb: RolloutBatch, loss: algo.PolicyLossSpec, entropy_coef: float, temperature: float,
                     distill_coef: float = 0.0, distill_kl: str = "k2") -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's loss on one micro-batch, and its stats: the ``loss`` surrogate minus the
    entropy bonus, plus ``distill_coef`` times KL(policy || reference). Every term reads only the
    tokens the policy generated (``response_mask``): the observed tokens of multi-turn rows get
    no gradient."""
    logprobs, entropy = scoring.response_logprobs(model, mb, temperature, with_entropy=True)
    out = algo.policy_loss(loss, logprobs, mb.extras["old_logprobs"], mb.extras["advantages"], mb.response_mask,
                           mb.extras.get("is_weights"))
    entropy_mean = algo.masked_mean(entropy, mb.response_mask)
    total = out.loss - entropy_coef * entropy_mean
    stats = {"policy_loss": out.loss.item(), "clip_fraction": out.clip_fraction.item(),
             "approx_kl": out.approx_kl.item(), "entropy": entropy_mean.item()}
    if distill_coef:
        distill = algo.kl_penalty_loss(logprobs, mb.extras["ref_logprobs"], mb.response_mask, distill_kl, loss.agg,
                                       loss.norm_len)
        total = total + distill_coef * distill
        stats["distill_loss"] = distill.item()
    return total, stats


def dpo_pair_loss(model, chosen: RolloutBatch, rejected: RolloutBatch, beta: float, kind: str,
                  label_smoothing: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss of ``model`` (with gradients) on row-aligned preference pairs whose batches each
    carry the reference's sequence log-probs in their ``ref_logps`` extra, and its metrics."""
    out = algo.dpo_loss(scoring.sequence_logprobs(model, chosen), scoring.sequence_logprobs(model, rejected),
                        chosen.extras["ref_logps"], rejected.extras["ref_logps"], beta, kind, label_smoothing)
    return out.loss, dpo_metrics(out)


def dpo_metrics(out: algo.DPOOutput) -> dict[str, float]:
    """DPO's loss and its implicit rewards: the share of pairs whose chosen response earns more
    (reward accuracy: by more than the rewards' float noise), the mean gap (margin) and the mean
    reward of each side."""
    return {"dpo_loss": out.loss.item(),
            "dpo_accuracy": algo.preference_accuracy(out.chosen_rewards, out.rejected_rewards, out.reward_noise).item(),
            "dpo_margin": (out.chosen_rewards - out.rejected_rewards).mean().item(),
            "dpo_chosen_reward": out.chosen_rewards.mean().item(),
            "dpo_rejected_reward": out.rejected_rewards.mean().item()}


class CriticLearnerActor(_LearnerBase):
    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        from rlhf_ray.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(spec.model_path, trust_remote_code=spec.trust_remote_code)
        super().__init__(spec, rank, world_size, master_addr, master_port)

    def build_model(self) -> torch.nn.Module:
        from rlhf_ray.models.heads import ValueModel

        return ValueModel.from_base(self.spec.model_path, dtype=self.spec.dtype,
                                    trust_remote_code=self.spec.trust_remote_code)

    def values(self, shard: RolloutBatch) -> torch.Tensor:
        self.engine.eval()
        return scoring.batched_values(self.engine, shard, self.spec.micro_batch_size)

    def train_step(self, shard: RolloutBatch, value_clip_eps: float, loss_agg: str,
                   norm_len: float | None = None) -> dict[str, float]:
        def loss_fn(mb: RolloutBatch):
            values = scoring.response_values(self.engine, mb)
            out = algo.ppo_value_loss(values, mb.extras["old_values"], mb.extras["returns"],
                                      mb.response_mask, value_clip_eps, loss_agg, norm_len)
            return out.loss, {"value_loss": out.loss.item(), "value_clip_fraction": out.clip_fraction.item()}

        return self._train_on(shard, loss_fn)


class RewardLearnerActor(_LearnerBase):
    """Trains a scalar-head reward model on preference pairs (Bradley-Terry with margin)."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        from rlhf_ray.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(spec.model_path, trust_remote_code=spec.trust_remote_code)
        super().__init__(spec, rank, world_size, master_addr, master_port)

    def build_model(self) -> torch.nn.Module:
        from rlhf_ray.models.heads import RewardModel

        return RewardModel.from_base(self.spec.model_path, dtype=self.spec.dtype,
                                     trust_remote_code=self.spec.trust_remote_code)

    def _scores(self, batch: RolloutBatch) -> torch.Tensor:
        return self.engine(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids()).float()

    def train_step(self, chosen: RolloutBatch, rejected: RolloutBatch, margin: float,
                   margin_weight: float) -> dict[str, float]:
        def loss_fn(pair: tuple[RolloutBatch, RolloutBatch]):
            sc, sr = self._scores(pair[0]), self._scores(pair[1])
            loss = algo.bradley_terry_loss(sc, sr, margin=margin, margin_weight=margin_weight)
            return loss, {"rm_loss": loss.item(), "rm_accuracy": algo.preference_accuracy(sc, sr).item(),
                          "rm_margin": (sc - sr).mean().item()}

        return self._train_on((chosen, rejected), loss_fn)

    def scores(self, batch: RolloutBatch) -> torch.Tensor:
        self.engine.eval()
        return scoring.batched_scores(self.engine, batch, self.spec.micro_batch_size)
