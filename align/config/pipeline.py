"""The pipeline's config: the four-model chain with one section per stage."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from align.config.keys import doc


@dataclasses.dataclass
class PipelineConfig:
    """The whole chain: SFT -> PMP -> RM -> PPO, and SFT -> DPO, each stage's output feeding the next,
    then an evaluation of the aligned policies against the SFT model and one report. With rm_data=sampled
    (the on-policy RLHF chain): SFT -> sample_pairs -> PMP -> RM on the SFT policy's verifier-labelled
    samples -> PPO on the same prompts; with dpo_data=sampled DPO trains on those pairs too.

    Per-stage settings are nested mappings validated against that stage's config class before anything
    runs (`ppo: {kl_coef: 0.1}` in the file; `ppo.kl_coef=0.1` on the command line). The wiring keys
    (output_dir, the model paths fed from earlier stages) are set by the pipeline.
    """

    output_dir: str = doc(
        "outputs/pipeline",
        "Root of the run: stages go to <output_dir>/sft, /sample_pairs, /rm, /ppo, /dpo; eval/ and report.md.",
    )
    stages: list[Literal["sft", "sample_pairs", "rm", "ppo", "dpo"]] = doc(
        ["sft", "rm", "ppo", "dpo"],
        "Stages to run, of sft, sample_pairs (pairs from the SFT policy's samples; needed with rm_data or "
        "dpo_data = sampled), rm (PMP then RM), ppo, dpo; a stage left out must already be complete if a "
        "later one needs its output.",
    )
    rm_data: Literal["own", "sampled"] = doc(
        "own",
        "What the RM step trains on: own = the rm section's rm_dataset (default: generated comparisons); "
        "sampled = the sample_pairs stage's pairs, with its held-out pairs scored as `onpolicy`, and PPO "
        "then samples the same prompts (its dataset, query_count, query_seed = the stage's dataset, "
        "embedded_prompts, embedded_seed).",
    )
    dpo_data: Literal["own", "sampled"] = doc(
        "own",
        "What DPO trains on: own = the dpo section's dataset (default: generated comparisons); sampled = the "
        "sample_pairs stage's pairs.",
    )
    overwrite: bool = doc(
        False,
        "Re-run a stage whose config (or an earlier stage's) changed since it ran, deleting its old outputs; "
        "without it such a stage is refused.",
    )
    sft: Any = doc({}, "SFTConfig keys for the SFT stage (a mapping), e.g. {learning_rate: 5e-5}.")
    sample_pairs: Any = doc(
        {},
        "SamplePairsConfig keys for the sample_pairs stage, plus heldout_prompts, e.g. {embedded_prompts: "
        "256, heldout_prompts: 128}.",
    )
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
