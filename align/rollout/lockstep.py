"""Lockstep decoding across processes, for a model whose weights stay sharded during a rollout
(``rollout_sharded: lockstep``; align/train/sharding.py shards, ``full_weights`` is the other mode).

Every forward of a sharded model all-gathers each FSDP unit, a collective, so every rank must run the same
number of forwards in the same order. Decoding stops on each rank's own rows; in lockstep a rank keeps
running forwards (one row of padding once its own rows have all finished) until every rank's rows have,
and each decoding step asks all ranks first whether any row is still going (one small all-reduce). The
engines that can (`manual`, `hf` through transformers' ``synced_gpus``) also run whole idle chunks where
a rank has fewer chunks of rows than another. What each rank samples is what it would sample with the
whole weights: the same rows, the same random draws, the same logits.

Without a process group, or with one process, every helper is local (no collective).
"""

from __future__ import annotations

from typing import Any

import torch


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (a collective when there are several)."""
    if not distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def world_any(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank: a rank with rows still decoding keeps every rank stepping."""
    return world_max(int(flag), device) > 0


def idle_forward(model: Any, pad_id: int, device: torch.device) -> None:
    """One forward of one padding token, output dropped: a rank with nothing left to decode takes part in
    the all-gathers of the ranks that have."""
    model(
        input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device),
        use_cache=False,
        logits_to_keep=1,
    )


def refuse_lockstep(engine: str, why: str) -> None:
    """The one-line refusal of an engine that cannot decode in lockstep."""
    raise ValueError(f"rollout engine {engine} cannot decode in lockstep (rollout_sharded=lockstep): {why}")
