"""align: a toolkit for aligning chat models the Qwen way (SFT, PMP + RM, PPO, DPO)."""

import os

# TRL trainers and the hub client phone home when created; a training tool should not.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
