"""Which items each optimiser step trains on: the batch plan over processes and micro-batches, the
per-epoch data order, and the number of steps a run takes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.config import TrainConfig
from align.train.process import RunSetupError


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
