"""The typed config tree (no torch imports: validating a config is instant)."""

from rlhf_ray.config.loader import ConfigError, config_to_dict, dump_config, load_config
from rlhf_ray.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    FaultsConfig,
    HttpRewardConfig,
    LearnerConfig,
    ModelConfig,
    PPOConfig,
    RewardModelConfig,
    RolloutConfig,
    RunConfig,
    SafeguardsConfig,
    ScorerConfig,
    SFTConfig,
    SyncConfig,
)

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig", "FaultsConfig",
    "HttpRewardConfig",
    "LearnerConfig",
    "ModelConfig",
    "PPOConfig",
    "RewardModelConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "SafeguardsConfig",
    "ScorerConfig",
    "SyncConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
]
