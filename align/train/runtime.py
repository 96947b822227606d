"""What every training loop sets up the same way: output directory, accelerator, batch plan, data
order, optimiser and schedule. Each loop in `align/train/` stays about its own stage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
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


class NonFiniteStop(RunSetupError):
    """A non-finite loss or gradient with `on_nonfinite=stop`: raised after the checkpoint is written."""


class StopRequest:
    """SIGTERM, or the first SIGINT (Ctrl-C), asks the run to stop at the next optimiser-step boundary.

    The handler only sets a flag: the loop finishes the step it is in, writes a checkpoint and returns,
    so the next run resumes exactly there. A second SIGINT aborts at once (KeyboardInterrupt). Under
    accelerate every process polls and the flags are max-reduced, so all ranks stop at the same step
    even if only one of them got the signal. The previous handlers come back when this object is
    collected (the run is over), so a library caller's own Ctrl-C handling is left as it was.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.reason: str | None = None  # why the run stops: "SIGTERM", "SIGINT", "non-finite ..."
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        ref = weakref.ref(self)

        def handler(signum: int, frame: Any) -> None:
            me = ref()
            if me is None:  # the run is over: behave as before it started
                prior = previous[signum]
                if callable(prior):
                    prior(signum, frame)
                elif prior in (signal.SIG_DFL, None):  # the default action (terminate): re-deliver
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            me._on_signal(signum)

        for sig in self.SIGNALS:
            signal.signal(sig, handler)
        weakref.finalize(self, _restore_handlers, previous, handler)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        if self.reason is None:
            self.reason = name
            print(
                f"\n{name} received: finishing the current step, then writing a checkpoint and stopping "
                "(Ctrl-C again aborts without one)",
                file=sys.stderr,
                flush=True,
            )

    def request(self, reason: str) -> None:
        """Ask for a stop from inside the loop (e.g. a non-finite step with on_nonfinite=stop)."""
        self.reason = self.reason or reason

    def poll(self) -> bool:
        """Whether any process asked to stop; a collective under accelerate (every rank must call it)."""
        local = self.reason is not None
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([float(local)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item() > 0)


def _restore_handlers(previous: dict[int, Any], ours: Any) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prior in previous.items():
        if signal.getsignal(sig) is ours:  # a later run may have installed its own since
            signal.signal(sig, prior if prior is not None else signal.SIG_DFL)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """bf16 autocast over fp32 master weights on GPU; plain fp32 on CPU (bf16 there is slow and lossy).

    DeepSpeed is refused: our loops accumulate gradients by hand (`no_sync` on all but the last
    micro-batch, one `optimizer.step()` per global batch, our own non-finite check on the clipped norm),
    while a DeepSpeed engine counts micro-batches itself (`gradient_accumulation_steps`, clipping and
    stepping inside `engine.step()`), so the two would disagree on when a step happens. Sharding: FSDP.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise RunSetupError(
            "DeepSpeed is not supported by align's training loops (they accumulate gradients themselves, "
            "which a DeepSpeed engine does not allow); use accelerate_configs/fsdp.yaml to shard, or ddp.yaml"
        )
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_available()):
        precision = "bf16"
    else:
        precision = "no"
    simple_launch = "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ
    mpi = any(os.environ.get(k) for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if simple_launch and "MASTER_PORT" in os.environ and not mpi:
        # `accelerate launch` with a CPU config and num_processes > 1 sets MASTER_PORT but starts ONE
        # process unless it goes through mpirun (accelerate 1.15): a "2-process" run that is not.
        raise RunSetupError(
            "accelerate launch started a single process for a multi-process CPU config (it starts several "
            "CPU processes only through mpirun); use ACCELERATE_USE_CPU=true torchrun --nproc_per_node N "
            "recipes/<stage>.py ..."
        )
    accelerator = Accelerator(mixed_precision=precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # accelerate falls back to "no distribution" when the config names an engine this machine
        # cannot run (FSDP or multi-GPU without GPUs): every process would then train alone and
        # write the same output_dir.
        raise RunSetupError(
            f"launched as {launched} processes, but accelerate set up no distributed backend (an FSDP or "
            "multi-GPU config on a machine without GPUs?); on CPU use accelerate_configs/cpu_ddp.yaml"
        )
    return accelerator


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
        **adamw_kernel(decay + no_decay),
    )


def adamw_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's implementation by device: the fused kernel (one launch per step instead of one per
    tensor; on CPU ~9x faster than the per-tensor loop) where torch has it for every parameter, else
    the multi-tensor `foreach` one. Both give the per-tensor loop's update to float rounding (~1e-7)."""
    fused_ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fused_ok else {"foreach": True}


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
        self.stop = StopRequest(accelerator)  # created with the run, so SIGTERM is handled from here on

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
            save(step)
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
        reason = self.stop.reason
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


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    grad_norm: torch.Tensor | float,
    state: dict[str, Any],
    checkpointer: RunCheckpointer,
    step: int,
) -> bool:
    """Apply one optimiser update unless the (global, already clipped-for) gradient norm is non-finite.

    A NaN/inf loss gives a non-finite gradient, and the norm from `accelerator.clip_grad_norm_` is the
    same on every rank, so all processes skip together. A skipped update drops the gradients (they
    would poison the weights and Adam's moments), counts it in `state["skipped_nonfinite"]` (logged
    and checkpointed) and tells the checkpointer (which stops the run if on_nonfinite=stop).
    """
    if math.isfinite(float(grad_norm)):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True
    optimizer.zero_grad(set_to_none=True)
    state["skipped_nonfinite"] = state.get("skipped_nonfinite", 0) + 1
    checkpointer.nonfinite(step, "gradient")
    return False


def checkpoint_due(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether optimiser step `step` (1-based) writes a checkpoint: every `save_steps`, and the last."""
    return (cfg.save_steps > 0 and step % cfg.save_steps == 0) or step == total
