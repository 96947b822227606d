"""Atomic checkpoints with a checksummed manifest, and exact resume.

A checkpoint is written into a temporary directory beside its final place, every file is fsynced, a
`manifest.json` with the SHA-256 of each file is written last, and only then is the directory renamed
to `step-N`. A crash at any moment leaves either the previous checkpoint set or the new complete one;
a directory without a valid manifest is never mistaken for a checkpoint. On resume, a checkpoint whose
files do not match their checksums is named in a warning and the previous good one is used.

Weights go to safetensors; the optimiser, scheduler and RNG states go through `torch.save` and come
back with `torch.load(weights_only=True)`, so loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
MANIFEST = "manifest.json"
# Seconds to pause inside every checkpoint write, after its files and before its manifest: lets the
# tests kill a run in the middle of a write on purpose. Unset in normal use.
PAUSE_ENV = "ALIGN_CHECKPOINT_WRITE_PAUSE_S"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing files or whose files do not match their checksums."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG that training consumes (dropout, sampling), to restore on resume."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    torch_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write `root/step-{step}` atomically and keep only the newest `keep` checkpoints.

    Args:
        model_state: tensors to restore (the trainable parameters; frozen ones come from the base model).
        optimizer_state: `optimizer.state_dict()`.
        trainer_state: JSON-able progress (step, data position, running statistics).
        torch_state: anything else with tensors (scheduler, RNG), loaded back with weights_only=True.
        config: the run's config, stored as JSON for the record.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    # safetensors refuses non-contiguous or shared storage; clone to be safe with tied/sliced params.
    save_file(
        {k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()}, tmp / "model.safetensors"
    )
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(torch_state or {}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))

    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for path in files:
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    manifest = {
        "step": step,
        "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    manifest_path = tmp / MANIFEST
    with manifest_path.open("w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = root / f".old-{PREFIX}{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under root, oldest first (by step number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit():
            found.append((int(path.name[len(PREFIX) :]), path))
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    root = Path(root)
    for path in root.glob(".tmp-*"):
        if path.is_dir() and not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming what is wrong with `path`, or return if it is whole."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {err}") from err
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, manifest says {meta['bytes']}"
            )
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupted)")


def find_resume_checkpoint(root: str | Path) -> Path | None:
    """The newest whole checkpoint under root; corrupted ones are reported and passed over."""
    root = Path(root)
    if root.is_dir():
        for unfinished in sorted(root.glob(f".tmp-{PREFIX}*")):
            warnings.warn(
                f"ignoring unfinished checkpoint write {unfinished} (the run was killed while saving)",
                stacklevel=2,
            )
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"skipping bad checkpoint: {err}", stacklevel=2)
            continue
        return path
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and read a checkpoint: model_state, optimizer_state, trainer_state, torch_state."""
    path = Path(path)
    verify_checkpoint(path)
    return {
        "model_state": load_file(path / "model.safetensors", device=str(map_location)),
        "optimizer_state": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "torch_state": torch.load(path / "state.pt", map_location="cpu", weights_only=True),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "path": path,
    }
