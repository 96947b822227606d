"""Atomic checkpoints with a checksummed manifest, and exact resume.

A checkpoint is written into a temporary directory beside its final place, every file is fsynced, a
`manifest.json` with the SHA-256 of each file is written last, and only then is the directory renamed
to `step-N`. A crash at any moment leaves either the previous checkpoint set or the new complete one;
a directory without a valid manifest is never mistaken for a checkpoint. On resume, a checkpoint whose
files do not match their checksums is named in a warning and the previous good one is used.

Weights go to safetensors; the optimiser, scheduler and RNG states go through `torch.save` and come
back with `torch.load(weights_only=True)`, so loading a checkpoint never runs pickled code.

A sharded run (FSDP2) writes the same directory through every process (`save_sharded_checkpoint`):
weights and optimiser moments as `torch.distributed.checkpoint` shards under `dcp/` (keyed by parameter
name, so they load at any world size, and tensors only: DCP unpickles non-tensor entries with
weights_only=False, so the optimiser's param_groups go to `state.pt` instead), one RNG file per rank,
and the same manifest, sealed and renamed by rank 0 once every rank has written.
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
DCP_DIR = "dcp"  # the sharded tensors of a sharded checkpoint
RANK_RNG = "rng-rank{rank}.pt"
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
    _write_common(tmp, torch_state, trainer_state, config)
    return _seal(root, tmp, final, step, keep)


def _write_common(
    tmp: Path,
    torch_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any] | None,
) -> None:
    torch.save(torch_state or {}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def _seal(root: Path, tmp: Path, final: Path, step: int, keep: int) -> Path:
    """fsync every file of `tmp`, write the manifest last, rename `tmp` to `final`, prune old ones."""
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    for folder in sorted({p.parent for p in files}, reverse=True):
        _fsync_dir(folder)
    manifest = {
        "step": step,
        "files": {
            p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files
        },
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


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    *,
    sharded_state: dict[str, Any],
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    torch_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write `root/step-{step}` from every process of a sharded run, atomically; a collective.

    Args:
        sharded_state: tensors and DTensors only (model and optimiser-moment state dicts, nested),
            written with `torch.distributed.checkpoint`: each rank writes its own shards.
        rank_state: this rank's own state (its RNG), one file per rank.
        trainer_state, torch_state, config: as `save_checkpoint`, the same on every rank; rank 0 writes them.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    rank = dist.get_rank()
    name = [f".tmp-{PREFIX}{step}-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # rank 0's name, so the rank-0 pid rule of pruning holds
    tmp, final = root / name[0], root / f"{PREFIX}{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dcp.save(sharded_state, checkpoint_id=tmp / DCP_DIR)
    torch.save(rank_state, tmp / RANK_RNG.format(rank=rank))
    dist.barrier()  # every rank's files are in place before rank 0 checksums and renames them
    if rank == 0:
        _write_common(tmp, torch_state, trainer_state, config)
        _seal(root, tmp, final, step, keep)
    dist.barrier()
    return final


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def load_sharded_state(path: str | Path, template: dict[str, Any]) -> None:
    """Fill `template` (state dicts of this run's sharded or whole tensors) in place from a sharded
    checkpoint, resharding to this world size; without a process group, one process reads it all."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=Path(path) / DCP_DIR, no_dist=not dist.is_initialized())


def load_rank_state(path: str | Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s saved RNG state; a rank the saving run did not have takes rank (rank mod saved)'s."""
    path = Path(path)
    saved = sorted(path.glob(RANK_RNG.format(rank="*")))
    own = path / RANK_RNG.format(rank=rank)
    file = own if own.is_file() else path / RANK_RNG.format(rank=rank % max(len(saved), 1))
    return torch.load(file, map_location="cpu", weights_only=True)


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
    """Verify and read a checkpoint: model_state, optimizer_state, trainer_state, torch_state.

    A sharded checkpoint gives `sharded: True` and no model or optimiser state: those are read into the
    run's own tensors by `load_sharded_state`."""
    path = Path(path)
    verify_checkpoint(path)
    if is_sharded_checkpoint(path):
        return {
            "sharded": True,
            "torch_state": torch.load(path / "state.pt", map_location="cpu", weights_only=True),
            "trainer_state": json.loads((path / "trainer_state.json").read_text()),
            "path": path,
        }
    return {
        "model_state": load_file(path / "model.safetensors", device=str(map_location)),
        "optimizer_state": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "torch_state": torch.load(path / "state.pt", map_location="cpu", weights_only=True),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "path": path,
    }
