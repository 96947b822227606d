"""The reward-model loop on a tiny Qwen2 with the real Qwen tokenizer: learning, exact resume, the PMP head
carried into RM, batch-split invariance, the recipe, its configs and the evaluation CLI."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import RMConfig
from align.config_loader import load_config
from align.recipe import run_recipe
from align.reward import REWARD_HEAD, RewardModel
from align.tracking import read_metrics
from align.train.reward import embedded_pairs, load_reward_model_for_training, run_reward, train_reward_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    from align.tasks import write_jsonl

    d = tmp_path_factory.mktemp("pairs")
    train = write_jsonl(d / "train.jsonl", embedded_pairs(48, 5, split="train", format_error_rate=0.5))
    held = write_jsonl(d / "heldout.jsonl", embedded_pairs(32, 5, split="heldout", format_error_rate=0.5))
    return train, held


def _cfg(model_dir, data, out, **kw):
    train, held = data
    base = dict(
        stage="rm",
        model_name_or_path=str(model_dir),
        dataset=str(train),
        eval_dataset=str(held),
        output_dir=str(out),
        max_length=64,
        batch_size=8,
        micro_batch_size=4,
        max_steps=4,
        learning_rate=2e-3,
        warmup_steps=1,
        save_steps=2,
        report_to=["none"],
        progress=False,
        dropout=0.1,  # dropout on: exact resume must restore the RNG too
    )
    base.update(kw)
    return RMConfig(**base)


def _losses(out):
    return [r["loss"] for r in read_metrics(out)]


def test_training_lowers_the_loss_and_raises_heldout_accuracy(tiny_qwen_dir, pair_files, tmp_path):
    out = tmp_path / "run"
    summary = run_reward(_cfg(tiny_qwen_dir, pair_files, out, max_steps=-1, num_epochs=2.0, dropout=None))
    assert summary["attention"]["attn_implementation"] == "align_varlen"  # said at setup, kept here
    losses = _losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert summary["accuracy_after"] > summary["accuracy_before"]
    # evaluated before training, and after each of the two epochs (6 steps each)
    assert [h["step"] for h in summary["eval_history"]] == [6, 12]
    assert [r["step"] for r in read_metrics(out) if "eval_accuracy" in r] == [6, 12]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["accuracy"] == {"heldout": summary["accuracy_after"]}
    assert (out / "eval" / "margins.png").is_file() and (out / "curves.png").is_file()
    assert json.loads((out / "summary.json").read_text())["train_pairs"] == 48


def test_resume_continues_the_same_loss_curve(tiny_qwen_dir, pair_files, tmp_path):
    full = tmp_path / "full"
    train_reward_model(_cfg(tiny_qwen_dir, pair_files, full, max_steps=4, eval_dataset=None))
    part = tmp_path / "part"
    cfg = _cfg(tiny_qwen_dir, pair_files, part, max_steps=4, eval_dataset=None)
    assert train_reward_model(cfg, stop_after_step=2) == {"stopped_at": 2}
    train_reward_model(cfg)  # resume=auto
    assert [r["step"] for r in read_metrics(part)] == list(range(1, 5))
    assert _losses(part) == pytest.approx(_losses(full), abs=1e-6)
    for name in ("model.safetensors", REWARD_HEAD):
        a, b = load_file(full / "final" / name), load_file(part / "final" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_micro_batches_and_padding_do_not_change_the_update(tiny_qwen_dir, pair_files, tmp_path):
    # 8 pairs per forward pass, packed, vs 1 pair per pass (8-step accumulation), padded.
    runs = {}
    for name, kw in {
        "8x1": dict(micro_batch_size=8),
        "1x8 padded": dict(micro_batch_size=1, packing=False),
    }.items():
        out = tmp_path / name
        train_reward_model(
            _cfg(tiny_qwen_dir, pair_files, out, max_steps=2, dropout=None, eval_dataset=None, **kw)
        )
        runs[name] = (_losses(out), load_file(out / "final" / REWARD_HEAD))
    assert runs["1x8 padded"][0] == pytest.approx(runs["8x1"][0], abs=1e-5)
    torch.testing.assert_close(
        runs["1x8 padded"][1]["weight"], runs["8x1"][1]["weight"], atol=1e-5, rtol=1e-4
    )


def test_pmp_head_is_carried_into_rm(tiny_qwen_dir, pair_files, tmp_path):
    out = tmp_path / "two"
    summary = run_reward(
        _cfg(
            tiny_qwen_dir,
            pair_files,
            out,
            stage="pmp+rm",
            rm_dataset=str(pair_files[0]),
            max_steps=2,
            dropout=None,
        )
    )
    pmp_final = out / "pmp" / "final"
    assert summary["rm"]["model_from"] == str(pmp_final)
    assert summary["accuracy_after_pmp"] == summary["rm"]["accuracy_before"]
    # The RM stage starts from the PMP weights, head included ...
    rm_cfg = _cfg(tiny_qwen_dir, pair_files, tmp_path / "x", init_from=str(pmp_final))
    model, _, source = load_reward_model_for_training(rm_cfg)
    pmp_head = load_file(pmp_final / REWARD_HEAD)
    assert torch.equal(model.head.weight.detach(), pmp_head["weight"])
    assert torch.equal(model.head.bias.detach(), pmp_head["bias"])
    fresh, _, _ = load_reward_model_for_training(_cfg(tiny_qwen_dir, pair_files, tmp_path / "y"))
    assert not torch.equal(fresh.head.weight, model.head.weight)  # trained by PMP, not a new head
    # ... and then trains it.
    assert not torch.equal(load_file(out / "rm" / "final" / REWARD_HEAD)["weight"], pmp_head["weight"])
    top = json.loads((out / "summary.json").read_text())
    assert top["final_model"] == str(out / "rm" / "final")


def test_recipe_and_eval_cli(tiny_qwen_dir, pair_files, tmp_path, capsys):
    out = tmp_path / "launched"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/cpu.yaml",
            "recipes/rm.py",
            "--config",
            "recipes/configs/rm/pmp.yaml",
            f"model_name_or_path={tiny_qwen_dir}",
            f"dataset={pair_files[0]}",
            f"eval_dataset={pair_files[1]}",
            f"output_dir={out}",
            "max_steps=2",
            "batch_size=4",
            "micro_batch_size=2",
            "max_length=64",
            "report_to=none",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model:   {out / 'final'}" in proc.stdout
    reloaded = RewardModel.from_pretrained(out / "final")
    assert reloaded.config.max_length == 64

    report_dir = tmp_path / "report"
    spec = importlib.util.spec_from_file_location("rm_accuracy", ROOT / "eval" / "rm_accuracy.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        "--model",
        str(out / "final"),
        "--data",
        str(pair_files[1]),
        str(pair_files[0]),
        "--out",
        str(report_dir),
    ]
    assert cli.main(argv) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["accuracy"]) == {"heldout", "train"}
    assert report["datasets"]["heldout"]["pairs"] == 32
    # The evaluation of the training loop and of the CLI are the same code: the same number.
    trained = json.loads((out / "eval" / "report.json").read_text())
    assert report["accuracy"]["heldout"] == trained["accuracy"]["heldout"]
    md = (report_dir / "report.md").read_text()
    assert "| heldout | 32 |" in md and "length bias" in md
    assert (report_dir / "margins.png").stat().st_size > 1000
    assert "heldout: accuracy" in capsys.readouterr().out


def test_recipe_reports_bad_pairs_and_unknown_keys(tiny_qwen_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
    )
    args = [
        "stage=rm",
        f"model_name_or_path={tiny_qwen_dir}",
        f"dataset={data}",
        f"output_dir={tmp_path / 'o'}",
    ]
    assert run_recipe(RMConfig, run_reward, argv=[*args, "report_to=none"]) == 2
    assert f"{data}:2: chosen and rejected are identical" in capsys.readouterr().err
    assert run_recipe(RMConfig, run_reward, argv=["center_reward_coef=0.1"]) == 2
    assert "unknown key 'center_reward_coef'" in capsys.readouterr().err


def test_configs_carry_the_qwen_numbers():
    for name in ("pmp", "rm"):
        cfg = load_config(RMConfig, ROOT / "recipes" / "configs" / "rm" / f"{name}.yaml")
        assert cfg.stage == name
        assert (cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_steps) == (3e-6, "constant", 0)
        assert (cfg.batch_size, cfg.max_length, cfg.num_epochs, cfg.max_steps) == (64, 2048, 1.0, -1)
    rm = load_config(RMConfig, ROOT / "recipes" / "configs" / "rm" / "rm.yaml")
    assert rm.init_from == "outputs/rm-qwen/pmp/final"


def test_eval_fraction_holds_out_pairs_never_trained(pair_files, tmp_path):
    from align.train.reward import load_rm_data

    cfg = _cfg("unused", pair_files, tmp_path / "o", eval_dataset=None, eval_fraction=0.25)
    train, report, _, held, name = load_rm_data(cfg, tmp_path / "o", is_main=True)
    assert (len(train), len(held), name, report.used) == (36, 12, "heldout", 48)
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    again = load_rm_data(cfg, tmp_path / "o", is_main=True)
    assert again[3] == held  # seeded: the same split every time
