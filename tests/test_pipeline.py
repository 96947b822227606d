"""The pipeline on tiny byte-level models: wiring, strict sections, skip, resume, refusal, the report."""

import dataclasses
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
    assert "sample_pairs" not in report  # the default chain's report has no on-policy stage
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


@pytest.mark.parametrize("name", ["qwen.yaml", "quick.yaml", "rlhf.yaml"])
def test_shipped_configs_validate_every_section(name):
    cfg = load_config(PipelineConfig, Path(__file__).resolve().parents[1] / "recipes/configs/pipeline" / name)
    configs = stage_configs(cfg)
    root = Path(cfg.output_dir)
    assert configs["ppo"].reward_model_path == str(root / "rm" / "rm" / "final")
    # issue 21's chain: the settings of sample_pairs/embedded.yaml, rm/onpolicy.yaml (3 epochs), ppo/rlhf.yaml
    if name == "rlhf.yaml":
        sp, rm, ppo = configs["sample_pairs"], configs["rm"], configs["ppo"]
        assert cfg.stages == ["sft", "sample_pairs", "rm", "ppo"] and cfg.rm_data == cfg.dpo_data == "sampled"
        assert (sp.embedded_prompts, sp.embedded_seed, sp.heldout_prompts) == (256, 43, 128)
        assert (sp.samples_per_query, sp.max_pairs_per_prompt, sp.reward) == (8, 8, "verifier")
        assert (ppo.query_count, ppo.query_seed) == (sp.embedded_prompts, sp.embedded_seed) == (256, 43)
        assert rm.rm_dataset == configs["dpo"].dataset == str(root / "sample_pairs" / "pairs.jsonl")
        assert rm.eval_datasets == [f"onpolicy={root / 'sample_pairs' / 'heldout' / 'pairs.jsonl'}"]
        assert (rm.pair_grouping, rm.eval_dataset) == ("prompt", "embedded")
        assert (rm.rm_num_epochs, rm.num_epochs, rm.batch_size, rm.micro_batch_size) == (3, 1, 16, 4)
        assert (ppo.reward_anchor, ppo.use_lora, ppo.kl_coef, ppo.max_steps) == ("reference", True, 0.05, 40)
        assert (configs["dpo"].rpo_alpha, configs["dpo"].batch_size, configs["dpo"].eval_tasks) == (1.0, 8, 0)
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


# --------------------------------------------------------------------------------------------------
# The on-policy chain (issue 21): SFT -> sample_pairs -> PMP -> RM -> PPO, DPO on the sampled pairs

RLHF_STAGES = ["sft", "sample_pairs", "rm", "ppo", "dpo"]


def _rlhf_cfg(model_dir, out, **kw) -> PipelineConfig:
    """The sampled chain on the tiny model: 4 training prompts (seed 7, not PPO's default 43, so PPO reads
    them only through the wiring) x 3 samples, 2 held-out prompts; the RM step runs 3 epochs over whole
    prompt groups (PMP one), so its step count shows rm_num_epochs reached it."""
    sections = _sections(model_dir)
    sections["sample_pairs"] = {
        "embedded_prompts": 4,
        "embedded_seed": 7,
        "heldout_prompts": 2,
        "samples_per_query": 3,
        "max_new_tokens": 4,
        "max_pairs_per_prompt": 2,
        "batch_size": 12,
        "progress": False,
    }
    sections["rm"] = {
        **sections["rm"],
        "pair_grouping": "prompt",
        "eval_dataset": "embedded",
        "max_steps": -1,
        "batch_size": 4,
        "micro_batch_size": 2,
        "rm_num_epochs": 3,
    }
    sections["ppo"] = {**sections["ppo"], "log_rollouts": 4}
    base = dict(
        output_dir=str(out),
        stages=RLHF_STAGES,
        rm_data="sampled",
        dpo_data="sampled",
        eval_num_prompts=4,
        eval_max_new_tokens=4,
        eval_batch_size=4,
        eval_tax_max_rows=4,
        **sections,
    )
    base.update(kw)
    return PipelineConfig(**base)


def test_rlhf_chain_wires_sampled_pairs_into_rm_ppo_and_dpo(tmp_path):
    from align.pipeline.run import plan_pipeline

    root = tmp_path / "p"
    cfg = PipelineConfig(
        output_dir=str(root),
        stages=RLHF_STAGES,
        rm_data="sampled",
        dpo_data="sampled",
        sample_pairs={"embedded_prompts": 96, "embedded_seed": 11, "samples_per_query": 4},
        rm={"eval_datasets": ["mine=/data/extra.jsonl"], "pair_grouping": "prompt"},
    )
    configs = stage_configs(cfg)
    sp, rm, ppo, dpo = (configs[s] for s in ("sample_pairs", "rm", "ppo", "dpo"))
    pairs = str(root / "sample_pairs" / "pairs.jsonl")
    # sample_pairs samples the SFT model on the training split into its stage dir
    assert (sp.model_name_or_path, sp.output_dir) == (str(root / "sft" / "final"), str(root / "sample_pairs"))
    assert (sp.embedded_split, sp.reward, sp.reward_model_path) == ("train", "verifier", None)
    assert sp.heldout_prompts == 128
    # PMP keeps the generated comparisons; the RM step trains on the sampled pairs, scores the held-out ones
    assert (rm.stage, rm.dataset, rm.rm_dataset, rm.pair_grouping) == ("pmp+rm", "embedded", pairs, "prompt")
    assert rm.eval_datasets == [
        "mine=/data/extra.jsonl",
        f"onpolicy={root / 'sample_pairs' / 'heldout' / 'pairs.jsonl'}",
    ]
    # PPO samples the prompts the RM's pairs came from, against that RM
    assert (ppo.dataset, ppo.query_count, ppo.query_seed) == ("embedded", 96, 11)
    assert ppo.reward_model_path == str(root / "rm" / "rm" / "final")
    assert (dpo.dataset, dpo.model_name_or_path) == (pairs, str(root / "sft" / "final"))

    # Every stage runs, and RM and DPO sign the sample_pairs stage as an input (PPO through the RM)
    plans = plan_pipeline(cfg, configs, read_state(root))
    assert [(p.stage, p.action) for p in plans] == [(s, "run") for s in RLHF_STAGES]
    inputs = {p.stage: sorted(p.signature["upstream"]) for p in plans}
    assert inputs == {
        "sft": [],
        "sample_pairs": ["sft"],
        "rm": ["sample_pairs", "sft"],
        "ppo": ["rm", "sft"],
        "dpo": ["sample_pairs", "sft"],
    }
    # A stage that reads the pairs needs the sample_pairs stage run (or complete): refused, named
    without = dataclasses.replace(cfg, stages=["sft", "rm", "ppo"])
    with pytest.raises(
        PipelineError, match="rm needs the output of sample_pairs.*add sample_pairs to stages"
    ):
        plan_pipeline(without, stage_configs(without), read_state(root))

    # The default chain is untouched: no sample_pairs input, the rm section's data, PPO's own query set
    default = stage_configs(PipelineConfig(output_dir=str(root), ppo={"query_count": 32}))
    assert (default["rm"].rm_dataset, default["rm"].eval_datasets) == ("embedded", [])
    assert default["dpo"].dataset == "embedded"
    assert (default["ppo"].query_count, default["ppo"].query_seed) == (32, None)
    default_plans = plan_pipeline(PipelineConfig(output_dir=str(root)), default, read_state(root))
    assert [p.stage for p in default_plans] == ["sft", "rm", "ppo", "dpo"]
    assert {p.stage: sorted(p.signature["upstream"]) for p in default_plans}["rm"] == ["sft"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ppo": {"query_count": 8}}, r"section 'ppo': query_count is set by the pipeline \(rm_data=sampled"),
        (
            {"ppo": {"query_seed": 1, "dataset": "q.jsonl"}},
            "section 'ppo': dataset, query_seed is set by the pipeline",
        ),
        (
            {"rm": {"rm_dataset": "x.jsonl"}},
            r"section 'rm': rm_dataset is set by the pipeline \(rm_data=sampled",
        ),
        (
            {"dpo": {"dataset": "x.jsonl"}},
            r"section 'dpo': dataset is set by the pipeline \(dpo_data=sampled",
        ),
        (
            {"sample_pairs": {"embedded_split": "heldout"}},
            "section 'sample_pairs': embedded_split is set by the pipeline",
        ),
        (
            {"sample_pairs": {"model_name_or_path": "m"}},
            "section 'sample_pairs': model_name_or_path is set by",
        ),
        ({"sample_pairs": {"reward": "model"}}, "section 'sample_pairs': reward=model needs a reward model"),
        ({"sample_pairs": {"dataset": "p.jsonl"}}, "heldout_prompts=128 samples the embedded held-out split"),
        (
            {"sample_pairs": {"samples_per_query": 0}},
            "section 'sample_pairs': samples_per_query must be >= 1",
        ),
        (
            {"sample_pairs": {"samples_per_querry": 2}},
            "unknown key 'samples_per_querry' for SamplePairsStageConfig",
        ),
        ({"rm": {"eval_datasets": ["onpolicy=x.jsonl"]}}, "'onpolicy=x.jsonl' takes the name 'onpolicy'"),
    ],
)
def test_sampled_chain_refuses_what_the_pipeline_wires(tmp_path, kw, message):
    out = tmp_path / "never"
    fake = {s: lambda cfg: pytest.fail("no stage may run") for s in RLHF_STAGES}
    cfg = PipelineConfig(output_dir=str(out), stages=RLHF_STAGES, rm_data="sampled", dpo_data="sampled", **kw)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg, runners=fake)
    assert not out.exists()


def test_sampled_keys_are_the_users_in_the_default_chain(tmp_path):
    """Without rm_data / dpo_data = sampled, PPO's query set and the RM's and DPO's data stay the user's."""
    cfg = PipelineConfig(
        output_dir=str(tmp_path),
        ppo={"query_count": 8, "query_seed": 3},
        rm={"rm_dataset": "r.jsonl", "eval_datasets": ["onpolicy=x.jsonl"]},
        dpo={"dataset": "d.jsonl"},
    )
    configs = stage_configs(cfg)
    assert (configs["ppo"].query_count, configs["ppo"].query_seed) == (8, 3)
    assert (configs["rm"].rm_dataset, configs["rm"].eval_datasets) == ("r.jsonl", ["onpolicy=x.jsonl"])
    assert configs["dpo"].dataset == "d.jsonl"


@pytest.fixture(scope="module")
def rlhf_finished(tiny_byte_dir, tmp_path_factory):
    """One run of the sampled chain: SFT -> sample_pairs -> PMP -> RM -> PPO, and DPO on the pairs."""
    root = tmp_path_factory.mktemp("rlhf") / "run"
    calls: dict = {}
    summary = run_pipeline(_rlhf_cfg(tiny_byte_dir, root), runners=_counting(calls))
    return root, calls, summary


def test_rlhf_run_trains_rm_ppo_and_dpo_on_the_sampled_pairs(rlhf_finished):
    from align.tasks import generate_tasks

    root, calls, summary = rlhf_finished
    assert calls == dict.fromkeys(RLHF_STAGES, 1)
    assert summary["stages"] == dict.fromkeys(RLHF_STAGES, "done")
    sp = root / "sample_pairs"
    pairs = [json.loads(line) for line in (sp / "pairs.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (sp / "heldout" / "pairs.jsonl").read_text().splitlines()]
    stage = json.loads((sp / "summary.json").read_text())
    assert stage["train"]["report"]["prompts"] == 4 and stage["heldout"]["report"]["prompts"] == 2
    assert stage["train"]["report"]["policy"] == "../sft/final"  # sampled from the SFT stage's model
    # the training pairs come from the 4 training tasks of seed 7, the held-out ones from the heldout split
    train_tasks = {t.messages[-1]["content"] for t in generate_tasks(4, seed=7, split="train")}
    held_tasks = {t.messages[-1]["content"] for t in generate_tasks(2, seed=7, split="heldout")}
    assert {p["prompt"][-1]["content"] for p in pairs} == train_tasks
    assert {p["prompt"][-1]["content"] for p in held} == held_tasks and not train_tasks & held_tasks
    assert {p["source"].rsplit(":", 1)[0] for p in held} == {"embedded:heldout:seed7"}

    rm = json.loads((root / "rm" / "summary.json").read_text())
    assert rm["pmp"]["dataset"].endswith("data/train.jsonl")  # PMP on the generated comparisons
    assert (rm["rm"]["dataset"], rm["rm"]["pair_grouping"]) == (str(sp / "pairs.jsonl"), "prompt")
    groups = len({p["group"] for p in pairs})
    assert rm["rm"]["train_groups"] == groups == 4
    # PMP: 8 pairs, batch 4, num_epochs 1; RM: 4 groups, batch 4, rm_num_epochs 3
    assert (rm["pmp"]["steps"], rm["rm"]["steps"]) == (2, 3)
    # the held-out sampled pairs are scored as `onpolicy` from before PMP to after RM
    assert rm["rm"]["eval_sets"] == {"heldout": 8, "onpolicy": len(held)}
    assert set(rm["pmp"]["accuracies_before"]) == {"heldout", "onpolicy"}
    assert 0.0 <= rm["rm"]["accuracies_after"]["onpolicy"] <= 1.0

    # PPO sampled only the training prompts of the pairs (its own default would be seed 43's 64 tasks)
    state = read_state(root)
    ppo_cfg = state["stages"]["ppo"]["signature"]["config"]
    assert (ppo_cfg["query_count"], ppo_cfg["query_seed"], ppo_cfg["dataset"]) == (4, 7, "embedded")
    rollouts = [json.loads(line) for line in (root / "ppo" / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and {r["prompt"] for r in rollouts} <= train_tasks
    assert json.loads((root / "dpo" / "summary.json").read_text())["dataset"] == str(sp / "pairs.jsonl")
    assert (
        state["stages"]["rm"]["signature"]["upstream"]["sample_pairs"]
        == state["stages"]["sample_pairs"]["hash"]
    )

    report = (root / "report.md").read_text()
    assert "SFT -> sample_pairs -> PMP" in report and "| sample_pairs | done |" in report
    assert "**sample_pairs** (train prompts): 4 prompts, 12 samples" in report
    assert "; onpolicy: " in report and "after RM" in report
    assert (root / "eval" / "ppo" / "eval.json").is_file() and (root / "eval" / "dpo" / "eval.json").is_file()


def test_rlhf_rerun_skips_and_a_changed_sampling_makes_its_readers_stale(rlhf_finished, tiny_byte_dir):
    root, _, _ = rlhf_finished
    before = _snapshot(root)
    pairs_before = (root / "sample_pairs" / "pairs.jsonl").read_bytes()
    calls: dict = {}
    summary = run_pipeline(
        _rlhf_cfg(tiny_byte_dir, root), runners=_counting(calls), evaluator=lambda *a, **k: None
    )
    assert calls == {} and summary["stages"] == dict.fromkeys(RLHF_STAGES, "skipped")
    assert _snapshot(root) == before

    changed = _rlhf_cfg(tiny_byte_dir, root)
    changed.sample_pairs = {**changed.sample_pairs, "samples_per_query": 2}
    with pytest.raises(PipelineError) as err:
        run_pipeline(changed, runners=_counting(calls))
    text = str(err.value)
    assert "stage sample_pairs: config changed since it ran (samples_per_query: 3 -> 2)" in text
    # the stages reading the pairs (RM, DPO) and PPO after the RM are stale too; SFT is not
    assert [f"stage {s}:" in text for s in RLHF_STAGES] == [False, True, True, True, True]
    assert "input stage sample_pairs changed" in text
    assert calls == {} and (root / "sample_pairs" / "pairs.jsonl").read_bytes() == pairs_before


def test_an_interrupted_sample_pairs_stage_keeps_its_finished_run(tiny_byte_dir, tmp_path, capsys):
    """Killed while sampling the held-out prompts: the re-run keeps the training prompts' pairs and samples
    the held-out ones again (seeded: the same pairs)."""
    root = tmp_path / "run"
    cfg = _rlhf_cfg(tiny_byte_dir, root, stages=["sft", "sample_pairs"], evaluate=False)
    run_pipeline(cfg)
    sp = root / "sample_pairs"
    train_pairs, held_pairs = (sp / "pairs.jsonl").read_bytes(), (sp / "heldout" / "pairs.jsonl").read_bytes()
    assert train_pairs and held_pairs
    # as a kill mid-way through the held-out run leaves it: no summary.json, the held-out run half written
    (sp / "summary.json").unlink()
    (sp / "heldout" / "report.json").unlink()
    (sp / "heldout" / "pairs.jsonl").write_bytes(held_pairs.splitlines(keepends=True)[0])
    state = read_state(root)
    state["stages"]["sample_pairs"]["status"] = "running"
    (root / "pipeline_state.json").write_text(json.dumps(state))

    calls: dict = {}
    capsys.readouterr()
    summary = run_pipeline(cfg, runners=_counting(calls))
    out = capsys.readouterr().out
    assert calls == {"sample_pairs": 1} and summary["stages"] == {"sft": "skipped", "sample_pairs": "done"}
    assert "resuming (interrupted before)" in out
    assert f"[sample_pairs] train: {sp} is complete (same config), kept" in out
    assert "[sample_pairs] heldout" not in out  # sampled again, not kept
    assert json.loads((sp / "heldout" / "report.json").read_text())["stopped"] is None
    assert (sp / "pairs.jsonl").read_bytes() == train_pairs
    assert (sp / "heldout" / "pairs.jsonl").read_bytes() == held_pairs
    assert read_state(root)["stages"]["sample_pairs"]["status"] == "done"
