"""Offline DPO (Qwen2/2.5) on preference pairs.

    accelerate launch recipes/dpo.py [--config recipes/configs/dpo/qwen.yaml] [key=value ...]

With no arguments: the embedded default. It starts from the SFT default's output (outputs/sft/final) when
present, else SmolLM2-135M-Instruct, trains on generated comparisons (right answer against a plausible
wrong one), caches the reference log-probs on disk, and reports the gold verifier's held-out accuracy
before and after. `--help` lists every key.
"""

import sys

from align.config import DPOConfig
from align.train.dpo import run_dpo
from align.train.recipe import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(DPOConfig, run_dpo, prog="recipes/dpo.py"))
