"""Every accelerate config we ship parses with accelerate's own loader and says what its name says."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
EXPECTED = {
    "cpu.yaml": ("NO", 1, 1),
    "cpu_ddp.yaml": ("MULTI_CPU", 2, 1),
    "single_gpu.yaml": ("NO", 1, 1),
    "ddp.yaml": ("MULTI_GPU", 8, 1),
    "fsdp.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "multi_node.yaml": ("MULTI_GPU", 16, 2),
}


def test_every_config_is_listed():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    cfg = load_config_from_file(str(CONFIGS / name))
    kind, processes, machines = EXPECTED[name]
    assert str(cfg.distributed_type).split(".")[-1] == kind
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name.startswith("cpu"):
        assert cfg.use_cpu is True
