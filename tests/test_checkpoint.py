"""Atomic checkpoints: manifest, checksums, fallback past a corrupted one, pruning."""

import json

import pytest
import torch

from align.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)


def _save(root, step, keep=3):
    model = {"w": torch.full((2, 2), float(step))}
    opt = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(
        root,
        step,
        model_state=model,
        optimizer_state=opt,
        trainer_state={"step": step},
        torch_state={"rng": rng_state()},
        keep=keep,
    )


def test_round_trip(tmp_path):
    path = _save(tmp_path, 5)
    assert path.name == "step-5"
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model_state"]["w"], torch.full((2, 2), 5.0))
    assert ckpt["trainer_state"] == {"step": 5}
    assert torch.equal(ckpt["optimizer_state"]["state"][0]["exp_avg"], torch.ones(2))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "state.pt", "trainer_state.json"}


def test_rng_state_restores_the_same_draws(tmp_path):
    path = _save(tmp_path, 1)
    expected = torch.rand(3)
    set_rng_state(load_checkpoint(path)["torch_state"]["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_keep_last_n(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]


def test_corrupted_latest_falls_back_to_previous(tmp_path):
    _save(tmp_path, 1)
    latest = _save(tmp_path, 2)
    data = bytearray((latest / "optimizer.pt").read_bytes())
    data[-10] ^= 0xFF
    (latest / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step-2: optimizer.pt does not match its checksum"):
        verify_checkpoint(latest)
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        assert find_resume_checkpoint(tmp_path).name == "step-1"


def test_half_written_checkpoint_is_not_a_checkpoint(tmp_path):
    good = _save(tmp_path, 1)
    half = tmp_path / "step-2"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="step-2: no manifest.json"):
        verify_checkpoint(half)
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(tmp_path) == good


def test_truncated_file_is_named(tmp_path):
    path = _save(tmp_path, 1)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model.safetensors has 20 bytes"):
        load_checkpoint(path)


def test_unfinished_write_is_named_and_passed_over(tmp_path):
    good = _save(tmp_path, 1)
    unfinished = tmp_path / ".tmp-step-2-12345"  # what a kill during the write of step 2 leaves
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"ignoring unfinished checkpoint write .*\.tmp-step-2-12345"):
        assert find_resume_checkpoint(tmp_path) == good
    _save(tmp_path, 3)  # the next save clears the leftovers of other processes
    assert not unfinished.exists()


def test_a_signal_during_a_regular_save_stops_at_the_next_boundary_and_says_so_once(tmp_path, capsys):
    """SIGTERM landing while step 3's due checkpoint is written: step 3 must not claim the stop (the loop
    goes on), step 4 saves, says "stopped ... after step 4" and returns True. It used to print "after step
    3" and then stop after 4, so the message named a step that was not the last (a flaky kill test)."""
    from types import SimpleNamespace

    from align.config import SFTConfig
    from align.train.checkpointing import RunCheckpointer

    accelerator = SimpleNamespace(
        num_processes=1, process_index=0, is_main_process=True, wait_for_everyone=lambda: None, print=print
    )
    cfg = SFTConfig(save_steps=1, output_dir=str(tmp_path))
    checkpointer = RunCheckpointer(accelerator, tmp_path, cfg, "fp")
    saved: list[int] = []

    def save(step: int) -> None:
        saved.append(step)
        if step == 3:
            checkpointer.stop.request("SIGTERM")  # the signal arrives during this write
        checkpointer.save(step, {}, {}, {}, {})

    assert checkpointer.end_of_step(3, 8, save) is False
    assert "stopped on" not in capsys.readouterr().out
    assert checkpointer.end_of_step(4, 8, save) is True
    out = capsys.readouterr().out
    assert saved == [3, 4] and "stopped on SIGTERM after step 4;" in out and "after step 3" not in out
