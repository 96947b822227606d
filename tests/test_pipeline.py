"""The pipeline on tiny byte-level models: wiring, strict sections, skip, resume, refusal, the report."""

import functools
import json
from pathlib import Path

import pytest

from align.config import PipelineConfig
from align.config_loader import ConfigError, load_config
from align.pipeline.layout import final_model
from align.pipeline.run import (
    PipelineError,
    default_runners,
    read_state,
    run_pipeline,
    split_stage_overrides,
    stage_configs,
)
from align.tracking import read_metrics
from align.train.sft import run_sft

QUIET = {"report_to": ["none"], "progress": False}


def _sections(model_dir) -> dict:
    """A few steps per stage on the tiny byte model: each stage reads the one before it."""
    return {
        "sft": {
            "model_name_or_path": str(model_dir),
            "embedded_train_tasks": 16,
            "max_length": 256,
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 2,
            "save_steps": 1,
            "eval_tasks": 0,
            **QUIET,
        },
        "rm": {
            "embedded_pmp_pairs": 8,
            "embedded_rm_pairs": 8,
            "embedded_eval_pairs": 8,
            "max_length": 256,
            "batch_size": 4,
            "micro_batch_size": 4,
            "max_steps": 1,
            **QUIET,
        },
        "ppo": {
            "max_steps": 1,
            "batch_size": 2,
            "micro_batch_size": 4,
            "max_new_tokens": 4,
            "value_warmup_steps": 0,
            "ppo_epochs": 1,
            "ptx_coef": 0.0,
            "log_rollouts": 0,
            "max_length": 512,
            **QUIET,
        },
        "dpo": {
            "embedded_pairs": 8,
            "max_length": 512,
            "batch_size": 4,
            "micro_batch_size": 4,
            "max_steps": 1,
            "eval_tasks": 0,
            **QUIET,
        },
    }


def _cfg(model_dir, out, **kw) -> PipelineConfig:
    base = dict(
        output_dir=str(out),
        eval_num_prompts=4,
        eval_max_new_tokens=4,
        eval_batch_size=4,
        eval_tax_max_rows=4,
        **_sections(model_dir),
    )
    base.update(kw)
    return PipelineConfig(**base)


def _counting(calls: dict, runners: dict | None = None) -> dict:
    """The real stage functions (or the given ones), counting their calls."""
    runners = {**default_runners(), **(runners or {})}

    def wrap(name, fn):
        def run(cfg):
            calls[name] = calls.get(name, 0) + 1
            return fn(cfg)

        return run

    return {name: wrap(name, fn) for name, fn in runners.items()}


def _snapshot(root: Path) -> dict[str, bytes]:
    """Bytes of every stage's metrics and final weights, to show a re-run left them alone."""
    files = [p for p in root.rglob("*") if p.is_file() and (p.name == "metrics.jsonl" or "final" in p.parts)]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(files)}


def test_wiring_each_stage_reads_the_previous_output(tmp_path):
    cfg = PipelineConfig(output_dir=str(tmp_path / "p"), ppo={"kl_coef": 0.1}, rm={"learning_rate": 1e-5})
    configs = stage_configs(cfg)
    root = tmp_path / "p"
    sft_final, rm_final = str(root / "sft" / "final"), str(root / "rm" / "rm" / "final")
    assert configs["sft"].output_dir == str(root / "sft")
    assert (configs["rm"].model_name_or_path, configs["rm"].stage) == (sft_final, "pmp+rm")
    assert configs["rm"].output_dir == str(root / "rm") and configs["rm"].learning_rate == 1e-5
    assert configs["ppo"].model_name_or_path == sft_final and configs["ppo"].reward_model_path == rm_final
    assert configs["ppo"].value_model_path is None  # the value model starts from the reward model
    assert not configs["ppo"].train_missing_stages and configs["ppo"].kl_coef == 0.1
    assert configs["dpo"].model_name_or_path == sft_final and configs["dpo"].ref_model_path is None
    assert str(final_model(root, "rm")) == rm_final


def test_a_typo_in_any_section_fails_before_any_stage_runs(tmp_path):
    calls: dict = {}
    out = tmp_path / "never"
    fake = {s: lambda cfg: pytest.fail("no stage may run") for s in ("sft", "rm", "ppo", "dpo")}
    with pytest.raises(ConfigError, match=r"section 'ppo': unknown key 'kl_coeff' for PPOConfig.*'kl_coef'"):
        run_pipeline(
            PipelineConfig(output_dir=str(out), ppo={"kl_coeff": 0.1}), runners=_counting(calls, fake)
        )
    # a command-line override into the last section is checked just the same
    with pytest.raises(ConfigError, match="unknown key 'betta' for DPOConfig"):
        run_pipeline(PipelineConfig(output_dir=str(out)), stage_overrides=["dpo.betta=1"], runners=fake)
    # a wiring key is the pipeline's, not the user's
    with pytest.raises(ConfigError, match="reward_model_path is set by the pipeline"):
        run_pipeline(PipelineConfig(output_dir=str(out), ppo={"reward_model_path": "x"}), runners=fake)
    with pytest.raises(ConfigError, match="expected a number"):
        run_pipeline(PipelineConfig(output_dir=str(out), sft={"learning_rate": "fast"}), runners=fake)
    assert calls == {} and not out.exists()


def test_stage_overrides_split_from_pipeline_keys():
    plain, staged = split_stage_overrides(
        ["stages=sft,rm", "ppo.kl_coef=0.1", "output_dir=a.b", "--dpo.beta=0.2"]
    )
    assert plain == ["stages=sft,rm", "output_dir=a.b"] and staged == ["ppo.kl_coef=0.1", "dpo.beta=0.2"]


@pytest.fixture(scope="module")
def finished(tiny_byte_dir, tmp_path_factory):
    """One full run: SFT -> PMP -> RM -> PPO and SFT -> DPO, then the evaluation and the report."""
    root = tmp_path_factory.mktemp("pipe") / "run"
    calls: dict = {}
    summary = run_pipeline(_cfg(tiny_byte_dir, root), runners=_counting(calls))
    return root, calls, summary


def test_full_run_wires_stages_and_writes_the_report(finished):
    root, calls, summary = finished
    assert calls == {"sft": 1, "rm": 1, "ppo": 1, "dpo": 1}
    assert summary["stages"] == {"sft": "done", "rm": "done", "ppo": "done", "dpo": "done"}
    sft_final = str(root / "sft" / "final")
    # What each stage actually loaded, from its own summary: the previous stage's output.
    rm_summary = json.loads((root / "rm" / "summary.json").read_text())
    assert rm_summary["pmp"]["model_from"] == sft_final
    assert rm_summary["rm"]["model_from"] == str(root / "rm" / "pmp" / "final")
    assert json.loads((root / "dpo" / "summary.json").read_text())["policy"] == sft_final
    state = read_state(root)
    ppo_cfg = state["stages"]["ppo"]["signature"]["config"]
    assert ppo_cfg["model_name_or_path"] == sft_final
    assert ppo_cfg["reward_model_path"] == str(root / "rm" / "rm" / "final")
    # keep_checkpoints=false: a completed stage's checkpoints are deleted, its final/ stays
    assert not [p for p in root.rglob("checkpoints") if p.is_dir()]
    assert {s: r["status"] for s, r in state["stages"].items()} == dict.fromkeys(
        ("sft", "rm", "ppo", "dpo"), "done"
    )
    # The evaluation compared each aligned policy with the SFT model, judged by the pipeline's RM.
    for policy in ("ppo", "dpo"):
        result = json.loads((root / "eval" / policy / "eval.json").read_text())
        # Paths relative to the report's directory (eval/<policy>/): no machine paths in the record.
        assert result["policy"] == f"../../{policy}/final" and result["baseline"] == "../../sft/final"
        assert result["reward_model"] == "../../rm/rm/final"
        assert result["win_rate_gold"]["n"] == 4
    report = (root / "report.md").read_text()
    for heading in ("**sft**", "**rm**", "**ppo**", "**dpo**", "| ppo |", "| dpo |"):
        assert heading in report
    assert "curves.png" in report and "win_rates.png" in report
    for png in ("curves.png", "win_rates.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_complete_stages_and_refuses_a_changed_one(finished, tiny_byte_dir, capsys):
    root, _, _ = finished
    before = _snapshot(root)
    eval_calls = []
    calls: dict = {}
    summary = run_pipeline(
        _cfg(tiny_byte_dir, root), runners=_counting(calls), evaluator=lambda *a, **k: eval_calls.append(a)
    )
    assert calls == {} and eval_calls == []  # nothing trained, nothing re-evaluated
    assert summary["stages"] == dict.fromkeys(("sft", "rm", "ppo", "dpo"), "skipped")
    assert capsys.readouterr().out.count("skipped") >= 4
    assert _snapshot(root) == before and len(before) > 8

    changed = _cfg(tiny_byte_dir, root)
    changed.ppo = {**changed.ppo, "kl_coef": 0.1}
    with pytest.raises(
        PipelineError, match=r"stage ppo: config changed.*kl_coef: 0.04 -> 0.1.*overwrite=true"
    ):
        run_pipeline(changed, runners=_counting(calls))
    # changing SFT makes every later stage out of date too: all four named, in one error
    upstream = _cfg(tiny_byte_dir, root)
    upstream.sft = {**upstream.sft, "learning_rate": 1e-3}
    with pytest.raises(PipelineError) as err:
        run_pipeline(upstream, runners=_counting(calls))
    assert [f"stage {s}:" in str(err.value) for s in ("sft", "rm", "ppo", "dpo")] == [True] * 4
    assert "input stage sft changed" in str(err.value)
    assert calls == {} and _snapshot(root) == before

    # overwrite=true re-runs just the changed stage, from a clean directory, and its evaluation
    (root / "ppo" / "stale.txt").write_text("old")
    changed.overwrite = True
    run_pipeline(changed, runners=_counting(calls), evaluator=lambda *a, **k: eval_calls.append(a[0]))
    assert calls == {"ppo": 1} and eval_calls == [str(root / "ppo" / "final")]
    assert not (root / "ppo" / "stale.txt").exists()
    assert read_state(root)["stages"]["ppo"]["signature"]["config"]["kl_coef"] == 0.1


def test_an_interrupted_stage_resumes_from_its_checkpoint(tiny_byte_dir, tmp_path, capsys):
    root = tmp_path / "run"
    cfg = _cfg(tiny_byte_dir, root, stages=["sft"], evaluate=False)
    stopped = run_pipeline(cfg, runners={"sft": functools.partial(run_sft, stop_after_step=1)})
    assert stopped["interrupted"] == "sft"
    state = read_state(root)
    assert state["stages"]["sft"]["status"] == "interrupted"
    assert (root / "sft" / "checkpoints" / "step-1").is_dir() and not (root / "sft" / "final").exists()
    first_step = read_metrics(root / "sft")
    assert [r["step"] for r in first_step] == [1]

    # A kill (SIGKILL, power loss) leaves the attempt as it was when the stage started: no outcome.
    del state["stages"]["sft"]["attempts"][0]["outcome"], state["stages"]["sft"]["attempts"][0]["seconds"]
    state["stages"]["sft"]["status"] = "running"
    (root / "pipeline_state.json").write_text(json.dumps(state))

    calls: dict = {}
    capsys.readouterr()
    run_pipeline(cfg, runners=_counting(calls))
    out = capsys.readouterr().out
    assert calls == {"sft": 1} and "resuming (interrupted before)" in out
    assert "resuming from" in out and "step-1" in out  # the loop continued from the checkpoint
    records = read_metrics(root / "sft")
    assert [r["step"] for r in records] == [1, 2] and records[0] == first_step[0]
    state = read_state(root)["stages"]["sft"]
    assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["killed", "done"]
    assert state["attempts"][0]["seconds"] >= 0  # up to its last metrics line
    assert "deleted its checkpoints" in out and not (root / "sft" / "checkpoints").exists()
    assert (root / "report.md").is_file()


@pytest.mark.parametrize("name", ["qwen.yaml", "quick.yaml"])
def test_shipped_configs_validate_every_section(name):
    cfg = load_config(PipelineConfig, Path(__file__).resolve().parents[1] / "recipes/configs/pipeline" / name)
    configs = stage_configs(cfg)
    root = Path(cfg.output_dir)
    assert configs["ppo"].reward_model_path == str(root / "rm" / "rm" / "final")
    if name == "qwen.yaml":  # the report's numbers reach the stage configs
        assert (configs["ppo"].kl_coef, configs["ppo"].value_warmup_steps, configs["ppo"].policy_lr) == (
            0.04,
            50,
            1e-6,
        )
        assert (configs["rm"].learning_rate, configs["rm"].batch_size) == (3e-6, 64)


def test_recipe_exits_2_with_one_line_on_a_section_typo(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/pipeline.py",
            f"output_dir={tmp_path / 'p'}",
            "stages=sft,ppo",
            "ppo.kl_coeff=0.1",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: pipeline section 'ppo': unknown key 'kl_coeff' for PPOConfig (did you mean 'kl_coef'?)"
    ]
    assert not (tmp_path / "p").exists()


def test_lora_settings_leave_a_full_weight_stage_signature_alone():
    """A stage run without LoRA keeps its signature when a LoRA default changes (the RL stages' lora_dropout
    went 0.05 -> 0.0); with LoRA on, the same change is a change."""
    import dataclasses

    from align.config import PPOConfig
    from align.pipeline.run import _same_signature, signature, signature_hash

    full = PPOConfig(use_lora=False)
    sig = signature(full, {"rm": "abc"})
    assert not any(k.startswith("lora_") for k in sig["config"])
    old = {**sig, "config": {**sig["config"], "lora_dropout": 0.05, "lora_r": 8}}
    assert _same_signature({"hash": signature_hash(old), "signature": old}, sig, signature_hash(sig))
    lora = signature(dataclasses.replace(full, use_lora=True), {"rm": "abc"})
    lora_old = {**lora, "config": {**lora["config"], "lora_dropout": 0.05}}
    assert lora["config"]["lora_dropout"] == 0.0
    assert not _same_signature(
        {"hash": signature_hash(lora_old), "signature": lora_old}, lora, signature_hash(lora)
    )


def test_a_key_added_since_a_stage_ran_is_unchanged_at_its_default():
    """A PPO stage recorded before the RL guards existed (no reward_clip in its record) is the same stage
    while reward_clip stays at its default, and a changed one when it is set."""
    import dataclasses

    from align.config import PPOConfig
    from align.pipeline.run import _same_signature, config_defaults, signature, signature_hash

    cfg = PPOConfig()
    sig = signature(cfg, {"rm": "abc"})
    old = {**sig, "config": {k: v for k, v in sig["config"].items() if k != "reward_clip"}}
    record = {"hash": signature_hash(old), "signature": old}
    assert _same_signature(record, sig, signature_hash(sig), config_defaults(cfg))
    assert not _same_signature(record, sig, signature_hash(sig))  # without the defaults: a change
    clipped = signature(dataclasses.replace(cfg, reward_clip=5.0), {"rm": "abc"})
    assert not _same_signature(record, clipped, signature_hash(clipped), config_defaults(cfg))
