"""Config loading: defaults < YAML < key=value, strict about keys and types."""

from pathlib import Path

import pytest

from align.config import SFTConfig
from align.config_loader import ConfigError, load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def test_defaults_are_the_embedded_job():
    cfg = load_config(SFTConfig)
    assert cfg.model_name_or_path == "smollm2-135m-instruct"
    assert cfg.dataset == "embedded"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3.0e-4\nbatch_size: 16\nuse_lora: true\n")
    cfg = load_config(SFTConfig, path, ["batch_size=32", "lora_target_modules=q_proj,v_proj", "dropout=null"])
    assert cfg.learning_rate == 3e-4
    assert cfg.batch_size == 32
    assert cfg.use_lora is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.dropout is None


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(SFTConfig, None, ["learning_rate=1"]).learning_rate == 1.0
    # YAML 1.1 reads 3e-3 (no dot) as a string; it must still be the number users mean.
    assert load_config(SFTConfig, None, ["learning_rate=3e-3"]).learning_rate == 3e-3
    with pytest.raises(ConfigError, match="learning_rate: expected a number, got str 'fast'"):
        load_config(SFTConfig, None, ["learning_rate=fast"])
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got float 2.5"):
        load_config(SFTConfig, None, ["batch_size=2.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "learning_rte=1e-5",
            "unknown key 'learning_rte' for SFTConfig \\(did you mean 'learning_rate'\\?\\)",
        ),
        ("use_lora=yes please", "use_lora: expected true or false, got str 'yes please'"),
        ("lr_scheduler=step", "lr_scheduler: 'step' is not one of 'constant', 'cosine', 'linear'"),
        ("max_steps", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'kl_coeff'"):
        load_config(SFTConfig, path)


def test_yaml_is_never_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config(SFTConfig, path)


def test_qwen_config_carries_the_report_numbers():
    cfg = load_config(SFTConfig, RECIPES / "sft" / "qwen.yaml")
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.max_steps) == (2e-6, 1430, 4000)
    assert (cfg.batch_size, cfg.max_length) == (128, 2048)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert (cfg.dropout, cfg.max_grad_norm) == (0.1, 1.0)


@pytest.mark.parametrize("path", sorted((RECIPES / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_config_loads(path):
    load_config(SFTConfig, path)


def test_ppo_qwen_config_carries_the_report_numbers():
    from align.config import PPOConfig

    cfg = load_config(PPOConfig, RECIPES / "ppo" / "qwen.yaml")
    assert (cfg.kl_coef, cfg.samples_per_query, cfg.value_warmup_steps, cfg.top_p) == (0.04, 2, 50, 0.9)
    assert (cfg.policy_lr, cfg.value_lr, cfg.value_clip, cfg.reward_norm) == (
        1e-6,
        5e-6,
        0.15,
        "running_mean",
    )
    assert cfg.ptx_coef > 0
