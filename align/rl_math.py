"""Pure tensor maths of the RL stages: log-probs, masked statistics, KL estimators, GAE, running moments.

Torch only, no model code. Shapes: B = rows (responses), T = response tokens; masks are 1 on real
response tokens (the stop token included) and 0 on padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature).

    Args:
        logits: (..., V), the logits that predict `tokens` (already shifted by the caller).
        tokens: (...) token ids.
    Returns:
        (...) fp32 log-probabilities. Uses logsumexp rather than a full log_softmax, so only one
        (..., V) temporary is made.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...), fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`). Empty -> 0, not NaN."""
    mask = mask.to(values.dtype)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) float64 [count, sum, sum of squares] of the masked entries of (B, T) `values`: what
    processes all-reduce (sum) to get the mean and variance of the whole global batch."""
    mask = mask.to(torch.float64)
    v = values.detach().to(torch.float64) * mask
    return torch.stack([mask.sum(), v.sum(), (v * v).sum()])


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(values - mean) / std over masked entries; padding positions come back as 0.

    Args:
        values, mask: (B, T).
        shift_mean: False keeps the mean (rescale only), as some PPO variants do for rewards.
        reduce_sum: with data parallelism, the all-reduce (sum) of a (3,) tensor across processes; the
            statistics are then those of every process's entries (`masked_moments`), not of this
            process's share, so the advantages are the same as with one process. None: local.
    """
    mask = mask.to(values.dtype)
    if reduce_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        n, total, squares = reduce_sum(masked_moments(values, mask)).tolist()
        mean_f = total / max(n, 1.0)
        var_f = max(squares / max(n, 1.0) - mean_f * mean_f, 0.0)
        if n > 1:
            var_f *= n / (n - 1)  # Bessel, as masked_var
        mean = torch.tensor(mean_f, dtype=values.dtype, device=values.device)
        var = torch.tensor(var_f, dtype=values.dtype, device=values.device)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators).

    With r = pi_ref(x) / pi(x) and log r = ref_logprobs - logprobs:
        k1 = -log r                 unbiased, can be negative per token
        k2 = (log r)^2 / 2          biased, low variance
        k3 = (r - 1) - log r        unbiased, always >= 0
    Shapes: (B, T) in, (B, T) out.
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    Args:
        rewards: (B, T) per-token rewards (KL penalty at every token, the score at the last).
        values: (B, T) value estimates V(s_t) at each response token.
        mask: (B, T) 1 on response tokens; responses are right-padded, so a row's tokens are a prefix.
        gamma, lam: discount and GAE lambda.
    Returns:
        advantages (B, T) and returns = advantages + values (B, T), both 0 on padding. The value
        after a row's last token is 0 (the episode ends there).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding positions carry 0 forward, so each row's recursion starts at its own last token.
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) over masked entries (1 = perfect, 0 = a constant)."""
    var_target = masked_var(target, mask)
    return 1.0 - masked_var(target - predicted, mask) / var_target.clamp(min=1e-8)


class RunningMoments:
    """Running mean and std of a stream of scalars (Chan et al. parallel update), checkpointable.

    Qwen normalises the reward-model score by a running mean; `update` takes each batch of raw
    scores and `normalise` maps raw scores to (score - mean) [/ std].
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0  # population variance of everything seen
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_var = values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        new_mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = new_mean, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def normalise(self, values: torch.Tensor, use_std: bool = False) -> torch.Tensor:
        out = values - self.mean
        return out / max(self.std, 1e-6) if use_std else out

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward relative to the other samples of its query.

    Args:
        rewards: (Q, G), G sampled responses for each of Q queries.
        scale: divide by the group's (Bessel-corrected) std, as GRPO does; False centres only (Dr. GRPO).
        eps: added to the std, so a group whose rewards are all equal gets advantages 0, not NaN.
    Returns:
        (Q, G) fp32: (r - mean_group) [/ (std_group + eps)].
    """
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centred / (std + eps)


def variance_order(rewards: torch.Tensor) -> list[int]:
    """The Qwen2.5 GRPO curriculum: query indices sorted by their reward variance, largest first.

    Args:
        rewards: (Q, G) scores of G sampled responses per query (the scoring pass).
    Returns:
        a permutation of range(Q); equal variances keep their original order (a stable sort).
    """
    var = (
        rewards.float().var(dim=1, unbiased=False)
        if rewards.shape[1] > 1
        else rewards.new_zeros(len(rewards))
    )
    return sorted(range(len(var)), key=lambda i: -float(var[i]))


def best_worst_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Online DPO's pairs: in each group of samples, the best-scored against the worst-scored.

    Args:
        rewards: (Q, k) scores of k sampled responses per query.
    Returns:
        chosen (P,), rejected (P,): flat row indices (q * k + j) of the best and worst response of every
        query whose scores are not all equal; queries (P,): their query indices; ties: how many queries
        were skipped because every response scored the same (no preference to learn). Among equal
        maxima (minima) the first sample is taken.
    """
    q, k = rewards.shape
    best = rewards.argmax(dim=1)  # first index of the maximum
    worst = rewards.argmin(dim=1)
    keep = rewards.max(dim=1).values > rewards.min(dim=1).values
    queries = torch.nonzero(keep).flatten()
    base = queries * k
    return base + best[queries], base + worst[queries], queries, int(q - queries.numel())


# ---------------------------------------------------------------------------------------------------
# Reward shaping: what the RL loops turn a reward-model score into. One place, so PPO, online DPO and
# GRPO treat a response that never closed (or that the RM could not read) the same way.


def closed_responses(finished: torch.Tensor, found: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the response stopped AND its score is real.

    Args:
        finished: (B,) bool, the response emitted a stop token (the rollout engine's flag).
        found: (B,) bool, the reward model found its end token at the end of the sequence (None: a
            rule-based reward, which reads any text). A response can stop on another stop id (the
            tokenizer's eos) and be `finished` yet unreadable to an RM that pools at <|im_end|>; its
            score is then the RM's placeholder (`unclosed_reward`, -10), not a judgement.
    """
    closed = finished.bool()
    return closed if found is None else closed & found.bool()


def shape_scores(
    raw: torch.Tensor,
    closed: torch.Tensor,
    mean: float,
    std: float,
    *,
    use_std: bool,
    missing_eos_penalty: float | None,
    readable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised sequence scores, with unclosed responses ranked below every closed one.

    Args:
        raw: (B,) raw scores (RM outputs or rule-based rewards).
        closed: (B,) bool, from `closed_responses`; False rows' raw scores are ignored.
        mean, std: the running statistics of closed responses' raw scores (`RunningMoments`).
        use_std: divide by std (running_mean_std) or only centre (running_mean).
        missing_eos_penalty: how far, in units of the RM's spread (std), an unclosed response scores
            below the worst closed response of this batch (and below the running mean). The old rule gave
            unclosed rows `penalty` on centred but unscaled scores, so with an RM spread above 1 a
            closed bad answer (say -3) scored below an unclosed one (-1): rambling paid. None: no
            penalty: an unclosed row keeps its own normalised score where the scorer could read it
            (`readable`; a rule-based reward reads any text) and scores the running mean (0: no signal)
            where it could not (an RM's placeholder is not a judgement).
        readable: (B,) bool, the scorer's verdict is real (RM: its end token was found); None: all rows.
    Returns:
        (B,) fp32 scores: (raw - mean) [/ std] where closed; min(0, worst closed) - |penalty| x scale
        where not, scale = 1 with use_std else std.
    """
    raw = raw.float()
    closed = closed.bool()
    scale = max(std, 1e-6)
    normalised = (raw - mean) / scale if use_std else raw - mean
    if missing_eos_penalty is None:
        ok = torch.ones_like(closed) if readable is None else readable.bool()
        unclosed = torch.where(ok, normalised, torch.zeros_like(normalised))
    else:
        worst = normalised[closed].min().clamp(max=0.0) if closed.any() else normalised.new_zeros(())
        unit = 1.0 if use_std else scale
        unclosed = (worst - abs(missing_eos_penalty) * unit).expand_as(normalised)
    return torch.where(closed, normalised, unclosed)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: Literal["k1", "k2", "k3"] = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token reward: -kl_coef x KL at every response token, plus the sequence score at its last.

    Args:
        scores: (B,) shaped sequence scores (`shape_scores`).
        logprobs, ref_logprobs: (B, T) policy and reference log-probs of the sampled tokens.
        mask: (B, T) 1 on response tokens (a prefix of each row; the stop token included).
    Returns:
        rewards (B, T) and kl (B, T), both 0 on padding. A row with no response token gets nothing.
    """
    mask = mask.float()
    kl = kl_estimate(logprobs, ref_logprobs, kind) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(1).long()
    rows = torch.arange(len(scores), device=scores.device)
    last = (lengths - 1).clamp(min=0)
    rewards[rows, last] += scores.float() * (lengths > 0)
    return rewards, kl


def grpo_kl_term(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    n_tokens: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's KL term: kl_coef x the k3 KL to the reference, summed over tokens and divided by `n_tokens`
    (the token count of the whole mini-batch, so micro-batches and processes add up to one token mean).

    Args:
        logprobs: (B, T) policy log-probs (with grad); ref_logprobs: (B, T); mask: (B, T).
    Returns:
        loss () and kl (B, T) detached (0 on padding). k3 is >= 0 and its gradient pulls logprobs
        towards the reference wherever the policy moved (pi/pi_ref - 1 > 0 side gets pushed down).
    """
    mask = mask.float()
    kl = kl_estimate(logprobs, ref_logprobs, "k3") * mask
    return kl_coef * kl.sum() / n_tokens, kl.detach()


def group_scores(raw: torch.Tensor, closed: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """Online loops' scores before grouping: an unclosed (or unreadable) response scores
    `min(worst closed score of the batch, 0) - |penalty|` (in raw units; online methods compare within a
    group, so no running statistics), None: its raw score (for an RM: its `unclosed_reward`).

    Shapes: (B,), (B,) bool -> (B,) fp32.
    """
    raw = raw.float()
    if missing_eos_penalty is None:
        return raw
    closed = closed.bool()
    worst = raw[closed].min().clamp(max=0.0) if closed.any() else raw.new_zeros(())
    return torch.where(closed, raw, (worst - abs(missing_eos_penalty)).expand_as(raw))


# ---------------------------------------------------------------------------------------------------
# Over-optimisation guards (../shared/research/rm_overopt.md): each bounds what a learned reward model's
# errors can be worth to the policy. Off by default; the stages reach them through their configs.


def reference_anchored_reward(scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """PAR (Fu et al. 2025): sigmoid(score - score of a reference answer to the same prompt).

    Bounded in (0, 1), 0.5 for an answer the RM rates like the reference; removes per-prompt offsets of the
    RM and caps what an outlier score can earn (an exploited 2.7 against a reference at 1.2 gives 0.82).

    Shapes: scores (B,), reference_scores (B,) (each row's prompt's reference score, or (B, K) for K
    references, averaged over K as in the paper) -> (B,) fp32.
    """
    scores = scores.float()
    ref = reference_scores.float()
    if ref.ndim == 2:
        return torch.sigmoid(scores[:, None] - ref).mean(dim=1)
    return torch.sigmoid(scores - ref)


def clip_rewards(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Scores clamped to [-limit, limit] (DeepSpeed-Chat clamps RM scores at 5, OpenRLHF at 10); None: as is.

    Shapes: (B,) -> (B,) fp32."""
    scores = scores.float()
    if limit is None:
        return scores
    if limit <= 0:
        raise ValueError(f"reward clip limit must be positive, got {limit}")
    return scores.clamp(-limit, limit)


def ensemble_reward(
    member_scores: torch.Tensor, objective: Literal["mean", "min", "uncertainty"], penalty: float = 0.0
) -> torch.Tensor:
    """One score per response from K reward heads (Coste et al. 2024): ``mean``; ``min`` (worst-case, WCO);
    ``uncertainty`` (UWO): mean - `penalty` x the members' standard deviation (population, over K).

    Shapes: member_scores (B, K) -> (B,) fp32."""
    scores = member_scores.float()
    if scores.ndim != 2:
        raise ValueError(f"member_scores must be (B, K), got shape {tuple(scores.shape)}")
    if objective == "mean":
        return scores.mean(dim=1)
    if objective == "min":
        return scores.min(dim=1).values
    if objective == "uncertainty":
        return scores.mean(dim=1) - penalty * scores.std(dim=1, unbiased=False)
    raise ValueError(f"unknown ensemble objective {objective!r}; one of mean, min, uncertainty")


class AdaptiveKLController:
    """The KL coefficient steered towards a target KL per response (Ziegler et al. 2019, as in TRL's
    ``adap_kl_ctrl``): after each iteration, coef *= 1 + clip(kl / target - 1, -0.2, 0.2) x steps / horizon.

    The proportional error is clipped so one noisy iteration moves the coefficient by at most 20% of
    ``steps / horizon``. Checkpointable (`state_dict`)."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target KL and horizon must be positive, got {target} and {horizon}")
        self.coef, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, kl: float, steps: int) -> float:
        """Move the coefficient after `steps` responses (or iterations) at mean KL `kl`; returns it."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


def ensemble_and_clip(
    member_scores: torch.Tensor,
    objective: Literal["mean", "min", "uncertainty"],
    penalty: float,
    clip: float | None,
) -> torch.Tensor:
    """The first two guards, which also turn a reference answer's scores into its PAR anchor: the K heads'
    `ensemble_reward`, then `clip_rewards`. Shapes: (B, K) (K = 1 for one score) -> (B,) fp32."""
    return clip_rewards(ensemble_reward(member_scores, objective, penalty), clip)


def guarded_scores(
    member_scores: torch.Tensor,
    readable: torch.Tensor,
    *,
    objective: Literal["mean", "min", "uncertainty"] = "mean",
    penalty: float = 0.0,
    clip: float | None = None,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The score phase's guards, in order: ensemble -> clip -> anchor (PAR). The stage's own shaping
    (`shape_scores`, `group_scores`) comes after.

    Args:
        member_scores: (B, K) scores of K reward heads (K = 1: one score per response).
        readable: (B,) bool, the score is a judgement; unreadable rows (an RM's placeholder) pass through
            as their members' mean, untouched by any guard and left out of the statistics.
        objective, penalty: `ensemble_reward`'s; clip: `clip_rewards`' limit (None: off).
        reference: (B,) each row's prompt's reference score, already ensembled and clipped
            (`ensemble_and_clip`); None: no anchoring.
    Returns:
        (B,) fp32 guarded scores and what each guard did, over readable rows: ``reward_clipped_frac`` (the
        share clipped; with clip), ``rm_ensemble_std`` (the heads' mean population std; K > 1),
        ``reward_anchor_mean`` and ``reward_reference_mean`` (the anchored scores' and the anchors' means;
        with reference).
    """
    members = member_scores.float()
    readable = readable.bool()
    placeholder = members.mean(dim=1)
    base = ensemble_reward(members, objective, penalty)
    clipped = clip_rewards(base, clip)
    guarded = reference_anchored_reward(clipped, reference) if reference is not None else clipped
    stats: dict[str, float] = {}
    n = int(readable.sum())

    def readable_mean(values: torch.Tensor) -> float:
        return values[readable].float().mean().item() if n else float("nan")

    if clip is not None:
        stats["reward_clipped_frac"] = (clipped != base)[readable].float().sum().item() / max(n, 1)
    if members.shape[1] > 1:
        stats["rm_ensemble_std"] = readable_mean(members.std(dim=1, unbiased=False))
    if reference is not None:
        stats["reward_anchor_mean"] = readable_mean(guarded)
        stats["reward_reference_mean"] = readable_mean(reference)
    return torch.where(readable, guarded, placeholder), stats
