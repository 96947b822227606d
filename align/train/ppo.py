"""PPO with four models, the Qwen way: the whole loop in one file.

One iteration:
  1. rollout     the policy samples `samples_per_query` responses for each query (top-p 0.9);
  2. score       no-grad passes give the policy's and the reference's log-probs, the value model's
                 per-token values, and the reward model's score at the closing <|im_end|>, through the
                 over-optimisation guards (ensemble -> clip -> anchor; off by default);
  3. advantages  the score is normalised by a running mean; every token is charged -kl_coef * KL and the
                 last token gets the score (a response that never closed gets `missing_eos_penalty`);
                 GAE turns them into advantages and returns;
  4. update      `ppo_epochs` passes of the clipped policy loss (+ ptx_coef x LM loss on pre-training
                 text) and the clipped value loss. During the value warm-up only the value model learns.
                 With kl_target, the adaptive controller then moves kl_coef for the next iteration.

The maths is in pure functions (`align.rl_math`, `align.losses`); the run around the loop (output
directory, engine, resume, logging, summary) is `align.train.rl_run`; this file only moves tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from align.assets import SFT_DEFAULT_OUTPUT, resolve_model
from align.config import PPOConfig
from align.fused_logprobs import lm_logprobs
from align.losses import ppo_policy_loss, ppo_value_loss, sft_loss_from_logprobs
from align.models import load_causal_lm
from align.ptx import PtxStream, chunk_tokens, load_text
from align.reward import RewardModel
from align.rl_math import (
    RunningMoments,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    shape_scores,
    token_rewards,
)
from align.rollout.batch import RolloutBatch
from align.train.batching import total_steps
from align.train.optim_step import optimizer_step
from align.train.optimization import build_optimizer, build_scheduler
from align.train.rl_common import (
    PolicyTrainer,
    RewardGuards,
    adapt_kl,
    add_stats,
    guard_scores,
    load_prompts,
    load_reference,
    load_reward_model,
    micro_slices,
    reference_anchors,
    rl_default_system,
    rollout_logprobs,
    scatter_rows,
    score_members,
)
from align.train.rl_run import PhaseTimer, RLRun, encode_rl_prompts, open_rl_run, start_rl_run
from align.train.run_start import log_memory
from align.train.sharding import grad_sync, shard_model, wants_sharding


def run_ppo(cfg: PPOConfig, *, stop_after_step: int | None = None, reward_fn: Any = None) -> dict[str, Any]:
    """Run PPO per `cfg`; return the summary (also written to summary.json).

    `reward_fn(batch, texts) -> (B,) scores` replaces the reward model (rule-based rewards, tests);
    `stop_after_step` ends the run after that iteration's checkpoint, as a kill would.
    """
    if reward_fn is None:
        ensure_embedded_inputs(cfg)
    run, ppo = setup_ppo(cfg, reward_fn)
    for step in run.steps():
        warmup = step < cfg.value_warmup_steps
        queries, timer = run.local_queries(step), PhaseTimer()
        with timer("rollout"):
            batch = run.rollout(queries, step)
        texts = batch.texts(run.tokenizer)
        with timer("scoring"):
            scored = score_phase(ppo, batch, texts, queries)
        advantages_phase(ppo, scored)
        with timer("training"):
            stats = update_phase(ppo, batch, scored, warmup, step)
        metrics = ppo_metrics(ppo, batch, scored, stats, warmup)
        # The value warm-up leaves the policy at the reference: its KL of 0 says nothing about the coefficient.
        responses = cfg.batch_size * cfg.samples_per_query
        metrics.update(adapt_kl(ppo, None if warmup else metrics["kl"], responses))
        if run.end_step(
            step, metrics, batch, texts, queries, scored.rm_scores, timer, ppo.trainer_state, stop_after_step
        ):
            return {"stopped_at": step + 1}
    return run.finish(
        {
            "steps": run.num_steps,
            "last": run.last_numbers(),
            "skipped_nonfinite": ppo.counts["skipped_nonfinite"],
        },
        ["rm_score", "gold_score", "kl", "entropy", "value_loss", "ptx_loss"],
        "PPO",
        also_save={"value": ppo.value_model},
    )


# ---------------------------------------------------------------------------------------------------
# Set-up


def ensure_embedded_inputs(cfg: PPOConfig) -> None:
    """Train the SFT and RM defaults first when the embedded PPO run needs their outputs."""
    if not cfg.train_missing_stages:
        return
    if cfg.model_name_or_path == str(SFT_DEFAULT_OUTPUT) and not SFT_DEFAULT_OUTPUT.is_dir():
        from align.config import SFTConfig
        from align.train.sft import run_sft

        print("PPO needs the SFT default's output: training it first (recipes/sft.py defaults)...")
        run_sft(SFTConfig())
    if cfg.reward_model_path == "outputs/rm/rm/final" and not Path(cfg.reward_model_path).is_dir():
        from align.config import RMConfig
        from align.train.reward import run_reward

        print("PPO needs the reward model default's output: training it first (recipes/rm.py defaults)...")
        run_reward(RMConfig())


@dataclasses.dataclass
class PPOTrainer(PolicyTrainer):
    """What PPO's phases work on besides the run: the policy side (policy, reference, policy optimiser,
    checkpointer, counters), the value model and its optimiser, both schedules, the scorer (reward model
    or `reward_fn`), the running reward statistics and the pre-training stream."""

    value_model: Any  # as prepared by accelerate, or sharded
    value_opt: Any
    policy_sched: Any
    value_sched: Any
    reward_model: RewardModel | None
    reward_fn: Any
    frozen_home: torch.device  # where the reference and reward model wait outside the score phase
    moments: RunningMoments
    ptx: PtxStream | None

    def trainer_state(self) -> dict[str, Any]:
        """The counters plus what a resumed run needs to shape rewards and draw pre-training rows as the
        uninterrupted one would: the running reward statistics and the ptx stream's position."""
        state = {
            "reward_moments": self.moments.state_dict(),
            **({"ptx": self.ptx.state_dict()} if self.ptx else {}),
            **self.guards.state_dict(),
        }
        return {**state, **self.counts}


def setup_ppo(cfg: PPOConfig, reward_fn: Any) -> tuple[RLRun, PPOTrainer]:
    """Set up: the four models (policy, reference, reward, value), the prompts, the pre-training stream,
    optimisers and schedules, then the run (engine, resume, logger) and the restored PPO state."""
    guards = RewardGuards.from_config(cfg)  # refuses settings that do nothing before any model loads
    accelerator, out = start_rl_run(cfg, "ppo")
    device = accelerator.device
    # Dropout is off in the trained models, so the first PPO epoch sees ratio 1 exactly (PPOConfig has no
    # dropout key: load_causal_lm turns dropout off for such a config).
    policy, tokenizer = load_causal_lm(cfg)
    # Frozen models only work in the score phase; with offload_frozen they wait on the CPU otherwise.
    frozen_home = torch.device("cpu") if cfg.offload_frozen else device
    reference = load_reference(cfg, resolve_model(cfg.model_name_or_path), frozen_home)
    reward_model = load_reward_model(cfg, tokenizer, frozen_home) if reward_fn is None else None
    value_model = RewardModel.from_pretrained(
        cfg.value_model_path or cfg.reward_model_path, dtype=torch.float32, dropout=0.0
    )
    if cfg.gradient_checkpointing:
        value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The system prompt and end token the RM was trained with (reward_config.json), or a refusal.
    default_system = rl_default_system(cfg, reward_model, tokenizer)
    prompts, tasks = load_prompts(cfg)
    prompt_ids = encode_rl_prompts(cfg, prompts, tokenizer, default_system)
    steps = total_steps(cfg, len(prompt_ids))
    ptx = ptx_stream(cfg, tokenizer, accelerator) if cfg.ptx_coef > 0 else None

    shard = wants_sharding(cfg)
    if shard:
        # All four sharded (offload_frozen is refused with sharding): the frozen ones reshard after every
        # forward; the trained ones get their optimisers after, on the shards. Not accelerate's prepare,
        # whose FSDP path takes one model per call.
        for frozen in (reference, reward_model):
            if frozen is not None:
                shard_model(frozen, frozen=True)
        policy, value_model = shard_model(policy.to(device)), shard_model(value_model.to(device))
    policy_opt = build_optimizer(policy, cfg, lr=cfg.policy_lr or cfg.learning_rate)
    value_opt = build_optimizer(value_model, cfg, lr=cfg.value_lr)
    # The policy only steps after the value warm-up: its schedule spans the iterations it is stepped in.
    policy_sched = build_scheduler(policy_opt, cfg, max(steps[1] - cfg.value_warmup_steps, 1))
    value_sched = build_scheduler(value_opt, cfg, steps[1])
    if not shard:
        policy, value_model, policy_opt, value_opt = accelerator.prepare(
            policy, value_model, policy_opt, value_opt
        )
    four = [m for m in (policy, value_model, reference, reward_model) if m is not None]
    micros = -(-(cfg.batch_size // accelerator.num_processes * cfg.samples_per_query) // cfg.num_mini_batches)
    log_memory(
        accelerator, torch.nn.ModuleList(four), cfg, out, accumulation=-(-micros // cfg.micro_batch_size)
    )
    run = open_rl_run(
        cfg, "ppo", accelerator, out, tokenizer, prompts, tasks, prompt_ids, steps, policy,
        modules={"value": accelerator.unwrap_model(value_model)},
        optimizers={"policy": policy_opt, "value": value_opt},
        schedulers={"policy": policy_sched, "value": value_sched},
        postfix={"score": "rm_score", "kl": "kl"},
    )  # fmt: skip
    saved = run.saved or {}
    counts: dict[str, Any] = {"skipped_nonfinite": saved.get("skipped_nonfinite", 0)}
    moments = RunningMoments()
    guards.check_scorer(reward_model)
    if run.saved is not None:
        moments.load_state_dict(saved["reward_moments"])
        if ptx is not None and "ptx" in saved:
            ptx.load_state_dict(saved["ptx"])
        guards.load_state_dict(saved)
    ppo = PPOTrainer(
        cfg, accelerator, policy, run.policy_u, reference, policy_opt, run.checkpointer, counts,
        value_model, value_opt, policy_sched, value_sched, reward_model, reward_fn, frozen_home, moments, ptx,
        guards=guards,
    )  # fmt: skip
    if guards.anchor and guards.anchors is None:  # a fresh run: the policy is still the starting one
        ppo.policy.eval()
        with frozen_on_device(ppo):
            guards.anchors = reference_anchors(run, guards, partial(raw_scores, ppo))
    return run, ppo


def ptx_stream(cfg: PPOConfig, tokenizer: Any, accelerator: Any) -> PtxStream:
    """This process's stream of pre-training rows for the ptx loss."""
    world = accelerator.num_processes
    ptx_rows = chunk_tokens(load_text(cfg.ptx_dataset), tokenizer, cfg.ptx_max_length)
    # Each process draws from its own shard: the same seeded order on every process would train N
    # copies of the same rows and waste N-1 of them.
    ptx = PtxStream(ptx_rows[accelerator.process_index :: world], cfg.ptx_batch_size, seed=cfg.seed)
    accelerator.print(
        f"ptx stream: {len(ptx_rows)} rows of {cfg.ptx_max_length} tokens from {cfg.ptx_dataset}"
    )
    return ptx


# ---------------------------------------------------------------------------------------------------
# The phases of one iteration. Forward passes use the left-padded layout of `RolloutBatch.sequences`:
# every row's response starts at column P, so `logits[:, P-1 : P+R-1]` predict the response tokens.


@dataclasses.dataclass
class PPOTensors:
    """One iteration's tensors over its B responses of at most T tokens: the score phase fills the first
    ten, the advantages phase the last four."""

    mask: torch.Tensor  # (B, T) 1.0 on response tokens
    old_logprobs: torch.Tensor  # (B, T) the policy's, at rollout time
    ref_logprobs: torch.Tensor  # (B, T) the reference's
    old_values: torch.Tensor  # (B, T) the value model's, at rollout time
    entropy: torch.Tensor  # (B, T) the policy's
    raw_scores: torch.Tensor  # (B,) after the guards (the reward model's or reward_fn's when they are off)
    rm_scores: torch.Tensor  # (B,) the reward model's (or reward_fn's); an ensemble's: its heads' mean
    closed: torch.Tensor  # (B,) bool: stopped and readable to the scorer
    readable: torch.Tensor  # (B,) bool: the raw score is a judgement
    guard_stats: dict[str, float]  # what each guard did (`align.rl_math.guarded_scores`)
    scores: torch.Tensor | None = None  # (B,) normalised and shaped
    kl: torch.Tensor | None = None  # (B, T) the per-token KL charged in the rewards
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)


@contextmanager
def frozen_on_device(ppo: PPOTrainer) -> Iterator[None]:
    """The frozen models (reference, reward model) on the device inside the block, at home after it."""
    # Moved only when they live elsewhere (offload_frozen); sharded models are never moved.
    home = ppo.frozen_home
    frozen = [m for m in (ppo.reference, ppo.reward_model) if m is not None and home != ppo.device]
    for model in frozen:
        model.to(ppo.device)
    try:
        yield
    finally:
        for model in frozen:
            model.to(ppo.frozen_home)


def raw_scores(
    ppo: PPOTrainer, batch: RolloutBatch, texts: list[str], queries: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scorer's (B, K) scores, closed and readable (`score_members`): what the PAR anchors are made of."""
    return score_members(
        batch, texts, reward_model=ppo.reward_model, reward_fn=ppo.reward_fn,
        micro_batch_size=ppo.cfg.micro_batch_size, autocast=ppo.accelerator.autocast,
    )  # fmt: skip


def score_phase(ppo: PPOTrainer, batch: RolloutBatch, texts: list[str], queries: list[int]) -> PPOTensors:
    """No grad: the (B, T) old and reference log-probs, values and entropy, and the (B,) scores through the
    guards (prompt i of `batch` is query `queries[i]`), with the frozen models brought to the device only
    for this phase."""
    cfg = ppo.cfg
    mask = batch.response_mask.float()
    ppo.policy.eval()
    ppo.value_model.eval()
    with frozen_on_device(ppo):
        old_logprobs, ref_logprobs, old_values, entropy = rollout_passes(ppo, batch)
        s = guard_scores(
            ppo.guards, batch, texts, queries, reward_model=ppo.reward_model, reward_fn=ppo.reward_fn,
            micro_batch_size=cfg.micro_batch_size, autocast=ppo.accelerator.autocast,
        )  # fmt: skip
    masked = (old_logprobs * mask, ref_logprobs * mask, old_values * mask)
    return PPOTensors(mask, *masked, entropy, s.scores, s.rm_scores, s.closed, s.readable, s.stats)


def advantages_phase(ppo: PPOTrainer, tensors: PPOTensors) -> None:
    """Fill in the (B,) shaped scores, the (B, T) per-token KL, advantages (GAE; whitened over the global
    batch) and returns."""
    cfg, accelerator, t = ppo.cfg, ppo.accelerator, tensors
    t.scores = ppo_scores(cfg, ppo.moments, t.raw_scores, t.closed, t.readable, accelerator)
    rewards, t.kl = token_rewards(
        t.scores, t.old_logprobs, t.ref_logprobs, t.mask, ppo.kl_coef, cfg.kl_estimator
    )
    t.advantages, t.returns = gae(rewards, t.old_values, t.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        # Statistics of the global batch, so N processes give the advantages of one.
        world, device = accelerator.num_processes, accelerator.device
        reduce_sum = (lambda x: accelerator.reduce(x.to(device), reduction="sum")) if world > 1 else None
        t.advantages = masked_whiten(t.advantages, t.mask, reduce_sum=reduce_sum)


def update_phase(
    ppo: PPOTrainer, batch: RolloutBatch, tensors: PPOTensors, warmup: bool, step: int
) -> dict[str, list[float]]:
    """`ppo_update` in training mode, then one step of each schedule (the policy's only after the
    warm-up). Returns the per-micro-batch statistics."""
    ppo.policy.train()
    ppo.value_model.train()
    stats = ppo_update(ppo, batch, tensors, warmup, step)
    ppo.value_sched.step()
    if not warmup:
        ppo.policy_sched.step()
    return stats


def ppo_metrics(
    ppo: PPOTrainer, batch: RolloutBatch, t: PPOTensors, stats: dict[str, list[float]], warmup: bool
) -> dict[str, Any]:
    """The iteration's metrics line (before `log_rl_step` adds lengths, timings and the gold score)."""
    metrics: dict[str, Any] = {"value_warmup": int(warmup)}
    metrics.update({k: sum(v) / len(v) for k, v in stats.items()})
    metrics.update(
        {
            "rm_score": t.rm_scores[t.closed].mean().item() if t.closed.any() else float("nan"),
            "closed_frac": t.closed.float().mean().item(),
            "score_normalised": t.scores.mean().item(),
            "reward_running_mean": ppo.moments.mean,
            "skipped_nonfinite": ppo.counts["skipped_nonfinite"],
            "kl": (t.kl.sum(1)).mean().item(),
            "entropy": masked_mean(t.entropy, t.mask).item(),
            "explained_variance": explained_variance(t.old_values, t.returns, t.mask).item(),
            "score_std_within_query": batch.grouped(t.raw_scores).std(dim=1).mean().item()
            if ppo.cfg.samples_per_query > 1
            else 0.0,
            **t.guard_stats,
        }
    )
    return metrics


def response_values(value_model: RewardModel, seq: Any, width: int) -> torch.Tensor:
    """(B, R) value estimates V(s_t), read where the policy predicts response token t."""
    values = value_model(seq.input_ids, seq.attention_mask, return_all=True).values
    return values[:, -width - 1 : -1]


def ptx_lm_loss(policy: Any, rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token-mean language-model loss of the policy on pre-training rows (one padding-free pass)."""
    ids = torch.tensor([sum(rows, [])], device=device)
    positions = torch.tensor([[p for row in rows for p in range(len(row))]], device=device)
    # Each row predicts its own next tokens; the last token of a row predicts nothing.
    keep = torch.ones_like(ids, dtype=torch.bool)
    ends = torch.tensor([len(r) for r in rows], device=device).cumsum(0) - 1
    keep[0, ends] = False
    targets = torch.roll(ids, -1, dims=1)[keep]
    logps = lm_logprobs(
        policy, targets, input_ids=ids, position_ids=positions, logits_to_keep=keep, use_cache=False
    )
    loss, _ = sft_loss_from_logprobs(logps, targets.numel())
    return loss


def ppo_scores(
    cfg: PPOConfig,
    moments: RunningMoments,
    raw: torch.Tensor,
    closed: torch.Tensor,
    readable: torch.Tensor,
    accelerator: Any,
) -> torch.Tensor:
    """(B,) shaped scores of this process's rows: the running statistics see every process's scores that
    are used as they are (closed ones; with no penalty, every readable one) and never an RM's -10
    placeholder; then `shape_scores` normalises and ranks unclosed responses below every closed one."""
    everyone, everyone_closed = accelerator.gather(raw), accelerator.gather(closed)
    everyone_readable = accelerator.gather(readable)
    moments.update(everyone[everyone_closed if cfg.missing_eos_penalty is not None else everyone_readable])
    if cfg.reward_norm == "none":
        mean, std = 0.0, 1.0
    else:
        mean, std = moments.mean, moments.std
    shaped = shape_scores(
        everyone, everyone_closed, mean, std,
        use_std=cfg.reward_norm != "running_mean", missing_eos_penalty=cfg.missing_eos_penalty,
        readable=everyone_readable,
    )  # fmt: skip
    n, rank = len(raw), accelerator.process_index  # equal row counts per process: gather is a concat
    return shaped[rank * n : (rank + 1) * n]


def ppo_update(
    ppo: PPOTrainer, batch: RolloutBatch, tensors: PPOTensors, warmup: bool, step: int
) -> dict[str, list[float]]:
    """The update of one PPO iteration: `ppo_epochs` passes of `num_mini_batches` steps, each the clipped
    value loss (value model) and, after the warm-up, the clipped policy loss plus ptx_coef x the LM loss on
    pre-training rows (policy). Reads the (B, T) old_logprobs, old_values, advantages, returns and mask of
    `tensors`. Returns the per-micro-batch statistics."""
    value_model, value_opt, ptx = ppo.value_model, ppo.value_opt, ppo.ptx
    cfg, accelerator, policy, device, world = ppo.cfg, ppo.accelerator, ppo.policy, ppo.device, ppo.world
    counts, checkpointer = ppo.counts, ppo.checkpointer
    old_logprobs, old_values = tensors.old_logprobs, tensors.old_values
    advantages, returns, mask = tensors.advantages, tensors.returns, tensors.mask
    n_rows = mask.shape[0]
    stats_acc: dict[str, list[float]] = {}
    order_gen = torch.Generator().manual_seed(cfg.seed * 7 + step)
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n_rows, generator=order_gen).tolist()
        size = n_rows // cfg.num_mini_batches
        for mb in range(cfg.num_mini_batches):
            mini = perm[mb * size : (mb + 1) * size]
            tokens = accelerator.reduce(mask[mini].sum(), reduction="sum").clamp(min=1)
            micros = micro_slices(mini, cfg.micro_batch_size)
            ptx_rows = ptx.next_batch() if (ptx is not None and not warmup) else None
            for k, rows in enumerate(micros):
                sub = batch.select(rows)
                seq, w = sub.sequences(left_pad=True), sub.response_ids.shape[1]
                idx = torch.tensor(rows, device=device)
                sub_mask = mask[idx, :w]
                last_micro = k == len(micros) - 1
                # Gradients are all-reduced once per mini-batch, not per micro-batch.
                with grad_sync(accelerator, value_model, last_micro), accelerator.autocast():
                    values = response_values(value_model, seq, w)
                    v_loss, v_stats = ppo_value_loss(
                        values,
                        old_values[idx, :w],
                        returns[idx, :w],
                        sub_mask,
                        cfg.value_clip,
                        tokens / world,
                    )
                    accelerator.backward(v_loss)
                add_stats(
                    stats_acc,
                    {
                        "value_loss": v_loss.item() * tokens.item() / world / max(sub_mask.sum().item(), 1),
                        **v_stats,
                    },
                )
                if warmup:
                    continue  # the policy's weights stay bit-identical during the warm-up
                with grad_sync(accelerator, policy, last_micro), accelerator.autocast():
                    logprobs = rollout_logprobs(policy, sub, cfg.temperature)
                    p_loss, p_stats = ppo_policy_loss(
                        logprobs,
                        old_logprobs[idx, :w],
                        advantages[idx, :w],
                        sub_mask,
                        cfg.clip_eps,
                        tokens / world,
                    )
                    if ptx_rows is not None and last_micro:
                        ptx_loss = ptx_lm_loss(policy, ptx_rows, device)
                        p_stats["ptx_loss"] = ptx_loss.detach()
                        p_loss = p_loss + cfg.ptx_coef * ptx_loss
                    accelerator.backward(p_loss)
                add_stats(stats_acc, p_stats)
            value_norm = optimizer_step(
                accelerator, value_model, value_opt, max_grad_norm=cfg.max_grad_norm, counts=counts,
                checkpointer=checkpointer, step=step + 1, what="value gradient",
            )  # fmt: skip
            if not warmup:
                policy_norm = ppo.optimizer_step(step + 1, what="policy gradient")
                add_stats(stats_acc, {"policy_grad_norm": policy_norm})
            add_stats(stats_acc, {"value_grad_norm": value_norm})
    return stats_acc


def rollout_passes(
    t: PPOTrainer, batch: RolloutBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The no-grad passes of the score phase over a rollout batch, in micro-batches: (B, T) each of the
    policy's log-probs, the reference's log-probs, the value model's values and the policy's entropy."""
    cfg = t.cfg
    n_rows, width = batch.response_ids.shape
    old_logprobs = torch.zeros(n_rows, width, device=t.device)
    ref_logprobs, old_values, entropy = (torch.zeros_like(old_logprobs) for _ in range(3))
    with torch.no_grad(), t.accelerator.autocast():
        for rows in micro_slices(list(range(n_rows)), cfg.micro_batch_size):
            sub = batch.select(rows)
            seq, w = sub.sequences(left_pad=True), sub.response_ids.shape[1]
            logps, ent = rollout_logprobs(t.policy, sub, cfg.temperature, True)
            scatter_rows(old_logprobs, rows, logps)
            scatter_rows(entropy, rows, ent)
            scatter_rows(ref_logprobs, rows, t.reference_logprobs(sub))
            scatter_rows(old_values, rows, response_values(t.value_model, seq, w))
    return old_logprobs, ref_logprobs, old_values, entropy
