"""The start every one-model loop (SFT, reward model, DPO) shares: optimiser, schedule, accelerate's
prepare, resume and the metrics logger, bundled as one `SingleModelRun`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align.config import TrainConfig
from align.train.checkpointing import RunCheckpointer
from align.train.optimization import build_optimizer, build_scheduler


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
