"""Supervised fine-tuning on ChatML data.

    accelerate launch recipes/sft.py [--config recipes/configs/sft/qwen.yaml] [key=value ...]

With no arguments: the embedded default (SmolLM2-135M-Instruct on generated tasks with a checkable
answer; held-out accuracy before and after). `--help` lists every key.
"""

import sys

from align.config import SFTConfig
from align.train.recipe import run_recipe
from align.train.sft import run_sft

if __name__ == "__main__":
    sys.exit(run_recipe(SFTConfig, run_sft, prog="recipes/sft.py"))
