"""Reward model: preference-model pre-training (PMP), then RM fine-tuning, scored at the end token.

    accelerate launch recipes/rm.py                                          # the embedded default
    accelerate launch recipes/rm.py --config recipes/configs/rm/pmp.yaml [key=value ...]
    accelerate launch recipes/rm.py --config recipes/configs/rm/rm.yaml init_from=outputs/rm/pmp/final

With no arguments: PMP on a large generated comparison set with label noise, then RM fine-tuning on a
smaller clean one, starting from the SFT default's output (outputs/sft/final) if present, else from
SmolLM2-135M-Instruct; held-out accuracy before and after each stage. `--help` lists every key.
"""

import sys

from align.config import RMConfig
from align.train.recipe import run_recipe
from align.train.reward import run_reward

if __name__ == "__main__":
    sys.exit(run_recipe(RMConfig, run_reward, prog="recipes/rm.py"))
