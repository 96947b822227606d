"""What every training loop sets up the same way: output directory, accelerator, batch plan, data
order, optimiser and schedule. Each loop in `align/train/` stays about its own stage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from align.config import TrainConfig
from align.models import load_trainable_state, trainable_state

RUN_MARKER = ".align-run.json"


class RunSetupError(ValueError):
    """A run that cannot start as configured (batch sizes, output directory, resume)."""


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """bf16 autocast over fp32 master weights on GPU; plain fp32 on CPU (bf16 there is slow and lossy)."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available()):
        precision = "bf16"
    else:
        precision = "no"
    return Accelerator(mixed_precision=precision)


def prepare_output_dir(path: str | Path, *, overwrite: bool, is_main: bool, stage: str) -> Path:
    """Create output_dir, refusing a non-empty one that this tool did not create unless overwrite."""
    out = Path(path)
    marker = out / RUN_MARKER
    if out.exists() and any(out.iterdir()) and not marker.exists() and not overwrite:
        raise RunSetupError(
            f"output_dir {out} already holds files that align did not write; choose another output_dir "
            "or set overwrite=true"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.write_text(
                json.dumps({"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
            )
    return out


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of `batch_size` sequences is split over processes and forward passes."""

    batch_size: int
    micro_batch_size: int
    num_processes: int

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise RunSetupError("batch_size and micro_batch_size must be positive")
        per_step = self.micro_batch_size * self.num_processes
        if self.batch_size % per_step:
            raise RunSetupError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size={self.micro_batch_size} "
                f"x {self.num_processes} process(es) = {per_step}; pick sizes whose ratio is a whole number"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_processes)

    @property
    def per_process(self) -> int:
        return self.batch_size // self.num_processes

    def local_micro_batches(self, global_indices: list[int], rank: int) -> list[list[int]]:
        """This rank's contiguous share of the global batch, cut into micro-batches."""
        mine = global_indices[rank * self.per_process : (rank + 1) * self.per_process]
        return [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def global_batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of optimiser step `step` (0-based); the incomplete tail of each epoch is dropped."""
    steps_per_epoch = num_items // batch_size
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_permutation(num_items, seed, epoch)
    return order[k * batch_size : (k + 1) * batch_size]


def total_steps(cfg: TrainConfig, num_items: int) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) for this data, refusing data smaller than a batch."""
    steps_per_epoch = num_items // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunSetupError(
            f"{num_items} training sequences cannot fill one global batch of {cfg.batch_size}; "
            "lower batch_size or add data"
        )
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    return steps_per_epoch, max(steps, 1)


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (not biases, norms)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate if lr is None else lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        # The fused kernel is one launch per step instead of one per tensor; CUDA only.
        fused=torch.cuda.is_available(),
    )


def lr_factor(step: int, *, warmup_steps: int, total: int, shape: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    span = max(total - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    raise ValueError(f"unknown lr_scheduler {shape!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            warmup_steps=cfg.warmup_steps,
            total=total,
            shape=cfg.lr_scheduler,
            min_ratio=cfg.min_lr_ratio,
        ),
    )


class RunCheckpointer:
    """Saves and restores everything a training loop needs for exact resume.

    Handles any number of named modules, optimisers and schedulers (SFT has one of each; PPO has a
    policy and a value model), the RNG states, and a JSON-able `state` dict of loop progress. A
    checkpoint trained on other data (per `fingerprint`) is refused rather than silently continued.
    """

    def __init__(self, accelerator: Accelerator, out: Path, cfg: TrainConfig, fingerprint: str) -> None:
        self.accelerator = accelerator
        self.root = out / "checkpoints"
        self.cfg = cfg
        self.fingerprint = fingerprint

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
        for name, module in modules.items():
            prefix = f"{name}/"
            load_trainable_state(
                module, {k[len(prefix) :]: v for k, v in ckpt["model_state"].items() if k.startswith(prefix)}
            )
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(ckpt["optimizer_state"][name])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(ckpt["torch_state"]["schedulers"][name])
        set_rng_state(ckpt["torch_state"]["rng"])
        self.accelerator.print(f"resuming from {path} at step {saved['step']}")
        return saved["step"], saved

    def save(
        self,
        step: int,
        state: dict[str, Any],
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
    ) -> None:
        """Write checkpoint `step` from the main process; every process must call this."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
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
                trainer_state={**state, "step": step, "data_fingerprint": self.fingerprint},
                config=dataclasses.asdict(self.cfg),
                keep=self.cfg.save_total_limit,
            )
        self.accelerator.wait_for_everyone()


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


@dataclass
class SingleModelRun:
    """The prepared model, optimiser, schedule, checkpointer and logger of a one-model training loop."""

    model: torch.nn.Module  # as prepared by accelerate (DDP/FSDP-wrapped where that applies)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpointer: RunCheckpointer
    logger: Any
    start_step: int
    saved: dict[str, Any] | None  # the restored trainer state, None for a fresh run

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.checkpointer.save(
            step, state, {"model": self.unwrapped}, {"model": self.optimizer}, {"model": self.scheduler}
        )


def start_single_model_run(
    accelerator: Accelerator,
    model: torch.nn.Module,
    cfg: TrainConfig,
    out: Path,
    num_steps: int,
    fingerprint: str,
) -> SingleModelRun:
    """Optimiser and schedule from `cfg`, accelerate's prepare, resume from the latest good checkpoint,
    and the metrics logger: what SFT, reward-model and DPO training share before their first step."""
    from align.tracking import MetricsLogger

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    checkpointer = RunCheckpointer(accelerator, out, cfg, fingerprint)
    start_step, saved = checkpointer.restore({"model": unwrapped}, {"model": optimizer}, {"model": scheduler})
    logger = MetricsLogger(
        out,
        cfg.report_to,
        enabled=accelerator.is_main_process,
        resume_step=start_step if saved is not None else None,
        run_config=dataclasses.asdict(cfg),
    )
    return SingleModelRun(model, unwrapped, optimizer, scheduler, checkpointer, logger, start_step, saved)


def checkpoint_due(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether optimiser step `step` (1-based) writes a checkpoint: every `save_steps`, and the last."""
    return (cfg.save_steps > 0 and step % cfg.save_steps == 0) or step == total
