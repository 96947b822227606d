"""Online DPO (Qwen2): sample k responses per prompt, the reward picks the best and the worst, DPO step.

    accelerate launch recipes/online_dpo.py [--config recipes/configs/online_dpo/qwen.yaml] [key=value ...]

With no arguments: the embedded default. It starts from outputs/sft/final when present, else
SmolLM2-135M-Instruct, samples generated prompts, scores them with the reward model at outputs/rm/rm/final
when present, else with the gold verifier (the log says which), and reports the gold verifier's held-out
accuracy before and after. `--help` lists every key.
"""

import sys

from align.config import OnlineDPOConfig
from align.train.online import run_online_dpo
from align.train.recipe import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(OnlineDPOConfig, run_online_dpo, prog="recipes/online_dpo.py"))
