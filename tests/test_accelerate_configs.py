"""Every accelerate config we ship parses with accelerate's own loader and says what its name says."""

from pathlib import Path

import pytest
import torch
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


def test_a_launch_without_a_distributed_backend_is_refused(monkeypatch):
    """accelerate quietly sets up no distribution when the config names an engine the machine cannot
    run (FSDP on CPU); two processes would then each train alone into one output_dir."""
    from align.config import SFTConfig
    from align.train.process import RunSetupError, make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunSetupError, match="launched as 2 processes, but accelerate set up no distributed"):
        make_accelerator(SFTConfig())


def test_accelerate_launch_of_a_multi_process_cpu_config_is_refused(monkeypatch):
    """What `accelerate launch --config_file cpu_ddp.yaml` hands its one child process in accelerate
    1.15 (simple launcher: MASTER_PORT set for num_processes > 1, no WORLD_SIZE, no mpirun)."""
    from align.config import SFTConfig
    from align.train.process import RunSetupError, make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29517")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RunSetupError, match="started a single process .* torchrun --nproc_per_node"):
        make_accelerator(SFTConfig())


FSDP_ON_CPU = (
    "FSDP needs 2 GPUs: accelerate 1.15 picks a distributed backend only for accelerator devices "
    "(PartialState._prepare_backend), and with use_cpu it starts a single process, so FSDP cannot run "
    "on a CPU-only machine (align refuses both launches: see the tests above)"
)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FSDP_ON_CPU)
def test_fsdp_two_gpus_give_the_losses_of_one(tiny_qwen_dir, tmp_path):
    import os
    import subprocess
    import sys

    from align.tasks import write_sft_jsonl
    from align.tracking import read_metrics

    root = CONFIGS.parent
    data = write_sft_jsonl(tmp_path / "d.jsonl", 64, seed=3)
    common = [f"model_name_or_path={tiny_qwen_dir}", f"dataset={data}", "max_steps=3", "batch_size=8",
              "micro_batch_size=2", "max_length=128", "eval_tasks=0", "report_to=none", "dtype=float32",
              "learning_rate=3e-3", "progress=false"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root)}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    runs = {
        "fsdp": [*launch, "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
                 "--mixed_precision", "no"],
        "one": [*launch, "--config_file", str(CONFIGS / "single_gpu.yaml")],
    }  # fmt: skip
    for name, cmd in runs.items():
        proc = subprocess.run(
            [*cmd, "recipes/sft.py", *common, f"output_dir={tmp_path / name}"],
            cwd=root, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name)] for name in runs}
    assert losses["fsdp"] == pytest.approx(losses["one"], abs=1e-4)  # fp32; reduction order differs
