"""GRPO (Qwen2.5): G samples per query, group-normalised advantages, larger reward variance first.

    accelerate launch recipes/grpo.py [--config recipes/configs/grpo/qwen.yaml] [key=value ...]

With no arguments: the embedded default. It starts from outputs/sft/final when present, else
SmolLM2-135M-Instruct, samples generated prompts, scores them with the reward model at outputs/rm/rm/final
when present, else with the gold verifier (the log says which), orders the queries by reward variance
in a scoring pass, and reports the gold verifier's held-out accuracy before and after. `--help` lists
every key.
"""

import sys

from align.config import GRPOConfig
from align.train.online import run_grpo
from align.train.recipe import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(GRPOConfig, run_grpo, prog="recipes/grpo.py"))
