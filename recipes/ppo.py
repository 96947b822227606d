"""PPO with four models (policy, reference, reward, value), the Qwen way.

    accelerate launch recipes/ppo.py [--config recipes/configs/ppo/qwen.yaml] [key=value ...]

With no arguments: the embedded default. It starts from the SFT and reward-model defaults' outputs
(training them first when absent), samples prompts from the task generator, and logs the gold
verifier's score beside the reward model's. `--help` lists every key.
"""

import sys

from align.config import PPOConfig
from align.train.ppo import run_ppo
from align.train.recipe import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(PPOConfig, run_ppo, prog="recipes/ppo.py"))
