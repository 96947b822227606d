"""The training process itself: the accelerator, the output directory, and stop requests (signals,
non-finite steps). Also the error every run set-up refusal raises."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from align.config import TrainConfig
from align.train.sharding import PG_TIMEOUT_ENV, check_sharding

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
    stepping inside `engine.step()`), so the two would disagree on when a step happens. Sharding is
    align's own FSDP2 (`sharding=fsdp`, align/train/sharding.py); accelerate then only launches.

    ALIGN_PG_TIMEOUT_S (seconds) bounds every collective's wait, so a hang fails instead of blocking.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise RunSetupError(
            "DeepSpeed is not supported by align's training loops (they accumulate gradients themselves, "
            "which a DeepSpeed engine does not allow); shard with sharding=fsdp (or accelerate_configs/"
            "fsdp.yaml), or use ddp.yaml"
        )
    try:
        check_sharding(cfg)
    except ValueError as err:
        raise RunSetupError(str(err)) from err
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
    handlers = []
    if os.environ.get(PG_TIMEOUT_ENV):
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=float(os.environ[PG_TIMEOUT_ENV]))))
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=handlers)
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
