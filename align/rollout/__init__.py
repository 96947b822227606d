"""Rollouts: sampling responses from a policy, and scoring them against the prompts they answer.

Public entry points: `RolloutBatch` (a batch of prompts x n responses, with log-probs and stop flags),
`RolloutEngine` and its engines (`batch.HFRolloutEngine`; `manual`, `static` (fixed-shape, CUDA graphs),
`vllm`), picked by name with `engine_class` / `engine_options`; `shared_prefix.shared_prompt_logprobs`, the
pass that runs each distinct prompt once; `sampling`, counter-based batch-invariant sampling.
"""

from align.rollout.batch import HFRolloutEngine, RolloutBatch, RolloutEngine
from align.rollout.engines import engine_class, engine_options

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "engine_class", "engine_options"]
