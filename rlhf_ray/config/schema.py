"""The typed config tree. One dataclass per section; every field has a default and a comment.

Plain dataclasses with no torch import, so the CLI validates a config in milliseconds before
any expensive work starts. Each section checks its own fields (``problems``); checks across
sections live in ``RunConfig.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from rlhf_ray.config.cluster_fit import plan_problems

Problem = tuple[str, str]  # (dotted config key, what is wrong with its value)


class _Problems(list):
    """The problems a check found; ``need(ok, key, msg)`` records one when ``ok`` is false."""

    def need(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            self.append((key, msg))

    def need_learning_rate(self, lr: float, key: str) -> None:
        # Above 1 no AdamW run trains: such a value is a typo (1e3 for 1e-3), not a choice.
        self.need(0 < lr <= 1, key, f"must be in (0, 1] (a learning rate); got {lr:g}")


def _stage_problems(name: str, epochs: int, lr: float, batch_size: int) -> list[Problem]:
    """What the supervised stages (sft, rm, dpo) share."""
    p = _Problems()
    p.need(epochs >= 1, f"{name}.epochs", "must be >= 1")
    p.need_learning_rate(lr, f"{name}.lr")
    p.need(batch_size >= 1, f"{name}.batch_size", "must be >= 1")
    return p


# Logical dataset fields a config may rename with data.fields (data/formats.py reads them).
REMAPPABLE_FIELDS = ("prompt", "response", "messages", "chosen", "rejected", "text")


@dataclass
class ModelConfig:
    # HF name or path of the starting policy; builtin:tiny builds one offline, and
    # builtin:smollm2-135m-instruct is a real chat model converted offline (rlhf-ray get-model)
    policy: str = "builtin:tiny"
    reward: list[str] = field(default_factory=list)  # reward model folders (an ensemble when >1)
    reward_combine: Literal["mean", "min"] = "mean"  # how an ensemble's scores are combined
    critic: str = ""  # critic init; empty = the policy checkpoint
    # weights and compute of every role (learners keep fp32 master weights with bf16)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # custom modelling code runs only when asked
    tiny_hidden_size: int = 128  # shape of builtin:tiny
    tiny_layers: int = 2  # decoder layers of builtin:tiny

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.tiny_hidden_size >= 32 and self.tiny_hidden_size % 32 == 0, "model.tiny_hidden_size",
               "must be a positive multiple of 32 (attention heads of size 32)")
        p.need(self.tiny_layers >= 1, "model.tiny_layers", "must be >= 1")
        return p


@dataclass
class DataConfig:
    task: str = ""  # a built-in task (arithmetic, multiplication) supplying data and a gold scorer; "" for none
    # PPO prompts: a file or dataset (else the task's); every column besides the prompt reaches
    # the reward functions as a keyword argument (scorers.reward_functions) and the agent's environment.
    prompts: str = ""
    # Held-out prompts of ppo.eval_every and rlhf-ray eval, read like data.prompts (their columns
    # reach the rewards alike): a file or dataset, or with data.eval_split that split of it (of
    # data.prompts when this is empty, e.g. eval_split: test for a hub dataset's test split).
    eval_prompts: str = ""
    eval_split: str = ""
    sft: str = ""  # SFT data: prompt+response rows or chat messages (else the task's demonstrations)
    preferences: str = ""  # preference pairs: prompt/chosen/rejected or HH-RLHF dialogues (else the task's)
    fields: dict[str, str] = field(default_factory=dict)  # remap field names, e.g. {prompt: question}
    on_bad_row: Literal["error", "skip"] = "error"  # skip = drop bad rows and report the count
    subset: str = ""  # hub datasets: the configuration (subset) name, e.g. main for openai/gsm8k
    split: str = "train"  # hub datasets and save_to_disk DatasetDict folders: the split to read
    prompt_overflow: Literal["truncate", "drop"] = "truncate"  # prompts over max_prompt_tokens
    max_prompt_tokens: int = 64  # longer prompts are truncated (from the left) or dropped: data.prompt_overflow
    max_seq_len: int = 128  # SFT / RM sequences (prompt + response) are cut to this many tokens
    eval_fraction: float = 0.1  # held-out share of SFT and preference data
    shuffle: bool = True  # PPO prompts in a seeded random order (else file order)
    num_prompts: int = 512  # built-in task: PPO prompts
    num_sft_examples: int = 2000  # built-in task: demonstrations
    sft_error_rate: float = 0.1  # built-in task: share of deliberately wrong demonstrations
    num_preference_pairs: int = 2000  # built-in task: preference pairs
    num_eval_prompts: int = 200  # held-out prompts evaluated (the task's, or at most this many of data.eval_prompts)

    @property
    def has_held_out_prompts(self) -> bool:
        """A held-out set is named (a file, a split of a dataset) or is the task's."""
        return bool(self.eval_prompts or (self.eval_split and self.prompts) or (self.task and not self.prompts))

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(not self.eval_split or bool(self.eval_prompts or self.prompts), "data.eval_split",
               "is a split of data.eval_prompts or data.prompts: give one of them")
        for name in self.fields:
            p.need(name in REMAPPABLE_FIELDS, f"data.fields.{name}",
                   f"not a remappable field; use one of {', '.join(REMAPPABLE_FIELDS)}")
        p.need(0 <= self.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
        p.need(0 <= self.sft_error_rate <= 1, "data.sft_error_rate", "must be in [0, 1]")
        p.need(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
        p.need(self.max_seq_len > self.max_prompt_tokens, "data.max_seq_len", "must exceed data.max_prompt_tokens")
        for key in ("num_prompts", "num_sft_examples", "num_preference_pairs"):
            p.need(getattr(self, key) >= 1, f"data.{key}", "must be >= 1")
        p.need(self.num_eval_prompts >= 0, "data.num_eval_prompts", "must be >= 0")
        return p


@dataclass
class SFTConfig:
    """Supervised fine-tuning; learner resources and ZeRO settings come from ``policy``."""

    epochs: int = 3  # passes over the demonstrations
    lr: float = 1e-3  # peak learning rate (AdamW)
    batch_size: int = 32  # rows per optimiser step, over all ranks

    def problems(self) -> list[Problem]:
        return _stage_problems("sft", self.epochs, self.lr, self.batch_size)


@dataclass
class RewardModelConfig:
    """Reward-model training; learner resources and ZeRO settings come from ``critic``."""

    epochs: int = 2  # passes over the preference pairs
    lr: float = 5e-4  # peak learning rate (AdamW)
    batch_size: int = 32  # preference pairs per optimiser step, over all ranks
    margin: float = 0.0  # the chapter's margin term: relu(margin - (chosen - rejected))
    margin_weight: float = 0.0  # weight of the margin term; 0 = plain Bradley-Terry
    ensemble_size: int = 1  # independently seeded reward models; PPO combines them
    normalize: bool = True  # shift/scale scores to mean 0, std 1 on a calibration set
    init: str = ""  # starting model; empty = the SFT output (or model.policy without SFT)

    def problems(self) -> list[Problem]:
        p = _Problems(_stage_problems("rm", self.epochs, self.lr, self.batch_size))
        p.need(self.ensemble_size >= 1, "rm.ensemble_size", "must be >= 1")
        p.need(self.margin >= 0, "rm.margin", "must be >= 0")
        p.need(self.margin_weight >= 0, "rm.margin_weight", "must be >= 0")
        return p


@dataclass
class DPOConfig:
    """Direct Preference Optimisation (Rafailov et al. 2023) on the preference pairs ``rm`` reads;
    learner resources, ZeRO and LoRA settings come from ``policy``, the frozen reference is the
    starting policy (model.policy: the SFT output in the pipeline)."""

    epochs: int = 2  # passes over the preference pairs
    lr: float = 1e-4  # peak learning rate (AdamW)
    batch_size: int = 32  # preference pairs per optimiser step, over all ranks
    beta: float = 0.1  # strength of the implicit KL to the reference: implicit reward = beta * log(pi / ref)
    kind: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's logistic loss; ipo: IPO's squared loss (Azar et al. 2023)
    label_smoothing: float = 0.0  # sigmoid only: assumed share of flipped labels (conservative DPO)

    def problems(self) -> list[Problem]:
        p = _Problems(_stage_problems("dpo", self.epochs, self.lr, self.batch_size))
        p.need(self.beta > 0, "dpo.beta", "must be > 0")
        p.need(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing",
               "must be in [0, 0.5) (at 0.5 chosen and rejected would be interchangeable)")
        p.need(self.kind == "sigmoid" or self.label_smoothing == 0, "dpo.label_smoothing",
               "applies to dpo.kind=sigmoid only (ipo's squared loss has no label-noise term)")
        return p


@dataclass
class PipelineConfig:
    """``rlhf-ray pipeline``: SFT, then the preference stage(s), then the eval table."""

    # ppo: SFT -> reward model -> PPO -> eval; dpo: SFT -> DPO -> eval (no reward model, no rollouts)
    method: Literal["ppo", "dpo"] = "ppo"


@dataclass
class RolloutConfig:
    num_engines: int = 2  # vLLM engines, scaled independently of the learners
    # vllm, or hf: transformers generate in the rollout actor, CPU only, for small models on few
    # cores where it outruns vLLM's CPU backend (benchmarks/bench_rollout.py measures both).
    engine: Literal["vllm", "hf"] = "vllm"
    tensor_parallel_size: int = 1  # workers per engine
    temperature: float = 1.0  # sampling temperature; learner log-probs use the same
    top_p: float = 1.0  # nucleus sampling; 1 = the whole vocabulary
    max_new_tokens: int = 16  # response length cap; longer responses are cut (truncated)
    # Response length floor: EOS and rollout.stop tokens cannot be sampled before it (vLLM's
    # min_tokens, transformers' min_new_tokens). 0 = none; for benchmarks that need long responses.
    min_new_tokens: int = 0
    samples_per_prompt: int = 1  # n responses per prompt (group size of grpo/rloo)
    stop: list[str] = field(default_factory=list)  # end-of-turn tokens besides EOS (each one token: <|im_end|>)
    gpu_memory_utilization: float = 0.3  # on CPU: share of host memory vLLM may reserve
    max_model_len: int = 256  # prompt + response positions per sequence; within the model's context
    enable_prefix_caching: bool = True  # reuse KV blocks of shared prompt prefixes (groups of samples)
    num_cpus: float = 1.0  # per engine
    num_gpus: float = 0.0  # per tensor-parallel worker
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per engine, e.g. {rollout: 1}
    # Elastic rollout: at each iteration boundary engines start on free rollout capacity (up to
    # max_engines) and engines on draining or dead nodes retire (a draining one down to min_engines).
    elastic: bool = False
    min_engines: int = 1  # elastic only: never retire a draining node's engine below this
    max_engines: int = 8  # elastic only: never start engines beyond this
    # Colocated hybrid engine: engine r shares policy rank r's bundle and GPU (num_engines =
    # policy.num_ranks, one worker each; rollout.num_gpus unused). On CUDA the engine sleeps while the
    # learners train and takes the weights through CUDA IPC; on CPU both stay resident (shared memory).
    colocate: bool = False

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.num_engines >= 1, "rollout.num_engines", "must be >= 1")
        p.need(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        p.need(self.temperature > 0, "rollout.temperature", "must be > 0 (sampling log-probs need it)")
        p.need(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        p.need(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        p.need(0 <= self.min_new_tokens <= self.max_new_tokens, "rollout.min_new_tokens",
               f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}]")
        p.need(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
        p.need(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        p.need(self.num_cpus >= 0 and self.num_gpus >= 0, "rollout.num_cpus", "resources must be >= 0")
        if self.elastic:
            p.need(1 <= self.min_engines <= self.num_engines, "rollout.min_engines",
                   f"must be in [1, rollout.num_engines={self.num_engines}] when rollout.elastic is on")
            p.need(self.max_engines >= self.num_engines, "rollout.max_engines",
                   f"must be >= rollout.num_engines={self.num_engines} when rollout.elastic is on")
        return p


@dataclass
class AgentConfig:
    """Multi-turn rollouts with tools (docs/agents.md): off while ``env`` is empty."""

    env: str = ""  # module:Class of an rlhf_ray.agents.Environment, or "task": data.task's own environment
    max_turns: int = 4  # policy turns per trajectory (rollout.max_new_tokens caps each one)
    max_tokens: int = 192  # response tokens per trajectory, generated and observed together
    tool_timeout_s: float = 10.0  # per tool call: past it the tool's process is killed, the policy told so
    tool_workers: int = 4  # tool calls running at once, each in its own process
    max_tool_output_chars: int = 1000  # a tool's output is cut to this many characters

    @property
    def enabled(self) -> bool:
        return bool(self.env)

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(not self.env or self.env == "task" or ":" in self.env, "agent.env",
               f"{self.env!r} is neither module:Class nor task")
        p.need(self.max_turns >= 1, "agent.max_turns", "must be >= 1")
        p.need(self.max_tokens >= 1, "agent.max_tokens", "must be >= 1")
        p.need(self.tool_timeout_s > 0, "agent.tool_timeout_s", "must be > 0")
        p.need(self.tool_workers >= 1, "agent.tool_workers", "must be >= 1")
        p.need(self.max_tool_output_chars >= 1, "agent.max_tool_output_chars", "must be >= 1")
        return p


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a learner: only adapters (and a critic's value head) train. Weight
    sync sends merged weights under the base model's names, so rollout engines need no LoRA.
    A saved model folder (e.g. ``<run_dir>/policy``) then holds the merged HF model, loadable by
    transformers, vLLM, ``eval`` and the next stage, plus the peft adapter in ``adapter/``; with
    save_merged off it holds only ``adapter/`` (load it with peft on top of the base model)."""

    rank: int = 0  # adapter rank r; 0 = off (every parameter trains)
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=list)  # module names, e.g. [q_proj, v_proj]; empty = every linear layer but the LM head
    save_merged: bool = True  # final saves also write the merged model (downstream stages need it)


@dataclass
class LearnerConfig:
    num_ranks: int = 2  # DeepSpeed data-parallel ranks (Ray actors)
    zero_stage: int = 2  # 0: plain data parallel; 1: optimizer states sharded; 2: + gradients; 3: + parameters
    offload_optimizer: bool = False  # optimizer states in host memory (zero_stage >= 1)
    offload_params: bool = False  # parameters in host memory (zero_stage 3)
    lr: float = 1e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    micro_batch_size: int = 8  # rows per forward on one rank
    bf16: bool = False  # bf16 mixed precision (fp32 master weights in the optimizer)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters instead of full fine-tuning (rank 0 = off)
    num_cpus: float = 0.5  # per rank
    num_gpus: float = 0.0  # per rank
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank

    def problems(self, name: str) -> list[Problem]:
        """``name``: the section this learner is configured under (policy or critic)."""
        p = _Problems()
        p.need(self.num_ranks >= 1, f"{name}.num_ranks", "must be >= 1")
        p.need(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", "must be 0, 1, 2 or 3")
        p.need_learning_rate(self.lr, f"{name}.lr")
        p.need(self.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
        p.need(self.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0: no clipping)")
        p.need(self.micro_batch_size >= 1, f"{name}.micro_batch_size", "must be >= 1")
        p.need(self.num_cpus >= 0 and self.num_gpus >= 0, f"{name}.num_cpus", "resources must be >= 0")
        p.need(not self.offload_params or self.zero_stage == 3, f"{name}.offload_params",
               "parameter offload needs zero_stage 3")
        p.need(not self.offload_optimizer or self.zero_stage >= 1, f"{name}.offload_optimizer",
               "optimizer offload needs zero_stage >= 1")
        p.need(self.lora.rank >= 0, f"{name}.lora.rank", "must be >= 0 (0 = off)")
        p.need(self.lora.alpha > 0, f"{name}.lora.alpha", "must be > 0")
        p.need(0 <= self.lora.dropout < 1, f"{name}.lora.dropout", "must be in [0, 1)")
        return p


@dataclass
class HttpRewardConfig:
    """A remote reward endpoint (rlhf_ray/engines/http_reward.py has the wire format); off while urls is empty."""

    urls: list[str] = field(default_factory=list)  # POST endpoints; retries rotate over them
    weight: float = 1.0  # weight of its score in the total reward
    timeout_s: float = 10.0  # per request
    retries: int = 3  # after the first attempt, on timeouts, connection errors, 5xx and 429
    backoff_s: float = 0.5  # wait before retry k is backoff_s * 2**k
    max_response_bytes: int = 1 << 20  # larger answers are refused
    token_env: str = ""  # NAME of the environment variable holding a bearer token (the token never goes in a config)

    def problems(self) -> list[Problem]:
        p = _Problems()
        for i, url in enumerate(self.urls):
            scheme, _, rest = url.partition("://")
            host = rest.split("/")[0].rsplit(":", 1)[0].strip("[]")
            p.need(scheme in ("http", "https") and host, f"scorers.http.urls[{i}]", f"{url!r} is not an http(s) URL")
            p.need(scheme == "https" or not self.token_env or host in ("127.0.0.1", "localhost", "::1"),
                   f"scorers.http.urls[{i}]", "a token must not travel in clear text: use https (or a loopback host)")
        p.need(self.timeout_s > 0, "scorers.http.timeout_s", "must be > 0")
        p.need(self.retries >= 0, "scorers.http.retries", "must be >= 0")
        p.need(self.backoff_s >= 0, "scorers.http.backoff_s", "must be >= 0")
        p.need(self.max_response_bytes >= 1, "scorers.http.max_response_bytes", "must be >= 1")
        return p


@dataclass
class ScorerConfig:
    """Frozen scorers: the reference policy and the reward models."""

    num_cpus: float = 0.5  # per scorer actor (each reference replica, the reward actor)
    num_gpus: float = 0.0  # per scorer actor
    colocate_with_learners: bool = False  # share the learners' placement-group bundles
    reference_replicas: int = 1  # data-parallel reference actors; each scores a shard of the batch
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per scorer
    micro_batch_size: int = 32  # rows per forward pass of the reference and reward models
    # Rule rewards, "module:function" (in Python also the functions themselves, shipped to the Ray
    # workers by value): f(prompts, responses, **columns) -> one score per response, where columns
    # are the prompt rows' other fields (rlhf_ray/tasks/rewards.py).
    reward_functions: list[str] = field(default_factory=list)
    reward_function_weights: list[float] = field(default_factory=list)  # default 1.0 each
    use_task_gold_as_reward: bool = True  # built-in task: gold scorer as rule reward (only logged with RMs/criteria)
    # Multi-criteria (safety) rewards: criterion name -> judge, "module:function" or "rm:<reward model dir>",
    # e.g. {helpfulness: rm:runs/rm/reward_model-0, harmlessness: mypkg.rules:no_insults}; each logged.
    criteria: dict[str, str] = field(default_factory=dict)
    criteria_weights: dict[str, float] = field(default_factory=dict)  # weighted mode; default 1.0 each
    criteria_combine: Literal["weighted", "min"] = "weighted"  # min: worst criterion (constitutional-style)
    http: HttpRewardConfig = field(default_factory=HttpRewardConfig)  # a remote reward endpoint

    def problems(self) -> list[Problem]:
        p = _Problems(self.http.problems())
        p.need(self.num_cpus >= 0 and self.num_gpus >= 0, "scorers.num_cpus", "resources must be >= 0")
        p.need(self.reference_replicas >= 1, "scorers.reference_replicas", "must be >= 1")
        p.need(self.micro_batch_size >= 1, "scorers.micro_batch_size", "must be >= 1")
        for name, judge in self.criteria.items():
            p.need(bool(judge.removeprefix("rm:")) and (judge.startswith("rm:") or ":" in judge),
                   f"scorers.criteria.{name}", f"{judge!r}: use module:function or rm:<reward model dir>")
        for name in self.criteria_weights:
            p.need(name in self.criteria, f"scorers.criteria_weights.{name}", "not a criterion in scorers.criteria")
        p.need(not (self.criteria_weights and self.criteria_combine == "min"), "scorers.criteria_weights",
               "weights are not used when scorers.criteria_combine=min")
        p.need(not self.reward_function_weights or len(self.reward_function_weights) == len(self.reward_functions),
               "scorers.reward_function_weights", "needs one weight per entry of scorers.reward_functions")
        for i, spec in enumerate(self.reward_functions):
            p.need(callable(spec) or ":" in spec, f"scorers.reward_functions[{i}]",
                   f"{spec!r} is not of the form module:function")
        return p


@dataclass
class PPOConfig:
    iterations: int = 20  # generate-score-update rounds
    prompts_per_iteration: int = 32  # prompts drawn per round (x rollout.samples_per_prompt rollouts)
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimiser steps per epoch
    # gae needs a critic; grpo, rloo, reinforce_pp use sequence baselines
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp", "dr_grpo"] = "gae"
    gamma: float = 1.0  # discount over response tokens (GAE)
    lam: float = 0.95  # GAE's bias-variance trade-off
    clip_eps: float = 0.2  # policy ratio clipped to [1 - clip_eps, 1 + clip_eps]
    value_clip_eps: float = 0.2  # critic's new values clipped to old values +- value_clip_eps
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean token entropy
    # how token losses become one number (token-mean weighs long responses more)
    # ppo: the clipped surrogate; gspo: sequence-level ratio and clip (Zheng et al. 2025); cispo:
    # clipped importance weights on a REINFORCE term, no token's gradient dropped (MiniMax-M1).
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    clip_eps_high: float = 0.0  # upper clip range; 0 = clip_eps (symmetric). DAPO's clip-higher: 0.28
    dual_clip: float = 0.0  # ppo: a negative-advantage token's loss is at most dual_clip * |A|; 0 = off (else > 1)
    # How token losses become one number: token-mean weighs long responses more;
    # seq-mean-token-sum-norm divides each sequence's sum by loss_norm_len (Dr. GRPO: no length bias).
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"
    loss_norm_len: int = 0  # seq-mean-token-sum-norm's constant; 0 = rollout.max_new_tokens
    # DAPO's overlong shaping: a response longer than rollout.max_new_tokens - overlong_buffer loses
    # up to overlong_factor (linearly, all of it at the cap); 0 = off.
    overlong_buffer: int = 0
    overlong_factor: float = 1.0
    # Sampler/learner mismatch on every run (bf16/FP8 engines; needs old_logprobs=learner): off,
    # tis (weights capped at is_cap) or mis (tokens or sequences over is_cap leave the loss).
    is_correction: Literal["off", "tis", "mis"] = "off"
    is_level: Literal["token", "sequence"] = "token"  # a weight per token, or one per sequence (product)
    is_cap: float = 2.0
    # DAPO's dynamic sampling: a group whose samples all scored the same has zero advantage under a
    # group baseline; drop it and sample more prompts (at most dynamic_sampling_rounds extra rounds)
    # until the batch holds prompts_per_iteration informative groups (the rest filled with dropped ones).
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3  # extra generate+reward rounds per iteration, at most
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch's tokens
    kl_coef: float = 0.05  # weight of the KL penalty to the reference (the starting value for adaptive controllers)
    # k1: log-ratio; k2: half its square; k3: the low-variance unbiased estimator
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    # fixed, proportional (Ziegler et al.'s adaptive controller) or step
    kl_controller: Literal["fixed", "proportional", "step"] = "fixed"
    kl_target: float = 6.0  # target KL (nats per sequence) for adaptive controllers
    kl_horizon: int = 10000  # proportional controller: rollouts over which the coefficient adapts
    reward_clip: float = 10.0  # scores are clipped to +-reward_clip before shaping
    missing_eos_penalty: float = 0.0  # subtracted from the score of truncated responses
    overlap: bool = False  # sample batch k+1 while training on batch k (one update off-policy)
    tis_cap: float = 2.0  # overlap without is_correction: token weight min(pi_learner / pi_sampler, tis_cap); 0 = none
    # Log-probs of the sampling policy in the PPO ratio and the KL: "learner" recomputes them on the
    # policy learners (exact under the learner's numerics); "rollout" takes the engines' own, which
    # skips that forward pass and makes the ratio pi_learner / pi_sampler (no TIS needed).
    old_logprobs: Literal["learner", "rollout"] = "learner"
    # Alignment-tax mitigations (off at 0): the policy loss adds coef * term.
    ptx_coef: float = 0.0  # language-model loss on ptx_data (InstructGPT's PPO-ptx), one minibatch per step
    ptx_data: str = ""  # .txt (a text per line) or JSONL/JSON/Parquet text or prompt/response rows; "" = SFT data
    distill_coef: float = 0.0  # KL(policy || reference) on the rollout tokens, a loss with its own gradient
    distill_kl_estimator: Literal["k2", "k3"] = "k2"  # k2: gradient of KL(policy||ref); k3: of KL(ref||policy)
    # Held-out evaluation before the first iteration, every eval_every iterations and after the
    # last (0 = off): the engines' greedy answers (with agent.env: whole trajectories, tools and all)
    # to data.eval_prompts (or the task's held-out prompts), scored by the run's rule rewards
    # (eval/<function>; the task's gold scorer: eval/gold) and reward models (eval/score); with
    # eval.samples = k also k sampled answers each (eval/sampled/<name>, eval/pass@k/<name>).
    eval_every: int = 0

    def problems(self) -> list[Problem]:
        p = _Problems()
        for key in ("iterations", "prompts_per_iteration", "epochs", "minibatches"):
            p.need(getattr(self, key) >= 1, f"ppo.{key}", "must be >= 1")
        p.need(self.eval_every >= 0, "ppo.eval_every", "must be >= 0 (0: no held-out evaluation)")
        p.need(0 < self.clip_eps < 1, "ppo.clip_eps", "must be in (0, 1)")
        p.need(self.value_clip_eps > 0, "ppo.value_clip_eps", "must be > 0")
        p.need(0 <= self.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
        p.need(0 <= self.lam <= 1, "ppo.lam", "must be in [0, 1]")
        for key in ("kl_coef", "entropy_coef", "missing_eos_penalty", "ptx_coef", "distill_coef"):
            p.need(getattr(self, key) >= 0, f"ppo.{key}", "must be >= 0")
        p.need(self.reward_clip > 0, "ppo.reward_clip", "must be > 0 (scores are clipped to +-reward_clip)")
        p.need(self.clip_eps_high == 0 or 0 < self.clip_eps_high < 10, "ppo.clip_eps_high",
               "must be 0 (= clip_eps) or in (0, 10)")
        p.need(self.dual_clip == 0 or self.dual_clip > 1, "ppo.dual_clip", "must be 0 (off) or > 1")
        p.need(self.dual_clip == 0 or self.policy_loss == "ppo", "ppo.dual_clip", "applies to policy_loss=ppo only")
        for key in ("loss_norm_len", "overlong_buffer"):
            p.need(getattr(self, key) >= 0, f"ppo.{key}", "must be >= 0")
        p.need(self.overlong_factor >= 0, "ppo.overlong_factor", "must be >= 0")
        p.need(self.is_cap >= 1, "ppo.is_cap", "must be >= 1")
        p.need(self.is_correction == "off" or self.old_logprobs == "learner", "ppo.is_correction",
               "needs ppo.old_logprobs=learner (with the engines' log-probs as pi_old there is no mismatch to correct)")
        p.need(self.policy_loss != "gspo" or self.advantage_estimator != "gae", "ppo.policy_loss",
               "gspo weighs whole sequences by one advantage; gae gives one per token: use a group estimator")
        p.need(self.tis_cap == 0 or self.tis_cap >= 1, "ppo.tis_cap", "must be 0 (no correction) or >= 1")
        p.need(self.dynamic_sampling_rounds >= 0, "ppo.dynamic_sampling_rounds", "must be >= 0")
        p.need(not self.dynamic_sampling or self.advantage_estimator in ("grpo", "dr_grpo", "rloo"),
               "ppo.dynamic_sampling", "drops groups whose samples scored alike, which only a per-group baseline "
               "makes uninformative: use advantage_estimator grpo, dr_grpo or rloo")
        p.need(not (self.dynamic_sampling and self.overlap), "ppo.dynamic_sampling",
               "cannot run with ppo.overlap (the next batch is sampled before this one is scored)")
        p.need(self.kl_target > 0, "ppo.kl_target", "must be > 0")
        p.need(self.kl_horizon > 0, "ppo.kl_horizon", "must be > 0")
        return p


@dataclass
class SafeguardsConfig:
    """Reward-hacking and mode-collapse detectors (always on, they only measure) and reward
    regularisers (off by default), applied to the scalar score before KL shaping."""

    diversity_unit: Literal["word", "char"] = "word"  # char for short answers such as digits
    hacking_phrases: list[str] = field(default_factory=list)  # keyword stuffing: phrases to count
    length_penalty_threshold: int = 0  # tokens; penalty applies above it
    length_penalty_coef: float = 0.0  # score -= coef * max(0, length - threshold)
    repetition_penalty_coef: float = 0.0  # score -= coef * share of repeated n-grams
    repetition_ngram: int = 3  # n-gram size the repetition penalty counts
    diversity_bonus: float = 0.0  # score += bonus * (1 - mean similarity to same-prompt responses)
    collapse_min_distinct_1: float = 0.0  # collapse flag below this distinct-1; 0 = check off
    collapse_max_pairwise_similarity: float = 0.9  # collapse flag above this; 1 = check off
    overopt_window: int = 5  # iterations over which proxy and gold trends are compared
    overopt_min_proxy_gain: float = 0.1  # flag when the proxy reward rose by at least this over the window
    overopt_max_gold_gain: float = 0.0  # ... while the gold score rose by at most this
    stop_on_overoptimisation: bool = False  # early stop when proxy rises while gold does not
    max_kl: float = 0.0  # early stop when KL to the reference exceeds this; 0 = never

    def problems(self) -> list[Problem]:
        p = _Problems()
        for key in ("length_penalty_coef", "repetition_penalty_coef", "diversity_bonus", "length_penalty_threshold"):
            p.need(getattr(self, key) >= 0, f"safeguards.{key}", "must be >= 0")
        p.need(0 <= self.collapse_min_distinct_1 <= 1, "safeguards.collapse_min_distinct_1", "must be in [0, 1]")
        p.need(0 <= self.collapse_max_pairwise_similarity <= 1, "safeguards.collapse_max_pairwise_similarity",
               "must be in [0, 1]")
        p.need(self.overopt_window >= 2, "safeguards.overopt_window", "must be >= 2")
        p.need(self.repetition_ngram >= 1, "safeguards.repetition_ngram", "must be >= 1")
        p.need(self.max_kl >= 0, "safeguards.max_kl", "must be >= 0")
        return p


@dataclass
class SyncConfig:
    bucket_mb: int = 64  # weights travel in flat buckets of at most this size (larger tensors in parts)
    # broadcast: gloo/NCCL to every engine; shm: through a shared-memory segment (engines on the
    # learner's node, CPU only; its GPU twin, CUDA IPC, is rollout.colocate's); auto: shm where it can, broadcast for the rest
    transport: Literal["broadcast", "shm", "auto"] = "broadcast"
    parity_every: int = 0  # parity check after every N-th sync; 0 = never
    # What a parity check accepts between learner and engine; 0: model.dtype's default
    # (sync/parity.py TOLERANCE_BY_DTYPE: float32 1e-3 / 1e-4 / 1.0, bfloat16 1.0 / 0.05 / 0.5)
    parity_atol: float = 0.0  # largest per-token log-prob gap
    parity_mean_atol: float = 0.0  # mean per-token log-prob gap
    parity_greedy_agreement: float = 0.0  # mean share of each greedy row before its first differing token

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.bucket_mb >= 1, "sync.bucket_mb", "must be >= 1")
        p.need(self.parity_every >= 0, "sync.parity_every", "must be >= 0")
        p.need(self.parity_atol >= 0, "sync.parity_atol", "must be >= 0 (0: by model.dtype)")
        p.need(self.parity_mean_atol >= 0, "sync.parity_mean_atol", "must be >= 0 (0: by model.dtype)")
        p.need(0 <= self.parity_greedy_agreement <= 1, "sync.parity_greedy_agreement",
               "must be in [0, 1] (0: by model.dtype)")
        return p


@dataclass
class LoggingConfig:
    samples_per_iteration: int = 16  # rollouts written to samples.jsonl each PPO iteration
    # Where metrics, the resolved config and PPO's samples go besides metrics.jsonl; [] = nowhere else.
    # wandb: offline with WANDB_MODE=offline (upload later with `wandb sync`); files in run_dir/wandb.
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = "rlhf-ray"  # the W&B project and the MLflow experiment runs are filed under
    wandb_entity: str = ""  # W&B team or user; "" = the account's default entity
    # "" = MLFLOW_TRACKING_URI when set, else a SQLite store in run_dir (mlflow.db; artifacts in mlartifacts/)
    mlflow_tracking_uri: str = ""

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.samples_per_iteration >= 0, "logging.samples_per_iteration", "must be >= 0")
        p.need(len(set(self.trackers)) == len(self.trackers), "logging.trackers", "names a tracker twice")
        p.need(bool(self.project.strip()), "logging.project", "must name a project")
        # The config is written to config.yaml and to every tracker: credentials go in the environment.
        p.need(not urlsplit(self.mlflow_tracking_uri).password, "logging.mlflow_tracking_uri",
               "holds a password, which would be logged with the config: give it in MLFLOW_TRACKING_PASSWORD "
               "(and the user in MLFLOW_TRACKING_USERNAME)")
        return p


@dataclass
class CheckpointConfig:
    every: int = 0  # iterations between full checkpoints (+ one at the end); 0 = only the final HF policy
    save_final: bool = True  # write the policy as an HF folder (run_dir/policy) at the end
    resume: Literal["never", "auto"] = "never"  # auto: continue from the newest complete checkpoint in run_dir
    keep_last: int = 2  # complete checkpoints kept in run_dir/checkpoints; older ones are deleted

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.every >= 0, "checkpoint.every", "must be >= 0")
        p.need(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        return p


@dataclass
class FaultsConfig:
    """What the PPO driver survives: non-finite batches, dead rollout engines, dead learners/scorers."""

    max_consecutive_nonfinite: int = 3  # skipped non-finite batches in a row before training stops
    max_engine_replacements: int = 4  # dead rollout engines replaced per run; 0 = a dead engine stops the run
    max_restarts: int = 0  # restarts from the last checkpoint after a learner or scorer actor dies

    def problems(self) -> list[Problem]:
        p = _Problems()
        for key in ("max_consecutive_nonfinite", "max_engine_replacements", "max_restarts"):
            p.need(getattr(self, key) >= 0, f"faults.{key}", "must be >= 0")
        return p


@dataclass
class CollectConfig:
    """``rlhf-ray collect``: several responses per prompt from the rollout engines, judged into
    preference pairs (the chapter's preference collector)."""

    num_prompts: int = 256  # prompts to sample responses for
    responses_per_prompt: int = 4  # samples per prompt; the best and worst become a pair
    judge: str = "gold"  # gold (the task's scorer) | module:function | rm:<reward model dir> | none (humans label)
    min_score_gap: float = 0.0  # pairs whose judged scores differ by no more are ties: left out, counted

    def problems(self) -> list[Problem]:
        p = _Problems()
        p.need(self.responses_per_prompt >= 2, "collect.responses_per_prompt", "must be >= 2 (pairs)")
        p.need(self.num_prompts >= 1, "collect.num_prompts", "must be >= 1")
        p.need(self.min_score_gap >= 0, "collect.min_score_gap", "must be >= 0")
        p.need(self.judge in ("gold", "none") or ":" in self.judge, "collect.judge",
               f"{self.judge!r}: use gold, none, module:function or rm:<reward model dir>")
        return p


@dataclass
class EvalConfig:
    """``rlhf-ray eval``: checkpoints compared on held-out data (the alignment tax): the task's gold
    score, perplexity on reference text, the reward models' (and criteria's) score."""

    models: dict[str, str] = field(default_factory=dict)  # name -> checkpoint, e.g. {sft: runs/x/sft/model}
    max_new_tokens: int = 8  # greedy response length cap
    compare_to: list[str] = field(default_factory=list)  # % change vs these models; [] = base and sft if named
    # Sampled evaluation besides the greedy one (rlhf-ray eval and ppo.eval_every): this many
    # responses per held-out prompt at eval.temperature, scored as their mean and pass@k (the
    # share of prompts where the best of the k earns the most); 0 = greedy only.
    samples: int = 0
    temperature: float = 1.0  # eval.samples' sampling temperature (with rollout.top_p)
    reference_text: str = ""  # perplexity text, as ppo.ptx_data; "" = held-out SFT demonstrations
    max_reference_texts: int = 200  # perplexity on at most this many texts

    def problems(self) -> list[Problem]:
        p = _Problems()
        for name in self.compare_to:
            p.need(name in self.models, "eval.compare_to", f"{name!r} is not one of eval.models")
        p.need(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        p.need(self.max_reference_texts >= 1, "eval.max_reference_texts", "must be >= 1")
        p.need(self.samples >= 0, "eval.samples", "must be >= 0 (0: greedy only)")
        p.need(self.temperature > 0, "eval.temperature", "must be > 0 (the greedy evaluation always runs)")
        return p


@dataclass
class ClusterConfig:
    """The cluster a plan is written for; 0 means "whatever Ray has" (no fit check)."""

    nodes: int = 0  # nodes of the cluster the plan is for
    gpus_per_node: int = 0  # GPUs on each node
    cpus_per_node: int = 0  # CPUs on each node
    # Memory of one GPU in GB; with it, a learner rank's training step (model states, activations,
    # logits) is estimated from the policy's config.json before any actor starts (0: no memory check)
    gpu_memory_gb: float = 0.0
    # How long to wait for Ray to place every role's resources before giving up with an error that
    # names what did not fit (0: wait forever, e.g. for a slow autoscaler).
    placement_timeout_s: float = 600.0

    def problems(self) -> list[Problem]:
        p = _Problems()
        for key in ("nodes", "gpus_per_node", "cpus_per_node"):
            p.need(getattr(self, key) >= 0, f"cluster.{key}", "must be >= 0 (0: no fit check)")
        p.need(self.placement_timeout_s >= 0, "cluster.placement_timeout_s", "must be >= 0 (0: wait forever)")
        p.need(self.gpu_memory_gb >= 0, "cluster.gpu_memory_gb", "must be >= 0 (0: no memory check)")
        return p


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # every output of the command goes here
    seed: int = 0  # seeds data order, sampling, initialisation
    backend: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible, else cpu
    ray_address: str = ""  # empty: start a local Ray; "auto": join the running cluster
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)  # multi-turn rollouts with tools (PPO)
    policy: LearnerConfig = field(default_factory=LearnerConfig)  # PPO's policy learners; sft trains on them too
    # PPO's critic learners; rm trains its reward models on these resources and ZeRO settings too.
    critic: LearnerConfig = field(default_factory=LearnerConfig)
    scorers: ScorerConfig = field(default_factory=ScorerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    safeguards: SafeguardsConfig = field(default_factory=SafeguardsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)

    @property
    def uses_critic(self) -> bool:
        return self.ppo.advantage_estimator == "gae"

    @property
    def rollout_batch_size(self) -> int:
        return self.ppo.prompts_per_iteration * self.rollout.samples_per_prompt

    def validate(self) -> list[Problem]:
        """Returns (dotted key, problem) for every impossible value; empty when the config is sound.
        Each section checks its own fields; what ties sections together is checked here."""
        p = _Problems()
        for section in (self.model, self.data, self.rollout, self.agent, self.scorers, self.ppo, self.sync, self.safeguards,
                        self.checkpoint, self.faults, self.logging, self.cluster, self.sft, self.rm, self.dpo,
                        self.eval, self.collect):
            p.extend(section.problems())
        p.extend(self.policy.problems("policy"))
        p.extend(self.critic.problems("critic"))
        r, ppo, data = self.rollout, self.ppo, self.data
        p.need(bool(self.run_dir.strip()), "run_dir", "must name a folder (empty would write into the current one)")
        p.need(r.engine == "vllm" or (self.backend != "cuda" and r.tensor_parallel_size == 1), "rollout.engine",
               "hf runs on CPU with one worker per engine: use vllm with backend=cuda or tensor_parallel_size > 1")
        p.need(self.backend != "cuda" or r.engine != "vllm" or r.num_gpus > 0 or r.colocate, "rollout.num_gpus",
               "backend=cuda runs vLLM on GPUs: give each engine worker one (0 leaves the engine without any)")
        # The engine's actor holds all tensor_parallel_size GPUs and vLLM's multiprocessing executor
        # puts one worker on each (platform.vllm_engine_kwargs): a worker cannot share a GPU.
        p.need(r.tensor_parallel_size == 1 or r.num_gpus in (0, 1), "rollout.num_gpus",
               f"with tensor_parallel_size={r.tensor_parallel_size} every worker needs one whole GPU: "
               f"set rollout.num_gpus=1 (a fraction shares a GPU, which only a one-worker engine can)")
        p.need(r.max_model_len >= data.max_prompt_tokens + r.max_new_tokens, "rollout.max_model_len",
               f"{r.max_model_len} cannot hold a prompt of data.max_prompt_tokens={data.max_prompt_tokens} and "
               f"a response of rollout.max_new_tokens={r.max_new_tokens}: make it at least "
               f"{data.max_prompt_tokens + r.max_new_tokens}")
        p.need(not ppo.eval_every or data.has_held_out_prompts, "ppo.eval_every",
               "needs held-out prompts: give data.eval_prompts or data.eval_split (or data.task for the built-in task's)")
        p.need(not ppo.eval_every or data.num_eval_prompts >= 1, "data.num_eval_prompts",
               "must be >= 1 with ppo.eval_every (the held-out prompts)")
        if r.colocate:
            p.need(r.num_engines == self.policy.num_ranks, "rollout.num_engines",
                   f"{r.num_engines} colocated engines need as many policy ranks to share GPUs with: "
                   f"set it to policy.num_ranks={self.policy.num_ranks}")
            p.need(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
                   "a colocated engine runs one worker on its learner rank's GPU: set it to 1 (or rollout.colocate=false)")
            p.need(not r.elastic, "rollout.elastic", "colocated engines live in the learners' bundles: they cannot "
                                                     "follow the cluster (set rollout.colocate=false)")
            p.need(not ppo.overlap, "ppo.overlap",
                   "colocated engines and learners take turns on one GPU: nothing to overlap (set rollout.colocate=false)")
        if self.agent.enabled:
            ag = self.agent
            p.need(r.max_model_len >= data.max_prompt_tokens + ag.max_tokens, "agent.max_tokens",
                   f"{ag.max_tokens} does not fit rollout.max_model_len={r.max_model_len} after a prompt of "
                   f"data.max_prompt_tokens={data.max_prompt_tokens}")
            p.need(ag.env != "task" or bool(data.task), "agent.env", "task needs data.task")
            p.need(not ppo.overlap, "ppo.overlap", "is not supported with multi-turn rollouts (agent.env)")
            # A turn ends at a tool call's stop token and may have less room left than the floor.
            p.need(r.min_new_tokens == 0, "rollout.min_new_tokens",
                   "is not supported with multi-turn rollouts (agent.env)")
            p.need(not ppo.dynamic_sampling, "ppo.dynamic_sampling",
                   "is not supported with multi-turn rollouts (agent.env)")
        # vLLM reports log-probs renormalised over the top-p nucleus, which the learner never computes.
        p.need(ppo.old_logprobs == "learner" or r.top_p == 1, "ppo.old_logprobs",
               "rollout needs rollout.top_p=1 (the engines' log-probs are renormalised over the top-p nucleus)")
        # Likewise below the length floor, where they are renormalised over the tokens that do not stop.
        p.need(ppo.old_logprobs == "learner" or r.min_new_tokens == 0, "ppo.old_logprobs",
               "rollout needs rollout.min_new_tokens=0 (below the floor the engines' log-probs are renormalised "
               "over the tokens that do not stop)")
        if ppo.advantage_estimator in ("rloo", "grpo", "dr_grpo"):
            p.need(r.samples_per_prompt >= 2, "rollout.samples_per_prompt",
                   f"{ppo.advantage_estimator} needs >= 2 samples per prompt (group baselines)")
        p.need(not ppo.dynamic_sampling or r.samples_per_prompt >= 2, "ppo.dynamic_sampling",
               "needs rollout.samples_per_prompt >= 2 (groups of samples to compare)")
        p.need(ppo.overlong_buffer <= r.max_new_tokens, "ppo.overlong_buffer",
               f"must be at most rollout.max_new_tokens={r.max_new_tokens}")
        # Every learner rank must get at least one row of every minibatch.
        rows_per_minibatch = self.rollout_batch_size // ppo.minibatches if ppo.minibatches >= 1 else 0
        p.need(rows_per_minibatch >= 1, "ppo.minibatches",
               f"{ppo.minibatches} minibatches cannot split a rollout batch of {self.rollout_batch_size} rows")
        for name, lc in (("policy", self.policy), ("critic", self.critic)):
            if name == "critic" and not self.uses_critic:
                continue
            p.need(rows_per_minibatch >= lc.num_ranks, f"{name}.num_ranks",
                   f"{lc.num_ranks} ranks cannot split a minibatch of {rows_per_minibatch} rows "
                   f"(ppo.prompts_per_iteration x rollout.samples_per_prompt / ppo.minibatches)")
        p.need(self.sft.batch_size >= self.policy.num_ranks, "sft.batch_size",
               f"{self.sft.batch_size} rows cannot split over policy.num_ranks={self.policy.num_ranks}")
        p.need(self.dpo.batch_size >= self.policy.num_ranks, "dpo.batch_size",
               f"{self.dpo.batch_size} pairs cannot split over policy.num_ranks={self.policy.num_ranks}")
        p.need(self.rm.batch_size >= self.critic.num_ranks, "rm.batch_size",
               f"{self.rm.batch_size} pairs cannot split over critic.num_ranks={self.critic.num_ranks}")
        p.need(self.sync.transport != "shm" or self.backend != "cuda", "sync.transport",
               "shm hands over host memory; with backend=cuda use broadcast or auto")
        p.need(self.faults.max_restarts == 0 or self.checkpoint.every > 0, "faults.max_restarts",
               "restarts resume from a checkpoint: set checkpoint.every > 0")
        p.need(not ppo.ptx_coef or bool(ppo.ptx_data or data.sft or data.task), "ppo.ptx_data",
               "ppo.ptx_coef > 0 needs text: give ppo.ptx_data, data.sft or data.task")
        return p + plan_problems(self)

    def reward_problems(self) -> list[Problem]:
        """What a stage that pays rewards (PPO) needs besides ``validate``: a reward source. SFT,
        RM, DPO, collect and eval run without one."""
        sc = self.scorers
        has_reward = bool(self.model.reward or sc.reward_functions or sc.http.urls or sc.criteria
                          or (self.data.task and not self.data.prompts and sc.use_task_gold_as_reward))
        why = "no reward source: give reward models, reward functions, an endpoint or a task"
        return [] if has_reward else [("model.reward", why)]
