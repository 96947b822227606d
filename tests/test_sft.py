"""The SFT loop on a tiny Qwen2 model with the real Qwen tokenizer: invariants, resume, LoRA, recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.config import SFTConfig
from align.tasks import write_sft_jsonl
from align.tracking import read_metrics
from align.train.sft import packed_row, run_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_sft_jsonl(path, 64, seed=3)
    return path


def _cfg(model_dir, data, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        dataset=str(data),
        output_dir=str(out),
        max_length=128,
        batch_size=8,
        micro_batch_size=4,
        max_steps=4,
        learning_rate=3e-3,
        warmup_steps=1,
        lr_scheduler="cosine",
        save_steps=2,
        eval_tasks=0,
        report_to=["none"],
        progress=False,
        packing=False,
        dropout=0.1,  # dropout on: exact resume must restore the RNG too
    )
    base.update(kw)
    return SFTConfig(**base)


def _losses(out):
    return [r["loss"] for r in read_metrics(out)]


def test_packed_row_shifts_inside_each_sequence():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [-100, 5]}
    row = packed_row([a, b], torch.device("cpu"))
    assert row["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # position 0 predicts 2, position 1 predicts 3, position 3 predicts 5; 3 never predicts 4.
    assert row["keep"].tolist() == [[True, True, False, True, False]]
    assert row["targets"].tolist() == [2, 3, 5]


def test_gradient_accumulation_1x8_equals_8x1(tiny_qwen_dir, sft_data, tmp_path):
    weights = {}
    for micro in (8, 1):
        out = tmp_path / f"micro{micro}"
        # adam_epsilon 1e-4: with the default 1e-8, Adam turns a ~0 gradient entry into a +-lr step whose sign
        # is summation-order noise (seen: one entry of 2048 off by 2e-5); a larger epsilon keeps the update
        # continuous in the gradient, so the comparison below tests accumulation, not rounding.
        run_sft(
            _cfg(
                tiny_qwen_dir,
                sft_data,
                out,
                micro_batch_size=micro,
                max_steps=2,
                dropout=None,
                adam_epsilon=1e-4,
            )
        )
        norms = [r["grad_norm"] for r in read_metrics(out)]
        weights[micro] = (load_file(out / "final" / "model.safetensors"), _losses(out), norms)
    (w8, l8, g8), (w1, l1, g1) = weights[8], weights[1]
    assert l8 == pytest.approx(l1, abs=1e-5)
    # Adam is blind to a constant factor on the gradient, so the gradient norm is what catches a
    # mis-scaled accumulation (a sum of micro-batch means, say).
    assert g8 == pytest.approx(g1, rel=1e-5)
    for name in w8:
        torch.testing.assert_close(w8[name], w1[name], atol=2e-6, rtol=1e-5)
    assert not torch.equal(
        w8["model.embed_tokens.weight"],
        load_file(tiny_qwen_dir / "model.safetensors")["model.embed_tokens.weight"],
    )


def test_loss_falls_and_outputs_follow_the_conventions(tiny_qwen_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    summary = run_sft(_cfg(tiny_qwen_dir, sft_data, out, max_steps=12, packing=True, dropout=None))
    # The attention of packed rows, said at setup and kept in the summary (CPU: per-document SDPA).
    assert summary["attention"]["attn_implementation"] == "align_varlen"
    assert summary["attention"]["training"] == "per-document sdpa (exact)"
    assert summary["attention"]["training_reason"] == "device cpu, not CUDA"
    losses = _losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-12"]  # keep 2
    ckpt = out / "checkpoints" / "step-12"
    assert {
        "model.safetensors",
        "optimizer.pt",
        "state.pt",
        "trainer_state.json",
        "config.json",
        "manifest.json",
    } <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 12
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.config.vocab_size == len(tok)
    assert summary["data"]["read"] == 64 and summary["data"]["used"] == 64


def test_resume_continues_the_same_loss_curve(tiny_qwen_dir, sft_data, tmp_path):
    full = tmp_path / "full"
    run_sft(_cfg(tiny_qwen_dir, sft_data, full, max_steps=6))
    part = tmp_path / "part"
    assert run_sft(_cfg(tiny_qwen_dir, sft_data, part, max_steps=6), stop_after_step=2) == {"stopped_at": 2}
    run_sft(_cfg(tiny_qwen_dir, sft_data, part, max_steps=6))  # resume=auto
    assert [r["step"] for r in read_metrics(part)] == list(range(1, 7))
    assert _losses(part) == pytest.approx(_losses(full), abs=1e-6)
    final_full = load_file(full / "final" / "model.safetensors")
    final_part = load_file(part / "final" / "model.safetensors")
    for name in final_full:
        torch.testing.assert_close(final_part[name], final_full[name], atol=1e-6, rtol=0)


def test_lora_trains_only_adapters_and_saves_a_merged_model(tiny_qwen_dir, sft_data, tmp_path):
    out = tmp_path / "lora"
    run_sft(_cfg(tiny_qwen_dir, sft_data, out, use_lora=True, lora_r=4, lora_alpha=8, max_steps=3))
    trained = load_file(out / "checkpoints" / "step-3" / "model.safetensors")
    assert trained and all("lora_" in name for name in trained)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    base = load_file(tiny_qwen_dir / "model.safetensors")
    merged = load_file(out / "final" / "model.safetensors")
    assert set(merged) == set(base)  # a plain model, loadable without peft
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def _run_recipe(args, env_extra=None, timeout=600):
    # PYTHONPATH: the recipes import this checkout's `align`, whether or not it is pip-installed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_recipe_under_accelerate_launch(tiny_qwen_dir, sft_data, tmp_path):
    out = tmp_path / "launched"
    proc = _run_recipe(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/cpu.yaml",
            "recipes/sft.py",
            f"model_name_or_path={tiny_qwen_dir}",
            f"dataset={sft_data}",
            f"output_dir={out}",
            "max_steps=2",
            "batch_size=4",
            "micro_batch_size=2",
            "max_length=128",
            "eval_tasks=0",
            "report_to=none",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()
    assert f"model:   {out / 'final'}" in proc.stdout


def test_recipe_reports_bad_data_without_traceback(tiny_qwen_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "wizard", "content": "hi"}]}\n{not json\n'
    )
    proc = _run_recipe(
        [
            sys.executable,
            "recipes/sft.py",
            f"model_name_or_path={tiny_qwen_dir}",
            f"dataset={data}",
            f"output_dir={tmp_path / 'o'}",
            "report_to=none",
        ]
    )
    assert proc.returncode == 2
    assert f"{data}:2: " in proc.stderr and "wizard" in proc.stderr
    assert f"{data}:3: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipe_rejects_unknown_key(tmp_path):
    proc = _run_recipe([sys.executable, "recipes/sft.py", "learning_rat=1e-5"])
    assert proc.returncode == 2
    assert "unknown key 'learning_rat'" in proc.stderr and "Traceback" not in proc.stderr


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_give_the_losses_of_one(tiny_qwen_dir, sft_data, tmp_path):
    common = [
        f"model_name_or_path={tiny_qwen_dir}", f"dataset={sft_data}", "max_steps=3", "batch_size=8",
        "micro_batch_size=2", "max_length=128", "eval_tasks=0", "report_to=none", "learning_rate=3e-3",
        "progress=false",
    ]  # fmt: skip
    # torchrun, not `accelerate launch`: for a CPU config accelerate 1.15 starts a single process unless
    # it goes through mpirun (align refuses that launch; see test_accelerate_configs.py).
    two = _run_recipe(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "recipes/sft.py", *common, f"output_dir={tmp_path / 'two'}"],
        env_extra={"ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in two.stdout  # really two processes
    one = _run_recipe([sys.executable, "recipes/sft.py", *common, f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-6)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


def test_heldout_accuracy_before_is_measured_once_and_reported_after(monkeypatch):
    """A resumed run carries "before" in its checkpointed state: it must not measure again (it would
    measure the partly trained model); "after" lands in the summary beside it."""
    from align.train import sft as sft_mod

    calls = []
    results = iter([0.25, 0.75])

    def fake_accuracy(model, tokenizer, cfg):
        calls.append(model)
        return {"accuracy": next(results)}

    monkeypatch.setattr(sft_mod, "heldout_accuracy", fake_accuracy)
    cfg = SFTConfig(eval_tasks=4)
    state: dict = {}
    sft_mod.record_accuracy_before(state, "start", None, cfg, say=lambda *_: None)
    sft_mod.record_accuracy_before(state, "resumed", None, cfg, say=lambda *_: None)
    assert calls == ["start"] and state == {"accuracy_before": 0.25}
    summary: dict = {}
    sft_mod.record_accuracy_after(summary, state, "end", None, cfg, say=lambda *_: None)
    assert summary == {"accuracy_before": 0.25, "accuracy_after": 0.75} and calls == ["start", "end"]


def test_the_after_figure_counts_repeated_held_out_prompts_once(monkeypatch):
    """128 held-out tasks of seed 0 ask 125 distinct prompts: the summary adds the per-prompt test."""
    from types import SimpleNamespace

    import align.train.sft as sft
    from align.evaluation.policy import mcnemar_exact
    from align.tasks import generate_tasks

    tasks = generate_tasks(128, seed=0, split="heldout")
    before = [
        len(t.key) % 2 == 0 for t in tasks
    ]  # verdicts that depend only on the problem, as greedy ones do
    after = [len(t.key) % 3 != 0 for t in tasks]
    monkeypatch.setattr(sft, "heldout_accuracy", lambda *a: {"accuracy": sum(after) / 128, "oks": after})
    summary: dict = {}
    cfg = SimpleNamespace(eval_tasks=128, seed=0)
    sft.record_accuracy_after(
        summary, {"accuracy_before": 0.5, "accuracy_before_oks": before}, None, None, cfg, say=lambda *_: None
    )
    first = {}
    for t, b, a in zip(tasks, before, after, strict=True):
        first.setdefault(t.key, (b, a))
    gained = sum(a and not b for b, a in first.values())
    lost = sum(b and not a for b, a in first.values())
    by_prompt = summary["accuracy_test_by_prompt"]
    assert (by_prompt["n"], by_prompt["repeats"], by_prompt["inconsistent"]) == (125, 3, 0)
    assert (by_prompt["gained"], by_prompt["lost"]) == (gained, lost)
    assert by_prompt["p_mcnemar"] == mcnemar_exact(gained, lost)
    assert summary["accuracy_test"]["n"] == 128
