"""Where the pipeline's stages live under its output_dir, and what each hands on: shared by the pipeline
(:mod:`align.pipeline.run`) and its report (:mod:`align.pipeline.report`), which reads what the stages wrote."""

from __future__ import annotations

from pathlib import Path

STAGES = ("sft", "rm", "ppo", "dpo")
TITLES = {"sft": "SFT", "rm": "reward model (PMP then RM)", "ppo": "PPO", "dpo": "DPO"}


def stage_dir(root: str | Path, stage: str) -> Path:
    return Path(root) / stage


def final_model(root: str | Path, stage: str) -> Path:
    """The model a stage hands on: the RM stage's is its RM fine-tuning's final/."""
    if stage == "rm":
        return stage_dir(root, "rm") / "rm" / "final"
    return stage_dir(root, stage) / "final"


def is_complete(root: str | Path, stage: str) -> bool:
    """A stage is complete when its summary.json and its final model are both on disk (written last)."""
    return (stage_dir(root, stage) / "summary.json").is_file() and final_model(root, stage).is_dir()
