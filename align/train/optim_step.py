"""One optimiser step for every loop (SFT, RM, DPO, PPO policy and value, online DPO and GRPO).

What each loop used to spell out on its own, in one place: clip the global gradient norm, skip the update
when the loss or the norm is not finite (counting it and telling the checkpointer, which stops the run with
on_nonfinite=stop), drop the gradients, and advance the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from align.train.sharding import clip_grad_norm, is_sharded


def optimizer_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float,
    counts: dict[str, Any],
    checkpointer: Any,
    step: int,
    scheduler: Any = None,
    loss: float | None = None,
    what: str = "loss or gradient",
) -> float:
    """Clip, check, step (or skip), zero the gradients, then step `scheduler` when given.

    Args:
        max_grad_norm: clip threshold for the global norm (<= 0: no clipping, the norm is still measured).
        counts: the run's checkpointed counters; a skipped step adds 1 to counts["skipped_nonfinite"].
        step: the 1-based step, for the message.
        scheduler: stepped after the update or the skip (a skipped step still advances the schedule, so a
            resumed run and an uninterrupted one agree); None where the loop steps it per iteration.
        loss: the global loss when the loop has it; a non-finite loss skips the step too.
    Returns:
        the gradient norm before clipping (a float; inf/nan on a skipped step).
    """
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    if is_sharded(model):  # accelerate does not know the model is sharded: clip over the shards here
        grad_norm = clip_grad_norm(model.parameters(), clip)
    else:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
    # The norm (and a reduced loss) are the same on every process, so all processes skip together.
    if math.isfinite(grad_norm) and (loss is None or math.isfinite(loss)):
        optimizer.step()
    else:
        counts["skipped_nonfinite"] = counts.get("skipped_nonfinite", 0) + 1
        checkpointer.nonfinite(step, what)
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return grad_norm
