"""Pure-tensor RLHF math: log-probs, KL estimators, advantages, PPO/RM losses, KL control.

Every function works on batched [batch, time] response tokens with a mask marking real
tokens; nothing here depends on Ray, DeepSpeed, vLLM or the config objects.
"""

from .advantages import (
    GROUP_ADVANTAGE_KINDS,
    broadcast_to_tokens,
    gae,
    group_advantages,
    overlong_penalty,
)
from .kl import KL_KINDS, kl_estimate, shape_rewards
from .kl_control import (
    KL_CONTROLLER_KINDS,
    FixedKLController,
    KLController,
    ProportionalKLController,
    StepKLController,
    make_kl_controller,
)
from .logprobs import entropy_from_logits, token_logprobs
from .losses import (
    AGG_MODES,
    DPO_KINDS,
    IS_LEVELS,
    IS_MODES,
    POLICY_LOSS_KINDS,
    DPOOutput,
    ISCorrection,
    PolicyLossOutput,
    PolicyLossSpec,
    ValueLossOutput,
    aggregate_loss,
    bradley_terry_loss,
    cispo_policy_loss,
    dpo_loss,
    gspo_policy_loss,
    is_correction,
    kl_penalty_loss,
    language_model_loss,
    policy_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_accuracy,
    truncated_is_weights,
)
from .masked import masked_mean, masked_sum, masked_var, whiten, zero_padding
from .rewards import COMBINE_MODES, combine_scores

__all__ = [
    "AGG_MODES",
    "COMBINE_MODES",
    "DPO_KINDS",
    "GROUP_ADVANTAGE_KINDS",
    "IS_LEVELS",
    "IS_MODES",
    "KL_CONTROLLER_KINDS",
    "KL_KINDS",
    "POLICY_LOSS_KINDS",
    "DPOOutput",
    "FixedKLController",
    "ISCorrection",
    "KLController",
    "PolicyLossOutput",
    "PolicyLossSpec",
    "ProportionalKLController",
    "StepKLController",
    "ValueLossOutput",
    "aggregate_loss",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "cispo_policy_loss",
    "combine_scores",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "gspo_policy_loss",
    "is_correction",
    "kl_estimate",
    "kl_penalty_loss",
    "language_model_loss",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "overlong_penalty",
    "policy_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_accuracy",
    "shape_rewards",
    "token_logprobs",
    "truncated_is_weights",
    "whiten",
    "zero_padding",
]
