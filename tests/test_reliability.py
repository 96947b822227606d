"""Non-finite steps (skip and count, or stop with a checkpoint), global advantage whitening under data
parallelism, DeepSpeed refusal, and the security refusals: telemetry, pickled checkpoints, remote code,
symlinks out of a data directory, and a scan of the sources for unsafe loaders."""

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ascii_reward
from safetensors.torch import load_file

from align.checkpoint import list_checkpoints, verify_checkpoint
from align.config import DPOConfig, PPOConfig, SFTConfig
from align.data import DataSourceError, load_sft
from align.rl_math import masked_moments, masked_whiten
from align.tasks import generate_tasks, preference_pairs, write_jsonl, write_sft_jsonl
from align.tracking import read_metrics
from align.train import dpo as dpo_mod
from align.train import ppo as ppo_mod
from align.train import sft as sft_mod
from align.train.process import NonFiniteStop, RunSetupError, make_accelerator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_sft_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", 32, seed=3)


def _sft_cfg(model_dir, data, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), max_length=512,
        batch_size=8, micro_batch_size=4, max_steps=3, learning_rate=3e-3, save_steps=1,
        save_total_limit=5, eval_tasks=0, report_to=["none"], progress=False, packing=False,
    )  # fmt: skip
    base.update(kw)
    return SFTConfig(**base)


def _nan_on_forward(monkeypatch, module, calls):
    """Make the model loaded by `module.load_causal_lm` return NaN activations on the given forward
    calls (1-based), as a diverging step would."""
    real = module.load_causal_lm
    count = [0]

    def load(cfg):
        model, tokenizer = real(cfg)

        def hook(_module, _inputs, output):
            count[0] += 1
            return output * float("nan") if count[0] in calls else output

        model.get_input_embeddings().register_forward_hook(hook)
        return model, tokenizer

    monkeypatch.setattr(module, "load_causal_lm", load)


def _nan_loss_on_call(monkeypatch, module, name, call):
    """Make the loss function `module.<name>` (returning (loss, stats)) give a NaN loss on its `call`-th
    call (1-based), as a diverging step would."""
    real, count = getattr(module, name), [0]

    def nan_on_call(*args, **kw):
        count[0] += 1
        loss, stats = real(*args, **kw)
        return (loss * float("nan") if count[0] == call else loss), stats

    monkeypatch.setattr(module, name, nan_on_call)


def test_sft_nonfinite_step_is_skipped_and_counted(tiny_byte_dir, sft_data, tmp_path, monkeypatch, capsys):
    _nan_on_forward(monkeypatch, sft_mod, calls={3})  # 2 micro-batches per step: call 3 = step 2
    out = tmp_path / "skip"
    summary = sft_mod.run_sft(_sft_cfg(tiny_byte_dir, sft_data, out))
    assert "step 2: non-finite loss or gradient, update skipped" in capsys.readouterr().out
    assert summary["skipped_nonfinite"] == 1
    assert json.loads((out / "summary.json").read_text())["skipped_nonfinite"] == 1
    assert [r["skipped_nonfinite"] for r in read_metrics(out)] == [0, 1, 1]
    step1 = load_file(out / "checkpoints" / "step-1" / "model.safetensors")
    step2 = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    step3 = load_file(out / "checkpoints" / "step-3" / "model.safetensors")
    assert all(torch.equal(step1[k], step2[k]) for k in step1)  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in step3.values())
    assert any(not torch.equal(step2[k], step3[k]) for k in step2)  # and training went on


def test_sft_nonfinite_step_can_stop_the_run_with_a_checkpoint(
    tiny_byte_dir, sft_data, tmp_path, monkeypatch
):
    _nan_on_forward(monkeypatch, sft_mod, calls={3})
    out = tmp_path / "stop"
    cfg = _sft_cfg(tiny_byte_dir, sft_data, out, on_nonfinite="stop", save_steps=0, max_steps=4)
    with pytest.raises(NonFiniteStop, match=r"non-finite loss or gradient at step 2 \(on_nonfinite=stop\)"):
        sft_mod.run_sft(cfg)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-2"]
    verify_checkpoint(out / "checkpoints" / "step-2")
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["skipped_nonfinite"] == 1
    assert not (out / "final").exists()


def test_dpo_nonfinite_loss_stops_with_a_checkpoint(tiny_byte_dir, tmp_path, monkeypatch):
    pairs = preference_pairs(generate_tasks(16, seed=7), seed=7, format_error_rate=0.3)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    _nan_loss_on_call(monkeypatch, dpo_mod, "dpo_loss", call=2)
    out = tmp_path / "dpo"
    cfg = DPOConfig(
        model_name_or_path=str(tiny_byte_dir), dataset=str(data), output_dir=str(out), max_length=512,
        batch_size=4, micro_batch_size=4, max_steps=3, learning_rate=1e-3, save_steps=0, eval_tasks=0,
        report_to=["none"], progress=False, rpo_alpha=0.0, on_nonfinite="stop",
    )  # fmt: skip
    with pytest.raises(NonFiniteStop, match="at step 2"):
        dpo_mod.run_dpo(cfg)
    verify_checkpoint(out / "checkpoints" / "step-2")
    assert [r["skipped_nonfinite"] for r in read_metrics(out)] == [0, 1]


def test_ppo_nonfinite_update_is_skipped_and_counted(
    tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    _nan_loss_on_call(monkeypatch, ppo_mod, "ppo_policy_loss", call=1)
    out = tmp_path / "ppo"
    cfg = PPOConfig(
        model_name_or_path=str(tiny_byte_dir), reward_model_path=str(tiny_rm_dir), dataset=str(prompts_file),
        output_dir=str(out), batch_size=4, micro_batch_size=4, samples_per_query=2, max_new_tokens=6,
        max_steps=2, value_warmup_steps=0, ppo_epochs=1, policy_lr=1e-3, value_lr=1e-3, ptx_coef=0.0,
        save_steps=1, save_total_limit=5, report_to=["none"], progress=False, train_missing_stages=False,
        log_rollouts=0,
    )  # fmt: skip
    summary = ppo_mod.run_ppo(cfg, reward_fn=ascii_reward)
    assert summary["skipped_nonfinite"] == 1  # the policy update of step 1; the value update went on
    assert [r["skipped_nonfinite"] for r in read_metrics(out)] == [1, 1]
    first = load_file(out / "checkpoints" / "step-1" / "model.safetensors")
    start = load_file(tiny_byte_dir / "model.safetensors")
    policy = {k[len("policy/") :]: v for k, v in first.items() if k.startswith("policy/")}
    assert policy and all(torch.equal(v, start[k]) for k, v in policy.items())


# --------------------------------------------------------------------------------------------------
# Scale-out


def test_whitening_with_global_statistics_equals_one_process():
    """Two simulated processes, each whitening its half with the all-reduced moments, give exactly the
    single-process result; whitening each half on its own statistics does not."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=gen) * 3 + 1
    values[3:] += 4.0  # the halves differ, as two processes' rollouts do
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    mask[:, 0] = 1
    whole = masked_whiten(values, mask)
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    everyone = masked_moments(*halves[0]) + masked_moments(*halves[1])  # what all-reduce(sum) returns
    assert everyone[0].item() == mask.sum().item()
    split = torch.cat([masked_whiten(v, m, reduce_sum=lambda t: everyone) for v, m in halves])
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    local = torch.cat([masked_whiten(v, m) for v, m in halves])
    assert (local - whole).abs().max() > 0.1


def test_dpo_two_processes_give_the_losses_of_one(tiny_byte_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) against one process in this one: same logged losses (the
    mean over the pairs of the global batch) and the same weights."""
    import socket
    import subprocess
    import sys

    pairs = preference_pairs(generate_tasks(24, seed=7), seed=7, format_error_rate=0.3)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = dict(
        model_name_or_path=str(tiny_byte_dir), dataset=str(data), max_steps=3, batch_size=8, micro_batch_size=2,
        max_length=512, eval_tasks=0, report_to="none", learning_rate=1e-3, progress="false", rpo_alpha=0.5,
    )  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "recipes/dpo.py", *[f"{k}={v}" for k, v in args.items()], f"output_dir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    args.update(report_to=["none"], progress=False)
    dpo_mod.run_dpo(DPOConfig(**args, output_dir=str(tmp_path / "one")))
    for key in ("loss", "rewards_margin", "nll"):
        got = [r[key] for r in read_metrics(tmp_path / "two")]
        assert got == pytest.approx([r[key] for r in read_metrics(tmp_path / "one")], abs=1e-6), key
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)


def test_deepspeed_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RunSetupError, match="DeepSpeed is not supported.*fsdp.yaml"):
        make_accelerator(SFTConfig())


# --------------------------------------------------------------------------------------------------
# Security


def test_telemetry_is_off_unless_the_user_chose(monkeypatch):
    import align

    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    importlib.reload(align)
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    importlib.reload(align)
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "0"


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    """A checkpoint whose optimiser file carries a pickled callable (with matching checksums, as an
    attacker would write it) is refused by weights_only loading and the callable never runs."""
    import hashlib

    from align.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(
        tmp_path, 1, model_state={"w": torch.zeros(2)}, optimizer_state={}, trainer_state={"step": 1}
    )
    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, path / "optimizer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(path)  # checksums match: only weights_only stands in the way
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(path)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_remote_code_is_not_run_by_default(tiny_byte_dir, tmp_path):
    from align.models import load_causal_lm

    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    for f in tiny_byte_dir.iterdir():
        if f.is_file():
            (model_dir / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.E"}
    )
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = SFTConfig(model_name_or_path=str(model_dir))
    assert cfg.trust_remote_code is False
    with pytest.raises(Exception, match="(?i)trust_remote_code|evil"):
        load_causal_lm(cfg)
    assert not marker.exists()


def test_symlink_out_of_a_data_directory_is_refused(tmp_path):
    outside = tmp_path / "secret.jsonl"
    write_sft_jsonl(outside, 2, seed=1)
    root = tmp_path / "data"
    root.mkdir()
    write_sft_jsonl(root / "a.jsonl", 3, seed=2)
    (root / "b.jsonl").symlink_to(root / "a.jsonl")  # a link inside the root is fine
    convs, report = load_sft(root)
    assert report.used == 6
    (root / "c.jsonl").symlink_to(outside)
    with pytest.raises(
        DataSourceError, match=r"c\.jsonl: symlink to .*secret\.jsonl, outside the data directory"
    ):
        load_sft(root)
    (root / "c.jsonl").unlink()
    (root / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DataSourceError, match="sub: symlink to"):
        load_sft(root)


def test_sources_use_only_safe_loaders():
    """No pickle, no eval/exec, no yaml.load, no torch.load without weights_only=True, no hard-wired
    trust_remote_code=True anywhere in the package, recipes or evaluation scripts."""
    forbidden = {
        r"^\s*(import|from)\s+(pickle|dill|shelve|marshal)\b": "pickle-family import",
        r"(?<![\w.])(eval|exec)\(": "eval/exec",
        r"yaml\.(load|unsafe_load|full_load)\(": "yaml loader other than safe_load",
        r"trust_remote_code\s*=\s*True": "hard-wired trust_remote_code=True",
    }
    problems = []
    for folder in ("align", "chatml", "recipes", "eval"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            text = file.read_text()
            for pattern, what in forbidden.items():
                for m in re.finditer(pattern, text, re.M):
                    problems.append(
                        f"{file.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}"
                    )
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start() : text.find(")", m.start()) + 1]
                if "weights_only=True" not in call:
                    problems.append(f"{file.relative_to(ROOT)}: torch.load without weights_only=True")
    assert problems == []
