"""PPO with four models, the Qwen way: the whole loop in one file.

One iteration:
  1. rollout   the policy samples `samples_per_query` responses for each query (top-p 0.9);
  2. scoring   no-grad passes give the policy's and the reference's log-probs, the value model's
               per-token values, and the reward model's score at the closing <|im_end|>;
  3. rewards   the score is normalised by a running mean; every token is charged -kl_coef * KL and the
               last token gets the score (a response that never closed gets `missing_eos_penalty`);
               GAE turns them into advantages and returns;
  4. update    `ppo_epochs` passes of the clipped policy loss (+ ptx_coef x LM loss on pre-training
               text) and the clipped value loss. During the value warm-up only the value model learns.

The maths is in pure functions (`align.rl_math`, `align.losses`); this file only moves tensors.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import chatml
from align.assets import SFT_DEFAULT_OUTPUT, resolve_model
from align.config import PPOConfig
from align.config_loader import config_to_dict
from align.data import DataError
from align.fused_logprobs import lm_logprobs
from align.losses import ppo_policy_loss, ppo_value_loss, sft_loss_from_logprobs
from align.models import load_causal_lm, save_final_model
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
from align.rollout import RolloutBatch
from align.rollout_engines import engine_class, engine_options
from align.tracking import MetricsLogger, plot_metrics
from align.train.batching import global_batch_indices, total_steps
from align.train.checkpointing import RunCheckpointer, fingerprint_rows
from align.train.optim_step import optimizer_step
from align.train.optimization import build_optimizer, build_scheduler
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir
from align.train.rl_common import (
    PolicyTrainer,
    add_stats,
    load_prompts,
    load_reference,
    load_reward_model,
    log_rl_step,
    micro_slices,
    response_logprobs,
    rl_default_system,
    scatter_rows,
    score_rollouts,
)

# ---------------------------------------------------------------------------------------------------
# Data: prompts (with their gold tasks when generated) and the pre-training stream


# ---------------------------------------------------------------------------------------------------
# Models


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


# ---------------------------------------------------------------------------------------------------
# Forward passes over rollouts. All use the left-padded layout of `RolloutBatch.sequences`: every row's
# response starts at column P, so `logits[:, P-1 : P+R-1]` predict the response tokens.


def response_values(value_model: RewardModel, seq: Any, width: int) -> torch.Tensor:
    """(B, R) value estimates V(s_t), read where the policy predicts response token t."""
    values = value_model(seq.input_ids, seq.attention_mask, return_all=True).values
    return values[:, -width - 1 : -1]


# ---------------------------------------------------------------------------------------------------
# The loop


def run_ppo(cfg: PPOConfig, *, stop_after_step: int | None = None, reward_fn: Any = None) -> dict[str, Any]:
    """Run PPO per `cfg`; return the summary (also written to summary.json).

    `reward_fn(batch, texts) -> (B,) scores` replaces the reward model (rule-based rewards, tests);
    `stop_after_step` ends the run after that iteration's checkpoint, as a kill would.
    """
    if reward_fn is None:
        ensure_embedded_inputs(cfg)
    accelerator = make_accelerator(cfg)
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=is_main, stage="ppo")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    if cfg.batch_size % world:
        raise RunSetupError(f"batch_size={cfg.batch_size} queries cannot be split over {world} processes")
    queries_per_process = cfg.batch_size // world
    rows_per_process = queries_per_process * cfg.samples_per_query
    if rows_per_process % cfg.num_mini_batches:
        raise RunSetupError(
            f"{rows_per_process} responses per process do not split into num_mini_batches={cfg.num_mini_batches}"
        )

    # Four models. Dropout is off in the trained ones, so the first PPO epoch sees ratio 1 exactly
    # (PPOConfig has no dropout key: load_causal_lm turns dropout off for such a config).
    policy, tokenizer = load_causal_lm(cfg)
    # Frozen models only work in the scoring phase; with offload_frozen they wait on the CPU otherwise.
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
    prompt_ids = [chatml.encode_prompt(p, tokenizer, default_system=default_system) for p in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > cfg.max_length]
    if too_long:
        raise DataError(
            f"{len(too_long)} prompts exceed max_length={cfg.max_length} tokens (first: #{too_long[0]})"
        )
    steps_per_epoch, num_steps = total_steps(cfg, len(prompt_ids))

    ptx = None
    if cfg.ptx_coef > 0:
        ptx_rows = chunk_tokens(load_text(cfg.ptx_dataset), tokenizer, cfg.ptx_max_length)
        # Each process draws from its own shard: the same seeded order on every process would train N
        # copies of the same rows and waste N-1 of them.
        ptx = PtxStream(ptx_rows[accelerator.process_index :: world], cfg.ptx_batch_size, seed=cfg.seed)
        accelerator.print(
            f"ptx stream: {len(ptx_rows)} rows of {cfg.ptx_max_length} tokens from {cfg.ptx_dataset}"
        )

    policy_opt = build_optimizer(policy, cfg, lr=cfg.policy_lr or cfg.learning_rate)
    value_opt = build_optimizer(value_model, cfg, lr=cfg.value_lr)
    # The policy only steps after the value warm-up: its schedule spans the iterations it is stepped in.
    policy_sched = build_scheduler(policy_opt, cfg, max(num_steps - cfg.value_warmup_steps, 1))
    value_sched = build_scheduler(value_opt, cfg, num_steps)
    policy, value_model, policy_opt, value_opt = accelerator.prepare(
        policy, value_model, policy_opt, value_opt
    )
    policy_u, value_u = accelerator.unwrap_model(policy), accelerator.unwrap_model(value_model)
    engine_cls = engine_class(cfg.rollout_engine)
    # Our own log-prob pass below uses the training layout, so the engine computes none.
    engine = engine_cls(
        policy_u, tokenizer, batch_size=max(rows_per_process, 1), logprobs="none", **engine_options(cfg)
    )
    _, im_end = chatml.chatml_token_ids(tokenizer)

    moments = RunningMoments()
    fingerprint = fingerprint_rows([{"input_ids": ids} for ids in prompt_ids], keys=("input_ids",))
    checkpointer = RunCheckpointer(accelerator, out, cfg, fingerprint)
    objects = (
        {"policy": policy_u, "value": value_u},
        {"policy": policy_opt, "value": value_opt},
        {"policy": policy_sched, "value": value_sched},
    )
    start_step, saved = checkpointer.restore(*objects)
    counts: dict[str, Any] = {"skipped_nonfinite": (saved or {}).get("skipped_nonfinite", 0)}
    if saved is not None:
        moments.load_state_dict(saved["reward_moments"])
        if ptx is not None and "ptx" in saved:
            ptx.load_state_dict(saved["ptx"])
    logger = MetricsLogger(
        out,
        cfg.report_to,
        enabled=is_main,
        resume_step=start_step if saved else None,
        run_config=config_to_dict(cfg),
    )
    rollout_log = out / "rollouts.jsonl"
    if is_main and saved is None and rollout_log.exists():
        rollout_log.unlink()

    trainer = PolicyTrainer(cfg, accelerator, policy, policy_u, reference, policy_opt, checkpointer, counts)

    bar = tqdm(total=num_steps, initial=start_step, desc="ppo", disable=not (is_main and cfg.progress))
    last: dict[str, Any] = {}
    for step in range(start_step, num_steps):
        warmup = step < cfg.value_warmup_steps
        metrics: dict[str, Any] = {"value_warmup": int(warmup)}
        indices = global_batch_indices(step, len(prompt_ids), cfg.batch_size, cfg.seed)
        local = indices[
            accelerator.process_index * queries_per_process : (accelerator.process_index + 1)
            * queries_per_process
        ]

        # 1. rollout
        t0 = time.perf_counter()
        batch = engine.generate(
            [prompt_ids[i] for i in local],
            n=cfg.samples_per_query,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed * 100_003 + step * world + accelerator.process_index,
        ).to(device)
        t_rollout = time.perf_counter() - t0
        texts = batch.texts(tokenizer)
        mask = batch.response_mask.float()

        # 2. scoring (no grad): old log-probs, reference log-probs, values, RM score, entropy
        t0 = time.perf_counter()
        policy.eval()
        value_model.eval()
        frozen = [m for m in (reference, reward_model) if m is not None]
        for model in frozen:
            model.to(device)
        old_logprobs, ref_logprobs, old_values, entropy = rollout_passes(trainer, value_model, batch)
        raw_scores, closed, readable = score_rollouts(
            batch, texts, reward_model=reward_model, reward_fn=reward_fn,
            micro_batch_size=cfg.micro_batch_size, autocast=accelerator.autocast,
        )  # fmt: skip
        for model in frozen:
            model.to(frozen_home)
        old_logprobs, ref_logprobs, old_values = old_logprobs * mask, ref_logprobs * mask, old_values * mask
        t_score = time.perf_counter() - t0

        # 3. rewards and advantages
        scores = ppo_scores(cfg, moments, raw_scores, closed, readable, accelerator)
        rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            # Statistics of the global batch, so N processes give the advantages of one.
            reduce_sum = (lambda t: accelerator.reduce(t.to(device), reduction="sum")) if world > 1 else None
            advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)

        # 4. update
        t0 = time.perf_counter()
        policy.train()
        value_model.train()
        stats_acc = ppo_update(
            trainer, value_model, value_opt, batch,
            {"old_logprobs": old_logprobs, "old_values": old_values, "advantages": advantages,
             "returns": returns, "mask": mask},
            ptx, warmup, step,
        )  # fmt: skip
        value_sched.step()
        if not warmup:
            policy_sched.step()
        t_train = time.perf_counter() - t0

        # 5. metrics
        metrics.update({k: sum(v) / len(v) for k, v in stats_acc.items()})
        metrics.update(
            {
                "rm_score": raw_scores[closed].mean().item() if closed.any() else float("nan"),
                "closed_frac": closed.float().mean().item(),
                "score_normalised": scores.mean().item(),
                "reward_running_mean": moments.mean,
                "skipped_nonfinite": counts["skipped_nonfinite"],
                "kl": (kl.sum(1)).mean().item(),
                "entropy": masked_mean(entropy, mask).item(),
                "explained_variance": explained_variance(old_values, returns, mask).item(),
                "score_std_within_query": batch.grouped(raw_scores).std(dim=1).mean().item()
                if cfg.samples_per_query > 1
                else 0.0,
            }
        )
        done = step + 1
        log_rl_step(
            cfg, metrics, done, num_steps, logger, batch, texts, raw_scores, (t_rollout, t_score, t_train),
            tasks=tasks, local=local, prompts=prompts, rollout_log=rollout_log, is_main=is_main,
        )  # fmt: skip
        last = metrics
        bar.update(1)
        bar.set_postfix(score=f"{metrics['rm_score']:.3f}", kl=f"{metrics['kl']:.3f}")

        def save(step: int) -> None:
            state = {"reward_moments": moments.state_dict(), **({"ptx": ptx.state_dict()} if ptx else {})}
            checkpointer.save(step, {**state, **counts}, *objects)

        if checkpointer.end_of_step(done, num_steps, save, stop_after_step):
            bar.close()
            logger.close()
            return {"stopped_at": done}
    bar.close()

    summary: dict[str, Any] = {
        "stage": "ppo",
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "metrics": str(out / "metrics.jsonl"),
        "steps": num_steps,
        "last": {k: v for k, v in last.items() if isinstance(v, int | float)},
        "skipped_nonfinite": counts["skipped_nonfinite"],
    }
    accelerator.wait_for_everyone()
    policy_state = accelerator.get_state_dict(policy)
    value_state = accelerator.get_state_dict(value_model)
    if is_main:
        save_final_model(policy_u, tokenizer, out / "final", state_dict=policy_state)
        value_u.save_pretrained(out / "value", tokenizer, state_dict=value_state)
        summary["plot"] = str(
            plot_metrics(
                out, ["rm_score", "gold_score", "kl", "entropy", "value_loss", "ptx_loss"], title="PPO"
            )
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.close()
    accelerator.wait_for_everyone()
    return summary


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
    t: PolicyTrainer,
    value_model: Any,
    value_opt: Any,
    batch: RolloutBatch,
    tensors: dict[str, torch.Tensor],
    ptx: PtxStream | None,
    warmup: bool,
    step: int,
) -> dict[str, list[float]]:
    """The update phase of one PPO iteration: `ppo_epochs` passes of `num_mini_batches` steps, each the
    clipped value loss (value model) and, after the warm-up, the clipped policy loss plus ptx_coef x the LM
    loss on pre-training rows (policy). `tensors`: (B, T) old_logprobs, old_values, advantages, returns and
    mask. Returns the per-micro-batch statistics."""
    cfg, accelerator, policy, device, world = t.cfg, t.accelerator, t.policy, t.device, t.world
    counts, checkpointer = t.counts, t.checkpointer
    old_logprobs, old_values = tensors["old_logprobs"], tensors["old_values"]
    advantages, returns, mask = tensors["advantages"], tensors["returns"], tensors["mask"]
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
                sync_v = nullcontext() if last_micro else accelerator.no_sync(value_model)
                with sync_v, accelerator.autocast():
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
                sync_p = nullcontext() if last_micro else accelerator.no_sync(policy)
                with sync_p, accelerator.autocast():
                    logprobs = response_logprobs(policy, seq, sub.response_ids, cfg.temperature)
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
                policy_norm = t.optimizer_step(step + 1, what="policy gradient")
                add_stats(stats_acc, {"policy_grad_norm": policy_norm})
            add_stats(stats_acc, {"value_grad_norm": value_norm})
    return stats_acc


def rollout_passes(
    t: PolicyTrainer, value_model: Any, batch: RolloutBatch
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
            logps, ent = response_logprobs(t.policy, seq, sub.response_ids, cfg.temperature, True)
            scatter_rows(old_logprobs, rows, logps)
            scatter_rows(entropy, rows, ent)
            scatter_rows(ref_logprobs, rows, t.reference_logprobs(seq, sub.response_ids))
            scatter_rows(old_values, rows, response_values(value_model, seq, w))
    return old_logprobs, ref_logprobs, old_values, entropy
