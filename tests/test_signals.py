"""Crash safety end to end: SIGKILL (also in the middle of a checkpoint write) and SIGTERM on real
recipe processes, then resume; the per-step losses must equal those of an uninterrupted run.

Every checkpoint write can be made to pause (ALIGN_CHECKPOINT_WRITE_PAUSE_S) so that a kill lands
where the test wants it: inside a write (SFT), or after a complete checkpoint (PPO). The SIGTERM of
the other loops is checked in-process, with the signal sent from inside the loop.
"""

import gc
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from conftest import ascii_reward

from align.checkpoint import PAUSE_ENV, list_checkpoints, verify_checkpoint
from align.config import PPOConfig, SFTConfig
from align.tasks import write_sft_jsonl
from align.tracking import read_metrics
from align.train import checkpointing
from align.train.ppo import run_ppo
from align.train.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_sft_jsonl(path, 48, seed=3)
    return path


def _sft_args(model_dir, data, out):
    return dict(
        model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(out), max_length=512,
        batch_size=4, micro_batch_size=2, max_steps=8, learning_rate=3e-3, warmup_steps=1,
        lr_scheduler="cosine", save_steps=1, save_total_limit=2, eval_tasks=0, report_to=["none"],
        progress=False, packing=False, dropout=0.1,
    )  # fmt: skip


def _cli(args):
    return [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in args.items()]


class Recipe:
    """A recipe process whose output goes to files, so the test can watch it while it runs."""

    def __init__(self, script, args, log_dir, name, pause=None):
        # PYTHONPATH: the recipes import this checkout's `align`, installed or not.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        if pause is not None:
            env[PAUSE_ENV] = str(pause)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, script, *_cli(args)], cwd=ROOT, env=env, stdout=out, stderr=err
            )

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"process ended (rc {self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        return self.proc.returncode

    @property
    def stdout(self):
        return self.out_path.read_text()

    @property
    def stderr(self):
        return self.err_path.read_text()


def _steps(ckpt_root):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(ckpt_root)]


def test_sft_survives_kill_mid_write_and_sigterm(tiny_byte_dir, sft_data, tmp_path):
    args = _sft_args(tiny_byte_dir, sft_data, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"

    # 1. SIGKILL while step 3's checkpoint is being written (its temporary directory exists).
    run = Recipe("recipes/sft.py", args, tmp_path, "a", pause=1.0)
    run.wait_for(lambda: any(ckpts.glob(".tmp-step-3-*")), "the write of step-3")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert _steps(ckpts) == [1, 2]  # the half-written step-3 is not a checkpoint
    verify_checkpoint(ckpts / "step-2")

    # 2. Resume: it names the unfinished write and falls back to step-2. SIGTERM it as soon as it has
    #    resumed: it finishes the step it is in, writes a checkpoint, says so and exits with status 0.
    run = Recipe("recipes/sft.py", args, tmp_path, "b", pause=0.5)
    run.wait_for(lambda: "resuming from" in run.stdout, "the resume")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.stderr[-3000:]
    assert "ignoring unfinished checkpoint write" in run.stderr and ".tmp-step-3-" in run.stderr
    assert f"resuming from {ckpts / 'step-2'} at step 2" in run.stdout
    assert "SIGTERM received" in run.stderr
    stopped = int(run.stdout.split("stopped on SIGTERM after step ")[1].split(";")[0])
    assert 2 < stopped < 8
    assert max(_steps(ckpts)) == stopped
    verify_checkpoint(ckpts / f"step-{stopped}")
    assert not (tmp_path / "run" / "final").exists()

    # 3. Resume to the end (in this process) and compare every step with an uninterrupted run.
    run_sft(SFTConfig(**args))
    run_sft(SFTConfig(**{**args, "output_dir": str(tmp_path / "ref")}))
    got, ref = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["trained_tokens"] for r in got] == [r["trained_tokens"] for r in ref]  # same data order
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], abs=1e-6)


def test_ppo_resumes_exactly_after_kill(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
    args = dict(
        model_name_or_path=str(tiny_byte_dir), reward_model_path=str(tiny_rm_dir), dataset=str(prompts_file),
        output_dir=str(tmp_path / "run"), batch_size=4, micro_batch_size=4, samples_per_query=2,
        max_new_tokens=6, max_steps=4, value_warmup_steps=1, ppo_epochs=1, policy_lr=1e-3, value_lr=1e-3,
        ptx_coef=0.0, save_steps=1, save_total_limit=5, report_to=["none"], progress=False,
        train_missing_stages=False, log_rollouts=0,
    )  # fmt: skip
    ckpts = tmp_path / "run" / "checkpoints"
    run = Recipe("recipes/ppo.py", args, tmp_path, "ppo", pause=0.5)
    run.wait_for(lambda: (ckpts / "step-2").is_dir(), "checkpoint step-2")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert 2 <= max(_steps(ckpts)) < 4
    run_ppo(PPOConfig(**args))
    run_ppo(PPOConfig(**{**args, "output_dir": str(tmp_path / "ref")}))
    got, ref = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    keys = [k for k in ("rm_score", "kl", "value_loss", "policy_loss", "entropy") if k in ref[-1]]
    assert {"rm_score", "kl", "value_loss"} <= set(keys)
    for key in keys:
        assert [r.get(key) for r in got] == pytest.approx([r.get(key) for r in ref], abs=1e-6), key


def _loops(tiny_byte_dir, tiny_rm_dir, prompts_file, data_dir):
    """(name, run function, config) of every training loop, each on a tiny model."""
    from align.config import DPOConfig, GRPOConfig, OnlineDPOConfig, RMConfig
    from align.tasks import generate_tasks, preference_pairs, write_jsonl
    from align.train import dpo, online, ppo, reward, sft

    pairs = write_jsonl(data_dir / "pairs.jsonl", preference_pairs(generate_tasks(16, seed=7), seed=7))
    sft_data = write_sft_jsonl(data_dir / "sft.jsonl", 16, seed=3)
    common = dict(max_steps=4, save_steps=0, report_to=["none"], progress=False)
    rl = dict(
        model_name_or_path=str(tiny_byte_dir), dataset=str(prompts_file), batch_size=4, micro_batch_size=8,
        samples_per_query=2, max_new_tokens=6, log_rollouts=0, **common,
    )  # fmt: skip
    small = dict(model_name_or_path=str(tiny_byte_dir), batch_size=4, micro_batch_size=4, **common)
    return [
        ("sft", sft.run_sft, SFTConfig(dataset=str(sft_data), max_length=512, packing=False, eval_tasks=0, **small)),
        ("rm", reward.run_reward, RMConfig(stage="rm", dataset=str(pairs), max_length=512, **small)),
        ("dpo", dpo.run_dpo, DPOConfig(dataset=str(pairs), max_length=512, eval_tasks=0, **small)),
        ("ppo", partial(ppo.run_ppo, reward_fn=ascii_reward), PPOConfig(
            reward_model_path=str(tiny_rm_dir), train_missing_stages=False, value_warmup_steps=1,
            **{**rl, "micro_batch_size": 4})),
        ("grpo", partial(online.run_grpo, reward_fn=ascii_reward), GRPOConfig(eval_tasks=0, **rl)),
        ("odpo", partial(online.run_online_dpo, reward_fn=ascii_reward),
         OnlineDPOConfig(eval_tasks=0, **rl)),
    ]  # fmt: skip


def test_sigterm_stops_every_loop_with_a_checkpoint(
    tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    """In-process: SIGTERM arrives right after step 1's stop poll (from the step boundary's checkpoint_due),
    so each loop must finish step 2, write checkpoint step-2 (save_steps=0 writes none before the end)
    and return."""
    import dataclasses

    handler_before = signal.getsignal(signal.SIGTERM)
    real = checkpointing.checkpoint_due

    def due_and_sigterm_after_step_1(cfg_, step, total):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg_, step, total)

    for name, run, cfg in _loops(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
        monkeypatch.setattr(checkpointing, "checkpoint_due", due_and_sigterm_after_step_1)
        out = tmp_path / name
        result = run(dataclasses.replace(cfg, output_dir=str(out)))
        monkeypatch.undo()
        assert result == {"stopped_at": 2}, name
        assert _steps(out / "checkpoints") == [2], name
        verify_checkpoint(out / "checkpoints" / "step-2")
        assert [r["step"] for r in read_metrics(out)] == [1, 2], name
    gc.collect()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # each run's handler is gone after it


def test_first_ctrl_c_asks_to_stop_the_second_aborts(capsys):
    from types import SimpleNamespace

    from align.train.process import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest(SimpleNamespace(num_processes=1))
    assert not stop.poll()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread
    assert stop.poll() and stop.reason == "SIGINT"
    assert "SIGINT received: finishing the current step" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    del stop
    gc.collect()
    assert signal.getsignal(signal.SIGINT) is before
