"""Loss functions: pure, torch only, each returning `(loss, stats)`.

Reductions are explicit. A loss that should be a mean over the trained tokens of a whole global batch
takes the global token count as `normalizer`, so that summing the micro-batch losses of a gradient
accumulation cycle (and of every data-parallel rank) gives exactly that mean: the update does not
depend on how the batch was split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, normalizer: float | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy summed over trained tokens and divided by `normalizer`.

    Args:
        logits: (N, V) logits at the N trained positions only (masked positions never reach here, so
            no full-vocabulary logits are built for prompts).
        targets: (N,) the token each position must predict.
        normalizer: the number of trained tokens in the whole global batch (all micro-batches, all
            ranks); pass N itself for a plain token mean.

    Returns:
        loss: scalar, sum of token losses / normalizer.
        stats: `nll_sum` (detached sum of token losses, fp32) and `tokens` (N).
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"sft_loss: expected logits (N, V) and targets (N,), got {logits.shape} {targets.shape}"
        )
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    stats = {"nll_sum": nll.detach(), "tokens": torch.tensor(targets.numel(), device=targets.device)}
    return nll / normalizer, stats
