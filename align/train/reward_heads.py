"""Training a reward model of K > 1 heads (``num_heads``) as an ensemble: each head's bootstrap weights over
the training items, one-head models (a PMP model) widened to K heads, and the ensemble loss of a
micro-batch (`align.losses.ensemble_pairwise_loss`).

The heads share the backbone, so what makes them differ is their start (K independent draws, or the PMP
head plus seeded noise) and their data: head k weighs training item i (a pair, or under
``pair_grouping: prompt`` a prompt's whole group: the unit that is sampled) by a count drawn from
(seed, k, i) alone, the same in every epoch, on every process and in every micro-batch split, so a
resumed or re-split run trains the same ensemble.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from align.losses import ensemble_pairwise_loss

Bootstrap = Literal["poisson", "bernoulli", "none"]

# P(N <= n) for N ~ Poisson(1), n = 0, 1, ...: counts above 12 have probability < 1e-10 and are cut there.
_POISSON_1_CDF = [sum(math.exp(-1.0) / math.factorial(j) for j in range(n + 1)) for n in range(12)]


def bootstrap_weight(seed: int, head: int, item: int, kind: Bootstrap) -> float:
    """How often head ``head`` sees training item ``item``: a function of (seed, head, item) only.

    poisson: a Poisson(1) count (the online bootstrap of Oza and Russell 2001: about 37% of the items
    0, 37% once, 18% twice, ...); bernoulli: 0 or 1 with probability 1/2 (each head on a random half);
    none: 1 (every head on every item: then only the heads' start tells them apart)."""
    if kind == "none":
        return 1.0
    # One uniform per (seed, head, item), from a string seed: stable across Python versions and platforms.
    u = random.Random(f"head-bootstrap:{seed}:{head}:{item}").random()
    if kind == "bernoulli":
        return 1.0 if u < 0.5 else 0.0
    if kind == "poisson":
        return float(next((n for n, p in enumerate(_POISSON_1_CDF) if u < p), len(_POISSON_1_CDF)))
    raise ValueError(f"unknown head_bootstrap {kind!r}; one of poisson, bernoulli, none")


def bootstrap_weights(items: Sequence[int], num_heads: int, seed: int, kind: Bootstrap) -> torch.Tensor:
    """(len(items), K) float32: `bootstrap_weight` of each item (row) for each head (column)."""
    return torch.tensor(
        [[bootstrap_weight(seed, k, i, kind) for k in range(num_heads)] for i in items], dtype=torch.float32
    ).reshape(len(items), num_heads)


def widen_head(head: nn.Linear, num_heads: int, seed: int, noise: float) -> nn.Linear:
    """A (hidden -> K) head whose every row starts as the one-head ``head``'s, plus Gaussian noise of std
    ``noise`` / sqrt(hidden + 1) (a fresh head's init scale) drawn from (seed, k), so head k's start does
    not depend on K; the biases are copied. noise 0: K exact copies."""
    if head.out_features != 1:
        raise ValueError(f"widen_head widens a one-head model, this head has {head.out_features} outputs")
    hidden = head.in_features
    wide = nn.Linear(hidden, num_heads, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        rows = []
        for k in range(num_heads):
            gen = torch.Generator().manual_seed(random.Random(f"head-init:{seed}:{k}").getrandbits(63))
            rows.append(torch.randn(hidden, generator=gen) * (noise / math.sqrt(hidden + 1)))
        wide.weight.copy_(head.weight.detach().float().cpu() + torch.stack(rows))
        wide.bias.copy_(head.bias.detach().float().cpu().expand(num_heads))
    return wide


def micro_batch_ensemble_loss(
    member_rewards: torch.Tensor,
    weights: torch.Tensor,
    index: dict[str, torch.Tensor] | None,
    margin: torch.Tensor | None,
    center_coef: float,
    normalizer: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ensemble loss of one micro-batch of the reward-model loop.

    Args:
        member_rewards: (S, K) the heads' rewards of the micro-batch's sequences: chosen_1, rejected_1, ...
            (pairs), or each group's distinct responses (``index`` given).
        weights: (I, K) the bootstrap weights of the micro-batch's I items (pairs, or groups).
        index: None for pairs; for groups `_forward_groups`' ``chosen_index``, ``rejected_index`` and
            ``group_of_pair`` (P,): a comparison weighs its group's weight / n_g, so each group counts once
            per draw, as in `align.losses.grouped_pairwise_loss`.
        margin: (P,) or None; center_coef: see `ensemble_pairwise_loss`.
        normalizer: (K,) each head's weight sum over the global batch (/ processes under DDP).
    """
    if index is None:
        chosen, rejected, pair_weights = member_rewards[0::2], member_rewards[1::2], weights
    else:
        group = index["group_of_pair"]
        chosen, rejected = member_rewards[index["chosen_index"]], member_rewards[index["rejected_index"]]
        counts = torch.bincount(group, minlength=weights.shape[0]).to(weights.dtype)
        pair_weights = weights[group] / counts[group, None]
    return ensemble_pairwise_loss(chosen, rejected, pair_weights, margin, center_coef, normalizer)
