"""The start every one-model loop (SFT, reward model, DPO) shares: optimiser, schedule, accelerate's
prepare (or align's own sharding), resume and the metrics logger, bundled as one `SingleModelRun`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align.config import TrainConfig
from align.train.checkpointing import RunCheckpointer
from align.train.optimization import build_optimizer, build_scheduler
from align.train.sharding import is_sharded, memory_report, shard_model


@dataclass
class SingleModelRun:
    """The prepared model, optimiser, schedule, checkpointer and logger of a one-model training loop."""

    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped where that applies), or sharded
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
    *,
    shard: bool = False,
    start_model: str | None = None,
) -> SingleModelRun:
    """Optimiser and schedule from `cfg`, accelerate's prepare, resume from the latest good checkpoint,
    and the metrics logger: what SFT, reward-model and DPO training share before their first step.

    `shard`: FSDP2 (`align.train.sharding`) instead of accelerate's prepare, which must not also wrap a
    sharded model; the optimiser is built after sharding, so it holds the shards. `start_model`: the model
    the run starts from, resolved; a checkpoint saved by a run from another is refused on resume."""
    from align.tracking import MetricsLogger

    if shard:
        model = shard_model(model.to(accelerator.device))
        optimizer = build_optimizer(model, cfg)
        unwrapped = model
    else:
        optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    if not shard:
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
    log_memory(accelerator, unwrapped, cfg, out)
    checkpointer = RunCheckpointer(accelerator, out, cfg, fingerprint, start_model)
    start_step, saved = checkpointer.restore({"model": unwrapped}, {"model": optimizer}, {"model": scheduler})
    logger = MetricsLogger(
        out,
        cfg.report_to,
        enabled=accelerator.is_main_process,
        resume_step=start_step if saved is not None else None,
        run_config=dataclasses.asdict(cfg),
    )
    return SingleModelRun(model, unwrapped, optimizer, scheduler, checkpointer, logger, start_step, saved)


def log_memory(
    accelerator: Accelerator,
    model: torch.nn.Module,
    cfg: TrainConfig,
    out: Path,
    accumulation: int | None = None,
) -> dict[str, Any]:
    """Say, and write to memory.json, each rank's bytes of parameters, gradients and AdamW state: what
    sharding divides (activations are not counted). A collective: every process calls it.

    `accumulation`: micro-batches per optimiser step (default: a global batch of `batch_size` rows)."""
    if accumulation is None:
        accumulation = max(cfg.batch_size // (cfg.micro_batch_size * accelerator.num_processes), 1)
    mine = memory_report(model, accumulation)
    keys = list(mine)
    local = torch.tensor([[mine[k] for k in keys]], dtype=torch.float64, device=accelerator.device)
    rows = accelerator.gather(local).cpu().tolist() if accelerator.num_processes > 1 else local.tolist()
    report = {
        "sharding": "fsdp" if is_sharded(model) else "none",
        "processes": accelerator.num_processes,
        "ranks": [{k: int(v) for k, v in zip(keys, row, strict=True)} for row in rows],
    }
    if accelerator.is_main_process:
        (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
        mib = {k: v / (1 << 20) for k, v in report["ranks"][0].items()}
        extra = (
            f" (+{mib['grads_accumulating']:.1f} unsharded while accumulating)"
            if mib["grads_accumulating"]
            else ""
        )
        accelerator.print(
            f"memory of rank 0 ({report['sharding']}, {report['processes']} process(es)), MiB: parameters "
            f"{mib['params']:.1f}, gradients {mib['grads']:.1f}{extra}, AdamW {mib['optimizer']:.1f}, "
            f"total {mib['total']:.1f}"
        )
    return report
