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


def _reduce_tokens(
    values: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None
) -> torch.Tensor:
    """Sum over masked tokens / normalizer (default: this batch's token count)."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum()
    return total / (mask.sum().clamp(min=1) if normalizer is None else normalizer)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: (B, T) the same under the policy that sampled them (no grad).
        advantages: (B, T), usually whitened.
        mask: (B, T) 1 on response tokens.
        normalizer: token count of the whole global batch (None: this batch's), see `sft_loss`.
    Returns:
        loss, stats: `clipfrac` (share of tokens where the clipped branch is active), `approx_kl`
        (mean of (ratio - 1) - log ratio, the k3 estimate of KL(old || new)), `ratio_mean`, `ratio_max`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = _reduce_tokens(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        m = mask.to(ratio.dtype)
        n = m.sum().clamp(min=1)
        stats = {
            "clipfrac": ((clipped > unclipped).to(ratio.dtype) * m).sum() / n,
            "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "ratio_max": torch.where(m.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None = 0.15,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) per token.

    Args:
        values: (B, T) current value predictions (with grad); old_values: (B, T) at rollout time.
        returns: (B, T) GAE returns; mask: (B, T).
        value_clip: c (Qwen: 0.15); None disables clipping.
    Returns:
        loss, stats: `vf_clipfrac` (share of tokens where the clipped error is the larger).
    """
    error = (values - returns) ** 2
    if value_clip is None:
        per_token = error
        clipfrac = torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped_error = (clipped_values - returns) ** 2
        per_token = torch.maximum(error, clipped_error)
        with torch.no_grad():
            m = mask.to(values.dtype)
            clipfrac = ((clipped_error > error).to(values.dtype) * m).sum() / m.sum().clamp(min=1)
    loss = 0.5 * _reduce_tokens(per_token, mask, normalizer)
    return loss, {"vf_clipfrac": clipfrac}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO family on per-sequence log-probs.

    Args:
        policy_*_logps, ref_*_logps: (B,) sums of response-token log-probs under the policy and the
            reference. (For `ipo` the IPO paper averages over tokens instead; pass averages then.)
        beta: inverse temperature of the implicit reward.
        loss_type, with h = (pc - rc) - (pr - rr), the log-ratio margin:
            sigmoid  -(1 - ls) log s(beta h) - ls log s(-beta h)        (DPO; ls > 0 is cDPO)
            robust   (-(1 - ls) log s(beta h) + ls log s(-beta h)) / (1 - 2 ls)   (robust DPO)
            hinge    max(0, 1 - beta h)                                 (SLiC)
            ipo      (h - 1 / (2 beta))^2                               (IPO)
        label_smoothing: ls, the assumed rate of flipped labels (sigmoid/robust only).
    Returns:
        loss (batch mean), stats: `chosen_rewards`/`rejected_rewards` (B,) = beta * log-ratios,
        `margins` (B,), and `accuracy` (share of pairs whose chosen reward is higher).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use sigmoid, robust, hinge or ipo")
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    stats = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), stats


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model, per pair -log sigmoid(r_c - r_r - m), plus optional centring.

    Args:
        chosen_rewards: (B,) rewards of the preferred responses.
        rejected_rewards: (B,) rewards of the other responses of the same pairs.
        margin: (B,) or a scalar, m: how much the chosen should win by (0 for pairs without one);
            None: no margin.
        center_coef: c >= 0; adds c * (r_c + r_r)^2 per pair, which pulls the mean reward to 0 without
            changing the ranking (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`).
        normalizer: the sum over pairs is divided by this: the pair count of the whole global batch
            under gradient accumulation or data parallelism; None: B (a plain mean).

    Returns:
        loss: scalar, sum_i [-log s(r_c - r_r - m) + c (r_c + r_r)^2] / normalizer.
        stats (detached, fp32): `loss_sum` (sum of the pairwise terms, without centring), `center_sum`
        (sum of (r_c + r_r)^2), `correct` (pairs with r_c > r_r), `ties` (r_c == r_r), `margin_sum`
        (sum of r_c - r_r), `pairs` (B), and the batch means `accuracy`, `margin` (mean r_c - r_r),
        `chosen_mean`, `rejected_mean`.
    """
    if chosen_rewards.ndim != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"pairwise_reward_loss: expected chosen and rejected rewards of shape (B,), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    chosen = chosen_rewards.float()
    rejected = rejected_rewards.float()
    diff = chosen - rejected
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    per_pair = -F.logsigmoid(logits)
    center = (chosen + rejected) ** 2
    total = per_pair.sum() + (center_coef * center.sum() if center_coef else 0.0)
    n = chosen.numel()
    loss = total / (n if normalizer is None else normalizer)
    with torch.no_grad():
        count = max(n, 1)
        stats = {
            "loss_sum": per_pair.sum().detach(),
            "center_sum": center.sum().detach(),
            "correct": (diff > 0).sum().float(),
            "ties": (diff == 0).sum().float(),
            "margin_sum": diff.sum().detach(),
            "pairs": torch.tensor(float(n), device=diff.device),
            "accuracy": (diff > 0).sum().float() / count,
            "margin": diff.sum().detach() / count,
            "chosen_mean": chosen.sum().detach() / count,
            "rejected_mean": rejected.sum().detach() / count,
        }
    return loss, stats


def grouped_pairwise_loss(
    scores: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    group_of_pair: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`pairwise_reward_loss` over groups of comparisons that share responses (InstructGPT's K-way batches).

    The comparisons of one prompt form a group; each distinct response of the group is scored once and
    every comparison reads its two scores by index, so K responses cost K scores, not K(K-1)/2 x 2.
    Each group counts once: a comparison's term is weighted 1 / n_g, n_g the comparison count of its group
    (InstructGPT divides by C(K, 2), the count when all K responses are ranked; here a group holds
    whichever comparisons the data has), so a prompt with many pairs outweighs neither a prompt with one
    nor, through its correlated comparisons, the rest of the batch.

    Args:
        scores: (R,) rewards of the distinct responses (with grad).
        chosen_index: (P,) int64, the position in ``scores`` of each comparison's preferred response.
        rejected_index: (P,) int64, the position of the other response of the same comparison.
        group_of_pair: (P,) int64, each comparison's group (any ids: equal id = same group).
        margin: (P,) or a scalar, m: how much the chosen should win by (0 for pairs without one); None: no
            margin.
        center_coef: c >= 0; adds c * (r_c + r_r)^2 per comparison, weighted like it (see
            `pairwise_reward_loss`).
        normalizer: the sum of the group means is divided by this: the group count of the whole global
            batch under gradient accumulation or data parallelism; None: the number of groups G here.

    Returns:
        loss: scalar, sum_g (1 / n_g) sum_{p in g} [-log s(r_c - r_r - m) + c (r_c + r_r)^2] / normalizer.
            With one comparison per group it is `pairwise_reward_loss` exactly (every weight is 1).
        stats (detached, fp32): weighted sums (each comparison 1 / n_g, so sums over groups of group
        means) `loss_sum` (pairwise terms, without centring), `center_sum`, `correct` (r_c > r_r), `ties`,
        `margin_sum` (r_c - r_r), `chosen_sum`, `rejected_sum`; counts `pairs` (P), `correct_pairs`
        (unweighted), `groups` (G), `responses` (R); and the means over groups `accuracy`, `margin`.
    """
    if scores.ndim != 1:
        raise ValueError(f"grouped_pairwise_loss: expected scores of shape (R,), got {tuple(scores.shape)}")
    shapes = {tuple(t.shape) for t in (chosen_index, rejected_index, group_of_pair)}
    if len(shapes) != 1 or chosen_index.ndim != 1:
        raise ValueError(
            "grouped_pairwise_loss: expected chosen_index, rejected_index and group_of_pair of one shape "
            f"(P,), got {tuple(chosen_index.shape)}, {tuple(rejected_index.shape)}, "
            f"{tuple(group_of_pair.shape)}"
        )
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    r = scores.float()
    chosen, rejected = r[chosen_index], r[rejected_index]
    _, group, counts = torch.unique(group_of_pair, return_inverse=True, return_counts=True)
    weight = 1.0 / counts.to(r.dtype)[group]  # 1 / n_g; exactly 1 for a group of one comparison
    diff = chosen - rejected
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    per_pair = -F.logsigmoid(logits)
    center = (chosen + rejected) ** 2
    # Same order of operations as pairwise_reward_loss, so unit weights give its loss bit for bit.
    total = (weight * per_pair).sum() + (center_coef * (weight * center).sum() if center_coef else 0.0)
    n_groups = counts.numel()
    loss = total / (n_groups if normalizer is None else normalizer)
    with torch.no_grad():
        w = weight.detach()
        count = max(n_groups, 1)
        correct = (w * (diff > 0)).sum()
        margin_sum = (w * diff).sum().detach()
        stats = {
            "loss_sum": (w * per_pair).sum().detach(),
            "center_sum": (w * center).sum().detach(),
            "correct": correct,
            "ties": (w * (diff == 0)).sum(),
            "margin_sum": margin_sum,
            "chosen_sum": (w * chosen).sum().detach(),
            "rejected_sum": (w * rejected).sum().detach(),
            "pairs": torch.tensor(float(diff.numel()), device=r.device),
            "correct_pairs": (diff > 0).sum().float(),
            "groups": torch.tensor(float(n_groups), device=r.device),
            "responses": torch.tensor(float(r.numel()), device=r.device),
            "accuracy": correct / count,
            "margin": margin_sum / count,
        }
    return loss, stats


def ensemble_pairwise_loss(
    member_chosen: torch.Tensor,
    member_rejected: torch.Tensor,
    weights: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`pairwise_reward_loss` for K reward heads on one backbone, each head on its own weighting of the pairs
    (its bootstrap resample), so the heads learn from different data and become an ensemble.

    Head k's loss is sum_p w[p, k] [-log s(r_c[p, k] - r_r[p, k] - m_p) + c (r_c[p, k] + r_r[p, k])^2] / W_k,
    and the loss is the mean of the K head losses. Training the heads' mean reward instead would give every
    head the same gradient.

    Args:
        member_chosen: (P, K) each head's reward of each pair's preferred response.
        member_rejected: (P, K) each head's reward of the other response of the same pair.
        weights: (P, K) >= 0, w[p, k]: the weight of pair p for head k (a bootstrap count; under grouped
            comparisons a group's count / n_g, its comparison count, see `grouped_pairwise_loss`).
        margin: (P,) or a scalar, m, shared by the heads; None: no margin.
        center_coef: c >= 0, reward centring per head (see `pairwise_reward_loss`), weighted like the pair.
        normalizer: (K,) or a scalar, W_k: head k's weight sum over the whole global batch (divided by the
            process count under DDP), so that micro-batch losses add up to the global batch's; None: this
            batch's ``weights.sum(0)``. A head whose W_k is 0 (no pair of the batch drawn) adds 0.

    Returns:
        loss: scalar, mean_k (sum_p w[p, k] l[p, k] / W_k). With K = 1 and unit weights it is
            `pairwise_reward_loss` exactly.
        stats (detached, fp32): per head (K,): `loss_sum` (sum_p w l, without centring), `center_sum`,
        `weight_sum` (sum_p w), `correct` (sum_p w [r_c > r_r]); over pairs: `disagreement_sum` (sum over
        pairs of the population std over the K heads of r_c - r_r: 0 when the heads agree), `pairs` (P).
    """
    if member_chosen.ndim != 2 or member_chosen.shape != member_rejected.shape:
        raise ValueError(
            f"ensemble_pairwise_loss: expected chosen and rejected member rewards of one shape (P, K), got "
            f"{tuple(member_chosen.shape)} and {tuple(member_rejected.shape)}"
        )
    if weights.shape != member_chosen.shape:
        raise ValueError(
            f"ensemble_pairwise_loss: weights {tuple(weights.shape)} != rewards {tuple(member_chosen.shape)}"
        )
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    chosen = member_chosen.float()
    rejected = member_rejected.float()
    w = weights.to(device=chosen.device, dtype=chosen.dtype)
    diff = chosen - rejected
    if margin is None:
        logits = diff
    else:
        m = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        logits = diff - (m[:, None] if m.ndim == 1 else m)  # one margin per pair, for every head
    per_pair = -F.logsigmoid(logits)
    center = (chosen + rejected) ** 2
    # Same order of operations as pairwise_reward_loss, so K = 1 with unit weights gives its loss bit for bit.
    total = (w * per_pair).sum(0) + (center_coef * (w * center).sum(0) if center_coef else 0.0)
    norm = w.sum(0) if normalizer is None else torch.as_tensor(normalizer, dtype=w.dtype, device=w.device)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # W_k = 0: every w is 0, the head adds 0
    loss = (total / norm).mean()
    with torch.no_grad():
        stats = {
            "loss_sum": (w * per_pair).sum(0).detach(),
            "center_sum": (w * center).sum(0).detach(),
            "weight_sum": w.sum(0),
            "correct": (w * (diff > 0)).sum(0),
            "disagreement_sum": diff.std(dim=1, unbiased=False).sum().detach(),
            "pairs": torch.tensor(float(diff.shape[0]), device=diff.device),
        }
    return loss, stats


def sft_loss_from_logprobs(
    token_logprobs: torch.Tensor, normalizer: float | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sft_loss` from the (N,) log-probs of the targets instead of (N, V) logits.

    Equal to `sft_loss(logits, targets, normalizer)` when `token_logprobs` are log softmax(logits) at
    the targets; it lets the caller get them from `align.fused_logprobs.lm_logprobs`, which never
    builds the full-vocabulary logits.
    """
    if token_logprobs.ndim != 1:
        raise ValueError(
            f"sft_loss_from_logprobs: expected (N,) log-probs, got {tuple(token_logprobs.shape)}"
        )
    nll = -token_logprobs.float().sum()
    stats = {
        "nll_sum": nll.detach(),
        "tokens": torch.tensor(token_logprobs.numel(), device=token_logprobs.device),
    }
    return nll / normalizer, stats
