"""The pipeline's config: the four-model chain with one section per stage."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from align.config.keys import doc


@dataclasses.dataclass
class PipelineConfig:
    """The whole chain: SFT -> PMP -> RM -> PPO, and SFT -> DPO, each stage's output feeding the next,
    then an evaluation of the aligned policies against the SFT model and one report.

    Per-stage settings are nested mappings validated against that stage's config class before anything
    runs (`ppo: {kl_coef: 0.1}` in the file; `ppo.kl_coef=0.1` on the command line). The wiring keys
    (output_dir, the model paths fed from earlier stages) are set by the pipeline.
    """

    output_dir: str = doc(
        "outputs/pipeline",
        "Root of the run: stages go to <output_dir>/sft, /rm, /ppo, /dpo; eval/ and report.md.",
    )
    stages: list[Literal["sft", "rm", "ppo", "dpo"]] = doc(
        ["sft", "rm", "ppo", "dpo"],
        "Stages to run, of sft, rm (PMP then RM), ppo, dpo; a stage left out must already be complete if a "
        "later one needs its output.",
    )
    overwrite: bool = doc(
        False,
        "Re-run a stage whose config (or an earlier stage's) changed since it ran, deleting its old outputs; "
        "without it such a stage is refused.",
    )
    sft: Any = doc({}, "SFTConfig keys for the SFT stage (a mapping), e.g. {learning_rate: 5e-5}.")
    rm: Any = doc({}, "RMConfig keys for the reward model stage (PMP then RM), e.g. {embedded_rm_pairs: 64}.")
    ppo: Any = doc({}, "PPOConfig keys for the PPO stage, e.g. {kl_coef: 0.1, ptx_coef: 0.5}.")
    dpo: Any = doc({}, "DPOConfig keys for the DPO stage, e.g. {beta: 0.1}.")
    keep_checkpoints: bool = doc(
        False,
        "Keep a completed stage's checkpoints/ (only needed to resume that stage; later stages read its "
        "final/). Off: deleted once the stage completes, which saves ~1.6 GB per SmolLM2-135M checkpoint.",
    )
    evaluate: bool = doc(
        True, "At the end, compare PPO and DPO policies with the SFT model (eval/<policy>/)."
    )
    eval_num_prompts: int = doc(48, "Held-out prompts per policy comparison.")
    eval_max_new_tokens: int = doc(32, "Generation budget per response in the comparison.")
    eval_batch_size: int = doc(16, "Prompts per generation batch in the comparison.")
    eval_seed: int = doc(0, "Seed of the comparison's prompts and sampling.")
    eval_tax_text: str = doc("embedded", "Pre-training-style text for the alignment-tax perplexity.")
    eval_tax_max_rows: int = doc(64, "Rows of tax text scored per model.")
