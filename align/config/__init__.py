"""The stage configs: each stage's keys, defaults and documentation (`metadata["help"]`).

A stage config is composed of parts, one per concern (model, data, batch, optimisation, checkpointing,
run, RL sampling, ...), holding exactly the keys that stage's loop reads; a key it would not read is not
a field, so setting it is an unknown-key error. Loading (defaults < YAML file < `key=value` overrides,
strictly checked) is in `align.config_loader`.

Modules: `keys` (the shared parts and `doc`), `stages` (SFT, RM, DPO), `rl` (PPO, online DPO, GRPO and their
parts), `pipeline` (the whole chain). The stage configs and the parts other modules compose are re-exported
here.
"""

from align.config.keys import (
    BatchKeys,
    CheckpointKeys,
    DataKeys,
    DropoutKeys,
    GoldEvalKeys,
    ModelKeys,
    OptimKeys,
    RecordFileKeys,
    RunKeys,
    TrainConfig,
    doc,
)
from align.config.pipeline import PipelineConfig
from align.config.rl import (
    AdaptiveKLKeys,
    GRPOConfig,
    OnlineConfig,
    OnlineDPOConfig,
    PPOConfig,
    QueryKeys,
    RewardGuardKeys,
    RolloutKeys,
    SamplingKeys,
)
from align.config.stages import DPOConfig, RMConfig, SFTConfig

__all__ = [
    "AdaptiveKLKeys", "BatchKeys", "CheckpointKeys", "DPOConfig", "DataKeys", "DropoutKeys", "GRPOConfig",
    "GoldEvalKeys", "ModelKeys", "OnlineConfig", "OnlineDPOConfig", "OptimKeys", "PPOConfig",
    "PipelineConfig", "QueryKeys", "RMConfig", "RecordFileKeys", "RewardGuardKeys", "RolloutKeys", "RunKeys",
    "SFTConfig", "SamplingKeys", "TrainConfig", "doc",
]  # fmt: skip
