"""The whole chain: SFT -> PMP -> RM -> PPO, and SFT -> DPO, then an evaluation against SFT and a report.

    accelerate launch recipes/pipeline.py [--config recipes/configs/pipeline/FILE.yaml] [key=value ...]
    accelerate launch recipes/pipeline.py stages=sft,rm,ppo ppo.kl_coef=0.1 output_dir=outputs/pipe-kl
    accelerate launch recipes/pipeline.py --config recipes/configs/pipeline/rlhf.yaml   # the on-policy chain

With no arguments: every stage's embedded default (SmolLM2-135M-Instruct, generated tasks), chained under
outputs/pipeline/. Complete stages are skipped, an interrupted one resumes, a changed one is refused
unless overwrite=true. `stage.key=value` sets one key of a stage's section. `--help` lists every key.
With rm_data=sampled: SFT -> sample_pairs (verifier-labelled samples of the SFT policy) -> PMP -> RM on those
pairs -> PPO on the same prompts (docs/pipeline.md).
"""

import sys

from align.config import PipelineConfig
from align.pipeline.run import run_pipeline, split_stage_overrides
from align.train.recipe import run_recipe

if __name__ == "__main__":
    argv, stage_overrides = split_stage_overrides(sys.argv[1:])
    sys.exit(
        run_recipe(
            PipelineConfig,
            lambda cfg: run_pipeline(cfg, stage_overrides=stage_overrides),
            argv,
            prog="recipes/pipeline.py",
        )
    )
