"""Where the pipeline's stages live under its output_dir, and what each hands on: shared by the pipeline
(:mod:`align.pipeline.run`) and its report (:mod:`align.pipeline.report`), which reads what the stages wrote."""

from __future__ import annotations

from pathlib import Path

STAGES = ("sft", "sample_pairs", "rm", "ppo", "dpo")
TITLES = {
    "sft": "SFT",
    "sample_pairs": "sampled pairs (verifier-labelled samples of the SFT policy)",
    "rm": "reward model (PMP then RM)",
    "ppo": "PPO",
    "dpo": "DPO",
}


def stage_dir(root: str | Path, stage: str) -> Path:
    return Path(root) / stage


def final_model(root: str | Path, stage: str) -> Path:
    """What a stage hands on: its final/ model; the RM stage's is its RM fine-tuning's final/, the
    sample_pairs stage's is its pairs file (the training prompts' pairs)."""
    if stage == "rm":
        return stage_dir(root, "rm") / "rm" / "final"
    if stage == "sample_pairs":
        return stage_dir(root, "sample_pairs") / "pairs.jsonl"
    return stage_dir(root, stage) / "final"


def heldout_pairs(root: str | Path) -> Path:
    """The sample_pairs stage's pairs on held-out prompts: the RM's on-policy evaluation set."""
    return stage_dir(root, "sample_pairs") / "heldout" / "pairs.jsonl"


def is_complete(root: str | Path, stage: str) -> bool:
    """A stage is complete when its summary.json and what it hands on are both on disk (written last)."""
    output = final_model(root, stage)
    handed_on = output.is_file() if stage == "sample_pairs" else output.is_dir()
    return (stage_dir(root, stage) / "summary.json").is_file() and handed_on
