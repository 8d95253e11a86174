"""Frozen scorers: the reference policy and the reward (models + rule functions).

Each wraps plain HF models in inference mode; neither ever changes its weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf_ray import algo
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.engines import scoring
from rlhf_ray.engines.http_reward import HttpRewardClient
from rlhf_ray.platform import detect
from rlhf_ray.tasks.rewards import call_reward_function, reward_name


def _init_process(backend: str):
    """Applies the platform's environment to this scorer process; returns the platform."""
    platform = detect(backend)
    platform.apply_env()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return platform


def _reward_norm(path: str) -> tuple[float, float]:
    norm_file = Path(path) / "reward_norm.json"
    if not norm_file.exists():
        return 0.0, 1.0
    norm = json.loads(norm_file.read_text())
    return float(norm["mean"]), max(float(norm["std"]), 1e-6)


class ScoringModel(NamedTuple):
    """A frozen reward model and its own tokenizer when that reads text otherwise than the scored
    batches' ids say (None: it reads those ids as they are)."""

    model: torch.nn.Module
    own_tokenizer: object | None


class ReferenceActor:
    """The frozen initial policy: per-token log-probs of given responses."""

    def __init__(self, model_path: str, dtype: str, backend: str, micro_batch_size: int,
                 trust_remote_code: bool = False):
        from rlhf_ray.models.loading import load_causal_lm
        from rlhf_ray.models.placement import place_frozen

        platform = _init_process(backend)
        model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        # On the accelerators Ray gave this actor, spread over them when it holds several (batches
        # follow the model).
        self.model = place_frozen(model, torch.device(platform.device), f"the reference model {model_path!r}")
        self.micro_batch_size = micro_batch_size

    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        return scoring.batched_logprobs(self.model, batch, self.micro_batch_size, temperature)[0]


class RewardActor:
    """Reward models (an ensemble, combined by mean or min) plus rule functions and a remote HTTP
    endpoint, weighted, plus named criteria (each judged by a reward model or a rule function,
    combined by weights or by their minimum).

    ``score`` returns the combined score per response and each component's scores, so metrics
    can show what the policy is actually being paid for.
    """

    def __init__(self, reward_model_paths: list[str], combine: str, functions: list[str],
                 function_weights: list[float], backend: str, micro_batch_size: int,
                 criteria: dict[str, str] | None = None, criteria_weights: dict[str, float] | None = None,
                 criteria_combine: str = "weighted",
                 http: HttpRewardClient | None = None, http_weight: float = 1.0,
                 dtype: str = "float32", trust_remote_code: bool = False, batch_tokenizer: str | None = None):
        """``batch_tokenizer``: the model folder whose tokenizer made the ids of the scored batches
        (the policy's); a reward model whose tokenizer is the same reads those ids, any other reads
        its own tokenization of the texts. None: not known, every reward model reads the texts."""
        from rlhf_ray.models.loading import load_tokenizer
        from rlhf_ray.tasks.rewards import load_reward_function

        self.device = _init_process(backend).device
        self.dtype, self.trust_remote_code = dtype, trust_remote_code  # model.dtype, as the reference
        self.batch_tokenizer = None if batch_tokenizer is None else load_tokenizer(batch_tokenizer, trust_remote_code)
        self.models = [self._load_model(p) for p in reward_model_paths]
        # Calibration written by the reward-model stage: PPO sees scores of mean 0, std 1.
        self.norms = [_reward_norm(p) for p in reward_model_paths]
        self.combine = combine
        self.functions = [(spec, load_reward_function(spec)) for spec in functions]
        self.weights = function_weights or [1.0] * len(functions)
        self.micro_batch_size = micro_batch_size
        self.http, self.http_weight = http, http_weight
        self.criteria = {name: self._judge(spec) for name, spec in (criteria or {}).items()}
        self.criteria_weights = [(criteria_weights or {}).get(name, 1.0) for name in self.criteria]
        self.criteria_combine = criteria_combine

    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(batch.size)
        if self.models:
            per_model = torch.stack([(self._model_scores(m, batch, prompts, responses) - mean) / std
                                     for m, (mean, std) in zip(self.models, self.norms)])
            for i, s in enumerate(per_model):
                components[f"rm{i}"] = s
            total += algo.combine_scores(per_model, [1 / len(self.models)] * len(self.models),
                                         "weighted" if self.combine == "mean" else "min")
        for (spec, fn), weight in zip(self.functions, self.weights):
            s = self._function_scores(spec, fn, prompts, responses)
            components[reward_name(spec)] = s
            total += weight * s
        if self.http is not None:
            s = torch.tensor(self.http.score(prompts, responses), dtype=torch.float32)
            components["http"] = s
            total += self.http_weight * s
        if self.criteria:
            per_criterion = [judge(batch, prompts, responses) for judge in self.criteria.values()]
            for name, s in zip(self.criteria, per_criterion):
                components[f"criterion/{name}"] = s
            total += algo.combine_scores(torch.stack(per_criterion), self.criteria_weights, self.criteria_combine)
        return {"score": total, **{f"reward/{k}": v for k, v in components.items()}}

    def _load_model(self, path: str) -> ScoringModel:
        from rlhf_ray.data.tokenize import tokenizer_identity
        from rlhf_ray.models.heads import RewardModel
        from rlhf_ray.models.loading import has_tokenizer, load_tokenizer
        from rlhf_ray.models.placement import place_frozen

        model = RewardModel.from_pretrained(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        # A folder without a tokenizer was trained on the ids of the policy it was made from.
        own = load_tokenizer(path, self.trust_remote_code) if has_tokenizer(path) else None
        if own is not None and self.batch_tokenizer is not None and \
                tokenizer_identity(own) == tokenizer_identity(self.batch_tokenizer):
            own = None
        return ScoringModel(place_frozen(model.eval(), torch.device(self.device), f"the reward model {path!r}"), own)

    def _judge(self, spec: str):
        """A criterion's judge, ``(batch, prompts, responses) -> scores [B]``, from
        ``rm:<reward model dir>`` (calibrated like the reward models) or ``module:function``."""
        from rlhf_ray.tasks.rewards import load_reward_function

        if spec.startswith("rm:"):
            path = spec.removeprefix("rm:")
            scorer, (mean, std) = self._load_model(path), _reward_norm(path)
            return lambda batch, prompts, responses: (self._model_scores(scorer, batch, prompts, responses) - mean) / std
        fn = load_reward_function(spec)
        return lambda batch, prompts, responses: self._function_scores(spec, fn, prompts, responses)

    @staticmethod
    def _function_scores(spec, fn, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """A rule reward's scores, given the columns of each response's prompt row."""
        return torch.tensor(call_reward_function(spec, fn, prompts, responses), dtype=torch.float32)

    def _model_scores(self, scorer: ScoringModel, batch: RolloutBatch, prompts: list[str],
                      responses: list[str]) -> torch.Tensor:
        """A reward model's scores of the batch's ids, or, with a tokenizer of its own, of its own
        tokenization of the texts."""
        from rlhf_ray.data.tokenize import encode_conversations

        if scorer.own_tokenizer is not None:
            batch = encode_conversations(scorer.own_tokenizer, prompts, responses)
        return scoring.batched_scores(scorer.model, batch, self.micro_batch_size)
