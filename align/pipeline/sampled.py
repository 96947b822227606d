"""The pipeline's on-policy branch (issue 21): the sample_pairs stage and what it wires into the others.

    SFT -> sample_pairs -> PMP -> RM -> PPO      (rm_data=sampled)
    SFT -> sample_pairs -> DPO                   (dpo_data=sampled)

The sample_pairs stage samples `samples_per_query` responses per training prompt from the SFT policy, labels
them (the embedded tasks' verifier, or a `module:function` checker) and pairs correct with incorrect
(:mod:`align.pipeline.sample_pairs`) into ``<output_dir>/sample_pairs/pairs.jsonl``; with
``heldout_prompts`` > 0 it does the same on that many held-out prompts (embedded split ``heldout``, the same
seed) into ``sample_pairs/heldout/pairs.jsonl``. With rm_data=sampled the RM step trains on the first file
and scores the second as the held-out set ``onpolicy``, and PPO samples the very prompts the pairs came from
(its dataset, query_count and query_seed are the stage's dataset, embedded_prompts and embedded_seed): the
reward model's query set is the RL query set (Qwen2.5). With dpo_data=sampled DPO trains on the first file.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState

from align.config import PipelineConfig, doc
from align.config_loader import ConfigError, config_to_dict
from align.pipeline.layout import final_model, heldout_pairs, stage_dir
from align.pipeline.sample_pairs import SamplePairsConfig, check_config, run_sample_pairs

ONPOLICY = "onpolicy"  # the RM's name for the held-out sampled pairs (eval/report.json, accuracy.png)


@dataclasses.dataclass
class SamplePairsStageConfig(SamplePairsConfig):
    """The pipeline's sample_pairs stage: SamplePairsConfig for the training prompts (embedded split train),
    and a second run on held-out prompts for the reward model's on-policy evaluation."""

    heldout_prompts: int = doc(
        128,
        "Held-out prompts (dataset=embedded: split heldout, the same embedded_seed) sampled and paired like "
        "the training prompts into sample_pairs/heldout/, scored by the RM as `onpolicy`; 0: no held-out run.",
    )


# Keys the pipeline sets in the sample_pairs section, and in the others when they read its pairs.
SAMPLE_PAIRS_WIRED = {"output_dir", "overwrite", "model_name_or_path", "embedded_split", "reward_model_path"}
RM_SAMPLED_WIRED = {"rm": {"rm_dataset"}, "ppo": {"dataset", "query_count", "query_seed"}}
DPO_SAMPLED_WIRED = {"dpo": {"dataset"}}
SAMPLED_REASON = {
    "rm": "rm_data=sampled: the RM step trains on the sample_pairs stage's pairs",
    "ppo": "rm_data=sampled: PPO samples the prompts the RM's pairs came from",
    "dpo": "dpo_data=sampled: DPO trains on the sample_pairs stage's pairs",
}


def sample_pairs_wiring(root: Path) -> dict[str, Any]:
    """The sample_pairs stage's wiring: it samples the SFT model on the training split into its stage dir."""
    return {
        "output_dir": str(stage_dir(root, "sample_pairs")),
        "model_name_or_path": str(final_model(root, "sft")),
        "embedded_split": "train",
        "reward_model_path": None,
    }


def check_stage_config(cfg: SamplePairsStageConfig, source: str) -> None:
    """Refuse, before anything runs, a sample_pairs section the pipeline cannot run."""
    if cfg.reward == "model":
        raise ConfigError(
            f"{source}: reward=model needs a reward model, and the pipeline's comes after this stage; "
            "label with reward=verifier (embedded tasks) or reward=checker"
        )
    try:
        check_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if cfg.heldout_prompts < 0:
        raise ConfigError(f"{source}: heldout_prompts must be >= 0, got {cfg.heldout_prompts}")
    if cfg.heldout_prompts and cfg.dataset != "embedded":
        raise ConfigError(
            f"{source}: heldout_prompts={cfg.heldout_prompts} samples the embedded held-out split, which a "
            f"prompt file ({cfg.dataset}) does not have; set heldout_prompts=0"
        )


def sampled_wired(cfg: PipelineConfig) -> dict[str, set[str]]:
    """The keys of the rm, ppo and dpo sections that rm_data / dpo_data = sampled make the pipeline's."""
    wired: dict[str, set[str]] = {}
    if cfg.rm_data == "sampled":
        wired.update(RM_SAMPLED_WIRED)
    if cfg.dpo_data == "sampled":
        wired.update(DPO_SAMPLED_WIRED)
    return wired


def sampled_wiring(
    cfg: PipelineConfig, stage: str, sample_pairs: SamplePairsStageConfig | None
) -> dict[str, Any]:
    """What rm_data / dpo_data = sampled set in `stage`'s config, from the sample_pairs stage's config
    (built before rm, ppo and dpo: None only for the stages before it, which it never wires)."""
    root = Path(cfg.output_dir)
    pairs = str(final_model(root, "sample_pairs"))
    if stage == "rm" and cfg.rm_data == "sampled":
        return {"rm_dataset": pairs}  # and `onpolicy` joins eval_datasets: with_onpolicy_eval
    if stage == "ppo" and cfg.rm_data == "sampled" and sample_pairs is not None:
        return {
            "dataset": sample_pairs.dataset,
            "query_count": sample_pairs.embedded_prompts,
            "query_seed": sample_pairs.embedded_seed,
        }
    if stage == "dpo" and cfg.dpo_data == "sampled":
        return {"dataset": pairs}
    return {}


def with_onpolicy_eval(
    cfg: PipelineConfig, rm_cfg: Any, sample_pairs: SamplePairsStageConfig, source: str
) -> Any:
    """The RM config with the held-out sampled pairs added to its eval_datasets as `onpolicy` (after the
    user's own sets), where rm_data=sampled and the sample_pairs stage has a held-out run."""
    if cfg.rm_data != "sampled" or not sample_pairs.heldout_prompts:
        return rm_cfg
    from align.train.reward_data import dataset_name

    for entry in rm_cfg.eval_datasets:
        name, sep, _ = entry.partition("=")
        if (name.strip() if sep else dataset_name(entry)) == ONPOLICY:
            raise ConfigError(
                f"{source}: eval_datasets: {entry!r} takes the name {ONPOLICY!r}, which the pipeline gives the "
                "held-out sampled pairs (rm_data=sampled); name it otherwise"
            )
    onpolicy = f"{ONPOLICY}={heldout_pairs(cfg.output_dir)}"
    return dataclasses.replace(rm_cfg, eval_datasets=[*rm_cfg.eval_datasets, onpolicy])


# --------------------------------------------------------------------------------------------------------
# The stage


def stage_runs(cfg: SamplePairsStageConfig) -> list[tuple[str, SamplePairsConfig]]:
    """(name, config) of the stage's sampling runs: the training prompts, then the held-out ones."""
    train = SamplePairsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplePairsConfig)})
    runs = [("train", train)]
    if cfg.heldout_prompts:
        held = dataclasses.replace(
            train,
            embedded_split="heldout",
            embedded_prompts=cfg.heldout_prompts,
            output_dir=str(Path(cfg.output_dir) / "heldout"),
        )
        runs.append(("heldout", held))
    return runs


def _finished_run(run: SamplePairsConfig) -> dict[str, Any] | None:
    """The report of a run already done with this config (an interrupted stage resumes after it), else None."""
    out = Path(run.output_dir)
    try:
        report = json.loads((out / "report.json").read_text())
        written = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    same = written == json.loads(json.dumps(config_to_dict(run)))
    return report if same and report.get("stopped") is None and (out / "pairs.jsonl").is_file() else None


def run_sample_pairs_stage(cfg: SamplePairsStageConfig) -> dict[str, Any]:
    """Sample and pair the training prompts, then the held-out ones; summary.json last (the stage is then
    complete). Sampling runs on the main process only; the others wait. A run finished before an
    interruption is not redone."""
    state = PartialState()
    out = Path(cfg.output_dir)
    summary: dict[str, Any] = {"stage": "sample_pairs", "output_dir": str(out)}
    if state.is_main_process:
        start = time.perf_counter()
        for name, run in stage_runs(cfg):
            report = _finished_run(run)
            if report is None:
                report = run_sample_pairs(run)
            else:
                print(f"[sample_pairs] {name}: {run.output_dir} is complete (same config), kept")
            summary[name] = {"pairs": str(Path(run.output_dir) / "pairs.jsonl"), "report": report}
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    state.wait_for_everyone()
    return summary
