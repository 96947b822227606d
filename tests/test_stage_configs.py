"""Stage configs composed from parts: every shipped config loads, a key a stage does not read is refused
with its name, and each stage's `--help` gives `batch_size` one unit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from align.config import (
    BatchKeys,
    DPOConfig,
    GRPOConfig,
    OnlineDPOConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SamplingKeys,
    SFTConfig,
    TrainConfig,
)
from align.config_loader import ConfigError, build_config, load_config, parse_cli
from align.pipeline.ablate import RECIPES, load_sweep
from align.pipeline.layout import final_model, stage_dir
from align.pipeline.run import (
    UPSTREAM,
    PipelineError,
    plan_pipeline,
    signature,
    signature_hash,
    stage_configs,
)
from align.pipeline.sample_pairs import SamplePairsConfig

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
# The one thing `batch_size` counts in each stage.
BATCH_UNIT = {
    SFTConfig: "sequences",
    RMConfig: "preference pairs",
    DPOConfig: "preference pairs",
    PPOConfig: "queries",
    OnlineDPOConfig: "queries",
    GRPOConfig: "queries",
}
UNITS = ("sequences", "pairs", "queries")
# Recipes that make data rather than train (recipes/sample_pairs.py), with their config classes.
DATA_TOOLS = {"sample_pairs": SamplePairsConfig}


def _shipped_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path: Path):
    """Every YAML under recipes/configs, by its directory: a directory this test does not know fails."""
    kind = path.relative_to(CONFIGS).parts[0]
    if kind == "pipeline":
        stage_configs(load_config(PipelineConfig, path))  # each stage's section against its class
    elif kind == "ablate":
        load_sweep(path)  # builds every run's config of the sweep's recipe
    elif kind in DATA_TOOLS:
        load_config(DATA_TOOLS[kind], path)  # a data tool, not a sweepable training stage
    else:
        # recipes/configs/<recipe>/*.yaml: loaded with that recipe's config class
        assert kind in RECIPES, f"{path}: no recipe named {kind} for recipes/configs/{kind}/"
        load_config(RECIPES[kind], path)


def test_the_shipped_configs_cover_every_directory():
    directories = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    assert directories == set(RECIPES) | set(DATA_TOOLS) | {"pipeline", "ablate"}
    assert all(any(CONFIGS.joinpath(d).glob("*.yaml")) for d in directories)


@pytest.mark.parametrize("key", ["skip_bad", "dataset_format", "dropout"])
@pytest.mark.parametrize("cls", [PPOConfig, OnlineDPOConfig, GRPOConfig], ids=lambda c: c.__name__)
def test_a_key_the_rl_loops_do_not_read_is_refused_by_name(tmp_path, cls, key):
    """The RL loops read prompts (no record formats, nothing to skip) and train with dropout off."""
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {'true' if key == 'skip_bad' else '0.1'}\n")
    with pytest.raises(ConfigError, match=f"unknown key '{key}' for {cls.__name__}"):
        load_config(cls, path)
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(cls, None, [f"{key}=1"])


def test_the_rl_stages_default_to_lora_dropout_off():
    """The RL loops train with dropout off (ratio 1 on the rollout's own data, and the shared-prompt pass
    exact): LoRA's dropout too, in the defaults and every shipped RL config. The other stages keep 0.05."""
    directory = {cls: name for name, cls in RECIPES.items()}
    for cls in (PPOConfig, OnlineDPOConfig, GRPOConfig):
        assert cls().lora_dropout == 0.0, cls.__name__
        for path in sorted(CONFIGS.joinpath(directory[cls]).glob("*.yaml")):
            assert load_config(cls, path).lora_dropout == 0.0, path
        assert "ratio 1" in cls.__dataclass_fields__["lora_dropout"].metadata["help"]
    assert (SFTConfig().lora_dropout, RMConfig().lora_dropout, DPOConfig().lora_dropout) == (0.05, 0.05, 0.05)


def test_the_shipped_rl_configs_keep_the_over_optimisation_guards_off():
    """Qwen used none of them (issue 21): every shipped RL config leaves them at their off defaults, and
    the embedded query set at the count and seed it had before they were keys; except the issue-21 PPO arms
    (ppo/rlhf.yaml and ppo/rlhf-kind-gate.yaml), which pick PAR and the RM's query set, checked below."""
    directory = {cls: name for name, cls in RECIPES.items()}
    arm = CONFIGS / "ppo" / "rlhf.yaml"
    for cls in (PPOConfig, OnlineDPOConfig, GRPOConfig):
        for path in sorted(CONFIGS.joinpath(directory[cls]).glob("*.yaml")):
            if path in (arm, CONFIGS / "ppo" / "rlhf-kind-gate.yaml"):
                continue
            cfg = load_config(cls, path)
            guards = (cfg.reward_clip, cfg.reward_anchor, cfg.rm_ensemble_objective, cfg.rm_ensemble_penalty)
            assert guards == (None, "none", "mean", 0.0), path
            assert getattr(cfg, "kl_target", None) is None and cfg.query_seed is None, path
    assert load_config(GRPOConfig, CONFIGS / "grpo" / "verifier.yaml").query_count == 1200
    assert load_config(PPOConfig, CONFIGS / "ppo" / "embedded.yaml").query_count is None  # 16 x batch_size
    rlhf = load_config(PPOConfig, arm)
    assert (rlhf.reward_anchor, rlhf.reward_clip, rlhf.kl_target) == ("reference", None, None)
    # The RM's query set is the RL query set: the prompts recipes/configs/sample_pairs/embedded.yaml sampled.
    sampled = yaml.safe_load((CONFIGS / "sample_pairs" / "embedded.yaml").read_text())
    assert (rlhf.query_count, rlhf.query_seed) == (sampled["embedded_prompts"], sampled["embedded_seed"])


def test_the_kind_gate_arm_is_the_rlhf_arm_with_only_its_declared_changes():
    """ppo/rlhf-kind-gate.yaml is the `ppo-kind-gate-long` arm of docs/rlhf-embedded/, declared as ppo/rlhf.yaml
    plus these overrides (ppo-kind-gate/DECLARED.md); any other difference would make the file a different arm."""
    base = dataclasses.asdict(load_config(PPOConfig, CONFIGS / "ppo" / "rlhf.yaml"))
    arm = dataclasses.asdict(load_config(PPOConfig, CONFIGS / "ppo" / "rlhf-kind-gate.yaml"))
    changed = {key: (base[key], arm[key]) for key in base if base[key] != arm[key]}
    assert changed == {
        "reward_model_path": ("outputs/rm/onpolicy-3ep/final", "outputs/rm/round3/final"),
        "output_dir": ("outputs/ppo-rlhf", "outputs/ppo-kind-gate-long"),
        "query_kinds": (
            None,
            ["count_letters", "uppercase", "convert", "multiply", "add", "followup", "reverse"],
        ),
        "batch_size": (8, 16),
        "save_steps": (20, 10),
    }


def test_ppo_with_skip_bad_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("kl_coef: 0.05\nskip_bad: true\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'skip_bad' for PPOConfig"):
        load_config(PPOConfig, path)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("ppo:\n  skip_bad: true\n")
    with pytest.raises(ConfigError, match="skip_bad"):
        stage_configs(load_config(PipelineConfig, pipeline))


def test_record_file_keys_stay_where_records_are_read():
    for cls in (SFTConfig, RMConfig, DPOConfig):
        cfg = load_config(cls, None, ["skip_bad=true", "dataset_format=hh", "dropout=0.1"])
        assert (cfg.skip_bad, cfg.dataset_format, cfg.dropout) == (True, "hh", 0.1)


def test_every_stage_says_what_its_batch_counts():
    assert set(BATCH_UNIT) == set(RECIPES.values())


def test_every_stage_has_the_shared_training_keys():
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for cls in RECIPES.values():
        assert shared <= {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("cls", list(BATCH_UNIT), ids=lambda c: c.__name__)
def test_help_gives_batch_size_one_unit(cls, capsys):
    """`recipes/<stage>.py --help` prints parse_cli's key list: the stage's own `batch_size` line (not
    the shared part's unit-less one) names its unit, and no other."""
    generic = BatchKeys.__dataclass_fields__["batch_size"].metadata["help"]
    assert cls.__dataclass_fields__["batch_size"].metadata["help"] != generic
    with pytest.raises(SystemExit):
        parse_cli(cls, ["--help"], prog=f"recipes/{cls.__name__}.py")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["batch_size"]]
    assert len(lines) == 1, lines
    unit = BATCH_UNIT[cls]
    assert f"in {unit}" in lines[0], lines[0]
    assert [u for u in UNITS if u in lines[0]] == [unit.split()[-1]], lines[0]


def _completed_pipeline(root: Path, ppo_config_then: Callable[[dict], dict]) -> tuple[PipelineConfig, dict]:
    """A pipeline output_dir whose sft, rm and ppo stages completed; ppo's record holds
    `ppo_config_then(today's ppo config signature)`, as an earlier version of align recorded it."""
    cfg = build_config(PipelineConfig, {"output_dir": str(root), "stages": ["ppo"]})
    configs = stage_configs(cfg)
    state: dict = {"stages": {}, "eval": {}}
    hashes: dict[str, str] = {}
    for stage in ("sft", "rm", "ppo"):
        sig = signature(configs[stage], {up: hashes[up] for up in UPSTREAM[stage]})
        if stage == "ppo":
            sig = {**sig, "config": ppo_config_then(sig["config"])}
        hashes[stage] = signature_hash(sig)
        state["stages"][stage] = {"hash": hashes[stage], "signature": sig}
        final_model(root, stage).mkdir(parents=True)
        (stage_dir(root, stage) / "summary.json").write_text("{}")
    return cfg, json.loads(json.dumps(state))  # as read back from pipeline_state.json


def _with_removed_keys(config: dict) -> dict:
    return {**config, "skip_bad": False, "dataset_format": None, "dropout": None}


def test_a_completed_ppo_stage_from_before_the_key_removal_is_still_current(tmp_path):
    """pipeline_state.json written when PPOConfig still had skip_bad, dataset_format and dropout: the
    stage is skipped as complete, not refused as changed (the keys never reached the PPO loop)."""
    cfg, state = _completed_pipeline(tmp_path / "run", _with_removed_keys)
    [ppo] = plan_pipeline(cfg, stage_configs(cfg), state)
    assert (ppo.stage, ppo.action) == ("ppo", "skip")

    def kl_changed(config: dict) -> dict:  # a key PPO reads: still a change
        return {**_with_removed_keys(config), "kl_coef": config["kl_coef"] * 2}

    cfg, state = _completed_pipeline(tmp_path / "changed", kl_changed)
    with pytest.raises(PipelineError, match="stage ppo: config changed since it ran \\(kl_coef"):
        plan_pipeline(cfg, stage_configs(cfg), state)


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig, OnlineDPOConfig])
def test_the_rl_stages_refuse_greedy_or_negative_temperature_and_a_bad_top_p(cls):
    # The training pass divides the logits by the temperature: 0 would make every log-prob infinite.
    for value in ("0", "-1"):
        with pytest.raises(ConfigError, match="temperature: the RL stages sample, so it must be > 0"):
            load_config(cls, None, [f"temperature={value}"])
    for value in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"top_p: must be in \(0, 1\]"):
            load_config(cls, None, [f"top_p={value}"])
    assert load_config(cls, None, ["temperature=0.7", "top_p=1"]).temperature == 0.7


def test_sample_pairs_shares_the_sampling_keys_and_takes_temperature_0_as_greedy():
    assert load_config(SamplePairsConfig, None, ["temperature=0"]).temperature == 0.0
    with pytest.raises(ConfigError, match="temperature: must be >= 0"):
        load_config(SamplePairsConfig, None, ["temperature=-0.5"])
    # One definition of the shared keys; sample_pairs keeps its own samples_per_query default.
    shared = {f.name for f in dataclasses.fields(SamplingKeys)}
    assert shared <= {f.name for f in dataclasses.fields(SamplePairsConfig)}
    assert shared <= {f.name for f in dataclasses.fields(PPOConfig)}
    assert (SamplePairsConfig().samples_per_query, SamplingKeys().samples_per_query) == (8, 4)
