"""The whole chain: SFT -> PMP -> RM -> PPO, and SFT -> DPO, then an evaluation and one report; with
rm_data=sampled the on-policy chain SFT -> sample_pairs -> PMP -> RM -> PPO (:mod:`align.pipeline.sampled`).

Each stage runs in-process with the existing loop (run_sft, run_pmp_then_rm, run_ppo, run_dpo) on a
config the pipeline builds: the user's section for that stage, validated strictly against the stage's
config class before anything runs, plus the wiring (where the stage writes, which earlier outputs it
reads). `pipeline_state.json` records each stage's config signature and timings, so a re-run

- skips a stage whose outputs are complete and whose signature is unchanged,
- resumes a stage that was interrupted (the loops continue from their checkpoints, resume=auto),
- refuses a stage whose config, or an earlier stage's, changed, unless overwrite=true (then the
  stage's old outputs are deleted and it runs again).

A stage's signature holds its own config and its earlier stages' signature hashes, so changing SFT
makes RM, PPO and DPO out of date too. The default chain (rm_data and dpo_data = own) signs each stage as
it did before the sample_pairs stage existed: its inputs and wiring are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState

from align.config import DPOConfig, PipelineConfig, PPOConfig, RMConfig, SFTConfig
from align.config_loader import ConfigError, _parse_override, build_config
from align.pipeline.layout import STAGES, final_model, is_complete, stage_dir
from align.pipeline.report import write_report
from align.pipeline.sampled import (
    SAMPLE_PAIRS_WIRED,
    SAMPLED_REASON,
    SamplePairsStageConfig,
    check_stage_config,
    run_sample_pairs_stage,
    sample_pairs_wiring,
    sampled_wired,
    sampled_wiring,
    with_onpolicy_eval,
)
from align.train.process import RunSetupError

CONFIG_CLASSES: dict[str, type] = {
    "sft": SFTConfig,
    "sample_pairs": SamplePairsStageConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
}
UPSTREAM = {"sft": (), "sample_pairs": ("sft",), "rm": ("sft",), "ppo": ("sft", "rm"), "dpo": ("sft",)}
# Keys the pipeline sets from the stage layout; a user value would break the chain silently.
WIRED = {
    "sft": {"output_dir", "overwrite"},
    "sample_pairs": SAMPLE_PAIRS_WIRED,
    "rm": {"output_dir", "overwrite", "model_name_or_path", "init_from", "stage"},
    "ppo": {
        "output_dir",
        "overwrite",
        "model_name_or_path",
        "reward_model_path",
        "value_model_path",
        "train_missing_stages",
    },
    "dpo": {"output_dir", "overwrite", "model_name_or_path", "ref_model_path"},
}
# Keys that change how a stage reports, not what it computes: a change does not make it out of date.
# Checkpoint frequency is one of them: resume reproduces the uninterrupted run exactly (tested per loop).
UNCOMPARED = {
    "progress",
    "report_to",
    "overwrite",
    "resume",
    "logging_steps",
    "save_steps",
    "save_total_limit",
}
STATE_FILE = "pipeline_state.json"

Runner = Callable[[Any], dict[str, Any]]


class PipelineError(RunSetupError):
    """A pipeline that cannot run as configured (a changed stage, a missing input); exit status 2."""


# --------------------------------------------------------------------------------------------------
# Layout and configs


def split_stage_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `ppo.kl_coef=0.1`-style items (a stage name, a dot, a key) from the pipeline's own argv."""
    plain, staged = [], []
    for item in argv:
        head = item.split("=", 1)[0].lstrip("-")
        if "=" in item and "." in head and head.split(".", 1)[0] in STAGES:
            staged.append(item.lstrip("-"))
        else:
            plain.append(item)
    return plain, staged


def with_stage_overrides(cfg: PipelineConfig, overrides: Sequence[str]) -> PipelineConfig:
    """A copy of `cfg` whose stage sections carry the `stage.key=value` overrides (applied last)."""
    sections = {stage: dict(_section(cfg, stage)) for stage in STAGES}
    for item in overrides:
        key, value = _parse_override(item)
        stage, _, name = key.partition(".")
        if stage not in sections or not name:
            raise ConfigError(
                f"command line: {item!r} is not of the form stage.key=value ({', '.join(STAGES)})"
            )
        sections[stage][name] = value
    return dataclasses.replace(cfg, **sections)


def upstream(cfg: PipelineConfig) -> dict[str, tuple[str, ...]]:
    """Each stage's input stages: UPSTREAM, plus sample_pairs for a stage that reads its pairs."""
    inputs = dict(UPSTREAM)
    if cfg.rm_data == "sampled":
        inputs["rm"] = ("sft", "sample_pairs")
    if cfg.dpo_data == "sampled":
        inputs["dpo"] = ("sft", "sample_pairs")
    return inputs


def _section(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    section = getattr(cfg, stage)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"pipeline config: {stage}: expected a mapping of key: value, got {section!r}")
    return section


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's config: its section, checked strictly, plus the wiring between stages.

    All five are built (and so validated) whichever stages run, so a typo anywhere fails at once.
    """
    root = Path(cfg.output_dir)
    wiring: dict[str, dict[str, Any]] = {
        "sft": {"output_dir": str(stage_dir(root, "sft"))},
        "sample_pairs": sample_pairs_wiring(root),
        "rm": {
            "output_dir": str(stage_dir(root, "rm")),
            "stage": "pmp+rm",
            "model_name_or_path": str(final_model(root, "sft")),
            "init_from": None,
        },
        "ppo": {
            "output_dir": str(stage_dir(root, "ppo")),
            "model_name_or_path": str(final_model(root, "sft")),
            "reward_model_path": str(final_model(root, "rm")),
            "value_model_path": None,  # the value model starts from the reward model
            "train_missing_stages": False,
        },
        "dpo": {
            "output_dir": str(stage_dir(root, "dpo")),
            "model_name_or_path": str(final_model(root, "sft")),
            "ref_model_path": None,  # the reference is the starting (SFT) policy
        },
    }
    configs: dict[str, Any] = {}
    sampled = sampled_wired(cfg)
    for stage in STAGES:
        section = _section(cfg, stage)
        source = f"pipeline section '{stage}'"
        wired = sorted(WIRED[stage] & set(section))
        if wired:
            raise ConfigError(
                f"{source}: {', '.join(wired)} is set by the pipeline (it wires each stage to the previous "
                "one's output under output_dir); remove it"
            )
        wired = sorted(sampled.get(stage, set()) & set(section))
        if wired:
            raise ConfigError(
                f"{source}: {', '.join(wired)} is set by the pipeline ({SAMPLED_REASON[stage]}); remove it"
            )
        values = {**section, **wiring[stage], **sampled_wiring(cfg, stage, configs.get("sample_pairs"))}
        configs[stage] = build_config(CONFIG_CLASSES[stage], values, source=source)
        if stage == "sample_pairs":
            check_stage_config(configs[stage], source)
        if stage == "rm":
            configs[stage] = with_onpolicy_eval(cfg, configs[stage], configs["sample_pairs"], source)
    return configs


def signature(stage_cfg: Any, upstream_hashes: dict[str, str]) -> dict[str, Any]:
    """What decides a stage's output: its config (less reporting keys) and its inputs' signatures."""
    config = {k: v for k, v in dataclasses.asdict(stage_cfg).items() if k not in UNCOMPARED}
    if not config.get("use_lora", True):
        # Without LoRA its settings decide nothing: a changed default (RL stages' lora_dropout 0.05 -> 0)
        # must not make a finished full-weight stage look changed.
        config = {k: v for k, v in config.items() if not k.startswith("lora_")}
    return {"config": config, "upstream": dict(upstream_hashes)}


def signature_hash(sig: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _same_signature(
    record: dict[str, Any], sig: dict[str, Any], digest: str, defaults: dict[str, Any] | None = None
) -> bool:
    """Whether a stage's recorded run had this signature. A key recorded then that the stage's config no
    longer has is left out of the comparison: keys are removed from a stage only when its loop never
    read them (e.g. PPO's skip_bad), so they cannot have changed its output. A key the config has gained
    since counts as unchanged while it holds its default (`defaults`): new keys arrive off by default
    (e.g. the RL guards), so the recorded run behaved as the default does."""
    if record.get("hash") == digest:
        return True
    recorded = record.get("signature")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        return False
    kept = {k: v for k, v in recorded["config"].items() if k in sig["config"]}
    for key, value in sig["config"].items():
        if key not in recorded["config"] and defaults is not None and defaults.get(key, object()) == value:
            kept[key] = value
    return signature_hash({**recorded, "config": kept}) == digest


def config_defaults(stage_cfg: Any) -> dict[str, Any]:
    """The stage config class's defaults, as `signature` records values."""
    return dataclasses.asdict(type(stage_cfg)())


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`key: old -> new` for the differing config keys and changed inputs, for the refusal message."""
    parts = []
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            parts.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    for up in sorted(set(old.get("upstream", {})) | set(new["upstream"])):
        if old.get("upstream", {}).get(up) != new["upstream"].get(up):
            parts.append(f"input stage {up} changed")
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")


# --------------------------------------------------------------------------------------------------
# State file


def read_state(root: str | Path) -> dict[str, Any]:
    path = Path(root) / STATE_FILE
    if not path.is_file():
        return {"stages": {}, "eval": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError as err:
        raise PipelineError(
            f"{path}: unreadable ({err}); delete it to start the pipeline's records afresh"
        ) from err
    state.setdefault("stages", {})
    state.setdefault("eval", {})
    return state


def write_state(root: str | Path, state: dict[str, Any]) -> None:
    """Write pipeline_state.json atomically (temp file, then rename), so a kill never leaves half of it."""
    path = Path(root) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Plan


@dataclass
class StagePlan:
    stage: str
    action: str  # skip | run | resume | rerun
    config: Any
    signature: dict[str, Any]
    hash: str
    reason: str


def plan_pipeline(cfg: PipelineConfig, configs: dict[str, Any], state: dict[str, Any]) -> list[StagePlan]:
    """Decide, before anything runs, what each requested stage does; refuse all conflicts in one error."""
    root = Path(cfg.output_dir)
    requested = [s for s in STAGES if s in cfg.stages]
    inputs = upstream(cfg)
    hashes: dict[str, str] = {}
    actions: dict[str, str] = {}
    plans, refusals = [], []
    for stage in STAGES:
        sig = signature(configs[stage], {up: hashes[up] for up in inputs[stage]})
        digest = hashes[stage] = signature_hash(sig)
        record = state["stages"].get(stage)
        same = record is not None and _same_signature(record, sig, digest, config_defaults(configs[stage]))
        if same and isinstance(record.get("hash"), str):
            hashes[stage] = record["hash"]  # later stages recorded this run's hash as their input
        complete = is_complete(root, stage)
        directory = stage_dir(root, stage)
        has_files = directory.is_dir() and any(directory.iterdir())
        if stage not in requested:
            # Not run now: a later stage may still read it, which needs it complete and current.
            actions[stage] = "skip" if (same and complete) else "absent"
            continue
        missing = [up for up in inputs[stage] if actions.get(up) == "absent"]
        if missing:
            refusals.append(
                f"{stage} needs the output of {', '.join(missing)}, which is not complete under {root} "
                f"with the current config; add {', '.join(missing)} to stages"
            )
            actions[stage] = "absent"
            continue
        upstream_runs = any(actions[up] != "skip" for up in inputs[stage])
        if same and complete and not upstream_runs:
            action, reason = "skip", "complete, same config"
        elif same and not complete and not upstream_runs:
            action, reason = ("resume", "interrupted: resuming") if has_files else ("run", "")
        elif not has_files:
            action, reason = "run", ""
        else:
            if record is None:
                why = f"{directory} holds outputs the pipeline has no record of"
            elif not same:
                why = f"config changed since it ran ({_changes(record.get('signature', {}), sig)})"
            else:
                why = "an earlier stage runs again, so its outputs would be stale"
            if not cfg.overwrite:
                refusals.append(
                    f"stage {stage}: {why}; set overwrite=true to delete {directory} and re-run it, "
                    "or use another output_dir"
                )
            action, reason = "rerun", why
        actions[stage] = action
        plans.append(StagePlan(stage, action, configs[stage], sig, digest, reason))
    if refusals:
        raise PipelineError("pipeline refused before running anything:\n  " + "\n  ".join(refusals))
    return plans


# --------------------------------------------------------------------------------------------------
# Run


def default_runners() -> dict[str, Runner]:
    from align.train.dpo import run_dpo
    from align.train.ppo import run_ppo
    from align.train.reward import run_pmp_then_rm
    from align.train.sft import run_sft

    return {
        "sft": run_sft,
        "sample_pairs": run_sample_pairs_stage,
        "rm": run_pmp_then_rm,
        "ppo": run_ppo,
        "dpo": run_dpo,
    }


def run_pipeline(
    cfg: PipelineConfig,
    *,
    stage_overrides: Sequence[str] = (),
    runners: dict[str, Runner] | None = None,
    evaluator: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Plan, run the stages in order, evaluate, write report.md; return the pipeline summary.

    `runners` replaces stage functions by name (tests count calls or stop a stage early);
    `evaluator` replaces align.evaluation.policy.compare_policies.
    A runner that returns {"stopped_at": n} (an interrupted stage) ends the pipeline there.
    """
    cfg = with_stage_overrides(cfg, stage_overrides)
    configs = stage_configs(cfg)  # every section validated before anything runs
    root = Path(cfg.output_dir)
    is_main = PartialState().is_main_process
    state = read_state(root)
    plans = plan_pipeline(cfg, configs, state)
    runners = {**default_runners(), **(runners or {})}
    started = time.perf_counter()
    summary: dict[str, Any] = {"stage": "pipeline", "output_dir": str(root), "stages": {}}
    for i, plan in enumerate(plans, 1):
        label = f"[pipeline {i}/{len(plans)}] {plan.stage}"
        if plan.action == "skip":
            print(f"{label}: skipped, {stage_dir(root, plan.stage)} is complete with the same config")
            summary["stages"][plan.stage] = "skipped"
            continue
        if plan.action == "rerun" and is_main:
            print(f"{label}: {plan.reason}; overwrite=true: deleting {stage_dir(root, plan.stage)}")
            shutil.rmtree(stage_dir(root, plan.stage), ignore_errors=True)
        PartialState().wait_for_everyone()  # no rank starts the stage while the old outputs go
        print(f"{label}: {'resuming (interrupted before)' if plan.action == 'resume' else 'running'}")
        record = state["stages"].get(plan.stage) if plan.action == "resume" else None
        record = record or {"attempts": []}
        for old in record["attempts"]:
            if "outcome" not in old:  # the process was killed mid-stage
                old.update(outcome="killed", seconds=_killed_seconds(stage_dir(root, plan.stage), old))
        record.update(status="running", signature=plan.signature, hash=plan.hash)
        attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "t0": time.time(), "action": plan.action}
        record["attempts"].append(attempt)
        state["stages"][plan.stage] = record
        # Recorded before the stage runs, so a kill mid-stage leaves a record the next run resumes from.
        if is_main:
            write_state(root, state)
        t0 = time.perf_counter()
        try:
            result = runners[plan.stage](plan.config)
        except BaseException as err:  # a kill (KeyboardInterrupt) too: record it, then let it go on
            attempt["seconds"] = round(time.perf_counter() - t0, 1)
            record["status"] = attempt["outcome"] = (
                "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            )
            record["error"] = f"{type(err).__name__}: {err}"
            if is_main:
                write_state(root, state)
            raise
        attempt["seconds"] = round(time.perf_counter() - t0, 1)
        if "stopped_at" in result:
            record["status"] = attempt["outcome"] = "interrupted"
            if is_main:
                write_state(root, state)
            print(f"{label}: stopped at step {result['stopped_at']}; run the pipeline again to resume")
            summary["stages"][plan.stage] = "interrupted"
            summary["interrupted"] = plan.stage
            return summary
        record["status"] = attempt["outcome"] = "done"
        record["seconds"] = round(sum(a.get("seconds") or 0.0 for a in record["attempts"]), 1)
        record.pop("error", None)
        if is_main:
            write_state(root, state)
            if not cfg.keep_checkpoints:
                freed = prune_stage_checkpoints(stage_dir(root, plan.stage))
                if freed:
                    print(f"{label}: complete; deleted its checkpoints ({freed / 1e9:.1f} GB)")
        summary["stages"][plan.stage] = "done"
        print(f"{label}: done in {attempt['seconds']:.0f} s")

    if cfg.evaluate and is_main:
        summary["eval"] = evaluate_policies(cfg, state, evaluator)
        write_state(root, state)
    if is_main:
        summary["report"] = str(write_report(root, state))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    for stage in ("ppo", "dpo", "sft"):
        if is_complete(root, stage):
            summary["final_model"] = str(final_model(root, stage))
            break
    summary["metrics"] = str(root / STATE_FILE)
    return summary


def prune_stage_checkpoints(directory: Path) -> int:
    """Delete every checkpoints/ folder under a completed stage (PMP and RM have one each); bytes freed."""
    freed = 0
    for ckpts in sorted(directory.rglob("checkpoints")):
        if ckpts.is_dir():
            freed += sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file())
            shutil.rmtree(ckpts, ignore_errors=True)
    return freed


def _killed_seconds(directory: Path, attempt: dict[str, Any]) -> float | None:
    """A killed attempt's duration, up to the last metrics line it wrote (None if it wrote none)."""
    written = [p.stat().st_mtime for p in directory.rglob("metrics.jsonl")]
    if not written or "t0" not in attempt:
        return None
    return round(max(written) - attempt["t0"], 1)


def evaluate_policies(
    cfg: PipelineConfig, state: dict[str, Any], evaluator: Callable[..., dict[str, Any]] | None
) -> dict[str, str]:
    """Compare each complete aligned policy (PPO, DPO) with the SFT model into eval/<policy>/.

    A comparison whose inputs and settings are unchanged since it was written is not redone.
    """
    root = Path(cfg.output_dir)
    if not (is_complete(root, "sft") and is_complete(root, "rm")):
        print("[pipeline] evaluation: needs complete sft and rm stages; skipped")
        return {}
    if evaluator is None:
        try:
            from align.evaluation.policy import compare_policies as evaluator
        except ImportError as err:
            print(f"[pipeline] evaluation: align.evaluation.policy is unavailable ({err}); skipped")
            return {}
    settings = {
        "num_prompts": cfg.eval_num_prompts,
        "max_new_tokens": cfg.eval_max_new_tokens,
        "batch_size": cfg.eval_batch_size,
        "seed": cfg.eval_seed,
        "tax_text": cfg.eval_tax_text,
        "tax_max_rows": cfg.eval_tax_max_rows,
    }
    done = {}
    for policy in ("ppo", "dpo"):
        if not is_complete(root, policy) or state["stages"].get(policy, {}).get("status") != "done":
            continue
        out = root / "eval" / policy
        inputs = {s: state["stages"].get(s, {}).get("hash") for s in ("sft", "rm", policy)}
        digest = signature_hash({"settings": settings, "inputs": inputs})
        record = state["eval"].get(policy, {})
        if record.get("hash") == digest and (out / "eval.json").is_file():
            print(f"[pipeline] evaluation of {policy}: {out} is up to date, skipped")
            done[policy] = str(out)
            continue
        print(f"[pipeline] evaluation: {policy} against the SFT model -> {out}")
        t0 = time.perf_counter()
        evaluator(
            str(final_model(root, policy)),
            str(final_model(root, "sft")),
            reward_model=str(final_model(root, "rm")),
            out_dir=str(out),
            cache_dir=str(root / "eval" / "cache"),  # the SFT side is scored once for both policies
            **settings,
        )
        state["eval"][policy] = {"hash": digest, "seconds": round(time.perf_counter() - t0, 1)}
        write_state(root, state)
        done[policy] = str(out)
    return done
