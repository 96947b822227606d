"""Exact resume: the run checkpointer (modules, optimisers, schedulers, RNG, loop state, stop at a
step boundary), when a checkpoint is due, and the data fingerprint that ties a checkpoint to its data.

Sharded modules (FSDP2) are saved by every rank as distributed-checkpoint shards, keyed by parameter
name, with one RNG state per rank; such a checkpoint resumes at any world size, sharded or not (SFT, RM,
DPO). The RL loops sample per process, so they resume only at the world size that wrote the checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    load_rank_state,
    load_sharded_state,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from align.config import TrainConfig
from align.models import load_trainable_state, trainable_state
from align.train.process import NonFiniteStop, RunSetupError, StopRequest
from align.train.sharding import is_sharded


class RunCheckpointer:
    """Saves and restores everything a training loop needs for exact resume.

    Handles any number of named modules, optimisers and schedulers (SFT has one of each; PPO has a
    policy and a value model), the RNG states, and a JSON-able `state` dict of loop progress. A
    checkpoint trained on other data (per `fingerprint`) is refused rather than silently continued.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        out: Path,
        cfg: TrainConfig,
        fingerprint: str,
        start_model: str | None = None,
        *,
        same_world: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.root = out / "checkpoints"
        self.cfg = cfg
        self.fingerprint = fingerprint
        # The model the run starts from, resolved: `model_name_or_path: auto` names a different model once
        # the SFT default exists, and continuing another start's checkpoint would mix two runs silently.
        self.start_model = start_model
        # The RL loops: each process samples its own share of the queries with its own seed, so a resume at
        # another world size would draw other rollouts than the uninterrupted run; refused.
        self.same_world = same_world
        self.stop = StopRequest(accelerator)  # created with the run, so SIGTERM is handled from here on
        # Whether the save under way is the stop's: a signal landing during a regular checkpoint's write
        # is acted on at the next step boundary, and only that save may say the run stopped.
        self._stopping = False

    def stop_requested(self) -> bool:
        """Poll at an optimiser-step boundary: True when a signal (on any process) or a non-finite step
        with on_nonfinite=stop asks the loop to write a checkpoint now and return."""
        return self.stop.poll()

    def end_of_step(
        self, step: int, total: int, save: Callable[[int], None], stop_after_step: int | None = None
    ) -> bool:
        """Every loop's optimiser-step boundary (1-based `step` of `total`): call `save(step)` when a checkpoint
        is due or a stop was asked (SIGTERM/Ctrl-C on any process, on_nonfinite=stop); True when the loop
        must return now (stopped, or `stop_after_step` reached, a test hook)."""
        stop = self.stop_requested()
        if checkpoint_due(self.cfg, step, total) or stop:
            self._stopping = stop
            save(step)
            self._stopping = False
        return stop or (stop_after_step is not None and step >= stop_after_step)

    def nonfinite(self, step: int, what: str = "loss or gradient") -> None:
        """Report a skipped non-finite step (1-based `step`); with on_nonfinite=stop, also ask to stop."""
        self.accelerator.print(f"step {step}: non-finite {what}, update skipped")
        if getattr(self.cfg, "on_nonfinite", "skip") == "stop":
            self.stop.request(f"non-finite {what} at step {step}")

    def find(self) -> Path | None:
        """The checkpoint to continue from per `cfg.resume` (auto, never, or a path)."""
        if self.cfg.resume == "auto":
            return find_resume_checkpoint(self.root)
        if self.cfg.resume == "never":
            return None
        return Path(self.cfg.resume)

    def restore(
        self,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
    ) -> tuple[int, dict[str, Any] | None]:
        """Load the latest good checkpoint into the given objects; return (step, saved state) or (0, None)."""
        path = self.find()
        if path is None:
            return 0, None
        ckpt = load_checkpoint(path)
        saved = ckpt["trainer_state"]
        if saved.get("data_fingerprint") != self.fingerprint:
            raise RunSetupError(
                f"{path} was trained on different data (fingerprint {saved.get('data_fingerprint')} != "
                f"{self.fingerprint}); use a new output_dir, or resume=never with overwrite=true"
            )
        if self.start_model is not None and saved.get("start_model") not in (None, self.start_model):
            raise RunSetupError(
                f"{path} was trained from {saved['start_model']}, this run starts from {self.start_model} "
                f"(model_name_or_path={getattr(self.cfg, 'model_name_or_path', None)!r}); use a new "
                "output_dir, or resume=never with overwrite=true"
            )
        self._check_world(path, saved.get("world_size"))
        if ckpt.get("sharded"):
            _restore_sharded(path, ckpt["torch_state"], modules, optimizers)
            set_rng_state(load_rank_state(path, self.accelerator.process_index))
        else:
            if any(is_sharded(m) for m in modules.values()):
                raise RunSetupError(
                    f"{path} was written with sharding=none; resuming it with sharding=fsdp is not supported "
                    "yet: resume with sharding=none"
                )
            for name, module in modules.items():
                prefix = f"{name}/"
                load_trainable_state(
                    module,
                    {k[len(prefix) :]: v for k, v in ckpt["model_state"].items() if k.startswith(prefix)},
                )
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(ckpt["optimizer_state"][name])
            set_rng_state(ckpt["torch_state"]["rng"])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(ckpt["torch_state"]["schedulers"][name])
        self.accelerator.print(f"resuming from {path} at step {saved['step']}")
        return saved["step"], saved

    def _check_world(self, path: Path, written: int | None) -> None:
        world = self.accelerator.num_processes
        if not self.same_world or written is None or written == world:
            return  # a checkpoint from before world_size was recorded cannot be checked
        raise RunSetupError(
            f"{path} was written by {written} processes and this run has {world}: an RL run samples each "
            "process's share of the queries with that process's seed, so at another world size it would not "
            f"continue the same run; resume with {written} processes (or start a new output_dir)"
        )

    def save(
        self,
        step: int,
        state: dict[str, Any],
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
    ) -> None:
        """Write checkpoint `step` from the main process (every process when sharded); every process
        must call this."""
        self.accelerator.wait_for_everyone()
        trainer_state = {
            **state, "step": step, "data_fingerprint": self.fingerprint,
            "world_size": self.accelerator.num_processes,
        }  # fmt: skip
        if self.start_model is not None:
            trainer_state["start_model"] = self.start_model
        if any(is_sharded(m) for m in modules.values()):
            sharded, groups = _sharded_state(modules, optimizers)
            save_sharded_checkpoint(
                self.root,
                step,
                sharded_state=sharded,
                rank_state=rng_state(),
                torch_state={
                    "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                    "param_groups": groups,
                },
                trainer_state=trainer_state,
                config=dataclasses.asdict(self.cfg),
                keep=self.cfg.save_total_limit,
            )
        elif self.accelerator.is_main_process:
            model_state = {
                f"{name}/{key}": tensor
                for name, module in modules.items()
                for key, tensor in trainable_state(module).items()
            }
            save_checkpoint(
                self.root,
                step,
                model_state=model_state,
                optimizer_state={name: opt.state_dict() for name, opt in optimizers.items()},
                torch_state={
                    "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                    "rng": rng_state(),
                },
                trainer_state=trainer_state,
                config=dataclasses.asdict(self.cfg),
                keep=self.cfg.save_total_limit,
            )
        self.accelerator.wait_for_everyone()
        reason = self.stop.reason if self._stopping else None
        if reason is not None:
            where = self.root / f"step-{step}"
            if reason.startswith("non-finite"):
                raise NonFiniteStop(
                    f"{reason} (on_nonfinite=stop): stopped with a checkpoint at {where}; "
                    "set on_nonfinite=skip or lower the learning rate, then run again to resume"
                )
            self.accelerator.print(
                f"stopped on {reason} after step {step}; checkpoint {where}; run again (resume=auto) to continue"
            )


# Trained weights only, as `trainable_state`: frozen ones come back from the base model.
def _model_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _sharded_state(
    modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"model/<name>": state, "optim/<name>": moments}, {name: param_groups}), keyed by parameter name.

    `get_optimizer_state_dict` gives an optimiser that has not stepped its state first (a zero-lr step
    on zero gradients, which leaves the weights as they are), so it also serves as the load template."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    missing = sorted(set(optimizers) - set(modules))
    if missing:
        raise ValueError(f"sharded checkpoint: optimisers {missing} have no module of the same name")
    tensors: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name, module in modules.items():
        tensors[f"model/{name}"] = get_model_state_dict(module, options=_model_options())
    for name, optimizer in optimizers.items():
        full = get_optimizer_state_dict(modules[name], optimizer)
        tensors[f"optim/{name}"] = full["state"]
        groups[name] = full["param_groups"]
    return tensors, groups


def _restore_sharded(
    path: Path,
    torch_state: dict[str, Any],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> None:
    """Read a sharded checkpoint into these modules and optimisers, sharded or not, at this world size."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    template, _ = _sharded_state(modules, optimizers)
    load_sharded_state(path, template)
    for name, module in modules.items():
        set_model_state_dict(module, template[f"model/{name}"], options=_model_options())
    for name, optimizer in optimizers.items():
        state = {"state": template[f"optim/{name}"], "param_groups": torch_state["param_groups"][name]}
        set_optimizer_state_dict(modules[name], optimizer, state)


def fingerprint_rows(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("input_ids", "labels")) -> str:
    """A short hash of tokenised training rows, so a resume against different data is caught."""
    digest = hashlib.sha256()
    for row in rows:
        for key in keys:
            value = row.get(key)
            if value is not None:
                digest.update(key.encode())
                digest.update(json.dumps(value).encode())
    return digest.hexdigest()[:16]


def checkpoint_due(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether optimiser step `step` (1-based) writes a checkpoint: every `save_steps`, and the last."""
    return (cfg.save_steps > 0 and step % cfg.save_steps == 0) or step == total
