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
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import chatml
from align.assets import SFT_DEFAULT_OUTPUT, resolve_model
from align.config import PPOConfig
from align.config_loader import config_to_dict
from align.data import DataError, load_prompt_file
from align.fused_logprobs import lm_logprobs
from align.losses import ppo_policy_loss, ppo_value_loss, sft_loss_from_logprobs
from align.models import load_causal_lm, save_final_model
from align.ptx import PtxStream, chunk_tokens, load_text
from align.reward import RewardModel
from align.rl_math import (
    RunningMoments,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
)
from align.rollout import RolloutBatch, position_ids_from_mask
from align.rollout_engines import engine_class, engine_options
from align.tracking import MetricsLogger, plot_metrics
from align.train.batching import global_batch_indices, total_steps
from align.train.checkpointing import RunCheckpointer, fingerprint_rows
from align.train.optimization import build_optimizer, build_scheduler, step_if_finite
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir

# ---------------------------------------------------------------------------------------------------
# Data: prompts (with their gold tasks when generated) and the pre-training stream


def load_prompts(cfg: PPOConfig) -> tuple[list[list[dict[str, str]]], list[Any] | None]:
    """Prompt conversations (ending with a user turn) and, for embedded data, their verifiable tasks."""
    if cfg.dataset == "embedded":
        from align.tasks import generate_tasks

        tasks = generate_tasks(max(cfg.batch_size * 16, 64), seed=cfg.seed + 1, split="train")
        return [t.messages for t in tasks], tasks
    path = Path(cfg.dataset)
    if not path.is_file():
        raise DataError(f"{cfg.dataset}: no such prompt file")
    return load_prompt_file(path), None  # messages or prompt, optional tools; file:line errors


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


def load_frozen_lm(path: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    return model.eval()


def check_same_vocabulary(tokenizer: Any, path: str) -> None:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise RunSetupError(
            f"{path} uses a different tokenizer from the policy; PPO needs one vocabulary for all four models"
        )


# ---------------------------------------------------------------------------------------------------
# Forward passes over rollouts. All use the left-padded layout of `RolloutBatch.sequences`: every row's
# response starts at column P, so `logits[:, P-1 : P+R-1]` predict the response tokens.


def response_logprobs(
    model: Any, seq: Any, response_ids: torch.Tensor, temperature: float, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of the response tokens (and their entropy) from one forward pass, computed in
    chunks from the last hidden states so the (B, R, V) logits are never built (`align.fused_logprobs`)."""
    return lm_logprobs(
        model,
        response_ids,
        temperature=temperature,
        with_entropy=with_entropy,
        drop_last=True,
        input_ids=seq.input_ids,
        attention_mask=seq.attention_mask,
        position_ids=position_ids_from_mask(seq.attention_mask),
        use_cache=False,
        logits_to_keep=response_ids.shape[1] + 1,
    )


def response_values(value_model: RewardModel, seq: Any, width: int) -> torch.Tensor:
    """(B, R) value estimates V(s_t), read where the policy predicts response token t."""
    values = value_model(seq.input_ids, seq.attention_mask, return_all=True).values
    return values[:, -width - 1 : -1]


def sub_batch(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """Rows of a rollout batch, trimmed to their longest response."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.response_ids.device)
    width = max(int(batch.lengths[index].max()), 1)
    return RolloutBatch(
        prompt_ids=[batch.prompt_ids[i] for i in rows],
        response_ids=batch.response_ids[index, :width],
        response_mask=batch.response_mask[index, :width],
        logprobs=None,
        finished=batch.finished[index],
        prompt_index=batch.prompt_index[index],
        lengths=batch.lengths[index],
        n=1,
        pad_id=batch.pad_id,
        temperature=batch.temperature,
        top_p=batch.top_p,
    )


def scatter_rows(target: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    target[torch.tensor(rows, device=target.device), : values.shape[1]] = values.to(target.dtype)


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
    policy_path = resolve_model(cfg.model_name_or_path)
    frozen_dtype = torch.bfloat16 if cfg.ref_dtype == "bfloat16" else torch.float32
    # Frozen models only work in the scoring phase; with offload_frozen they wait on the CPU otherwise.
    frozen_home = torch.device("cpu") if cfg.offload_frozen else device
    # A LoRA policy's reference is the same weights with the adapter off: no second copy.
    reference = (
        None
        if cfg.use_lora
        else load_frozen_lm(policy_path, frozen_dtype, cfg.trust_remote_code).to(frozen_home)
    )
    reward_model = value_model = None
    if reward_fn is None:
        check_same_vocabulary(tokenizer, cfg.reward_model_path)
        reward_model = RewardModel.from_pretrained(cfg.reward_model_path, dtype=frozen_dtype)
        reward_model.requires_grad_(False)
        reward_model.eval().to(frozen_home)
    value_model = RewardModel.from_pretrained(
        cfg.value_model_path or cfg.reward_model_path, dtype=torch.float32, dropout=0.0
    )
    if cfg.gradient_checkpointing:
        value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    prompts, tasks = load_prompts(cfg)
    prompt_ids = [chatml.encode_prompt(p, tokenizer, default_system=cfg.default_system) for p in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > cfg.max_length]
    if too_long:
        raise DataError(
            f"{len(too_long)} prompts exceed max_length={cfg.max_length} tokens (first: #{too_long[0]})"
        )
    steps_per_epoch, num_steps = total_steps(cfg, len(prompt_ids))

    ptx = None
    if cfg.ptx_coef > 0:
        ptx_rows = chunk_tokens(load_text(cfg.ptx_dataset), tokenizer, cfg.ptx_max_length)
        ptx = PtxStream(ptx_rows, cfg.ptx_batch_size, seed=cfg.seed)
        accelerator.print(
            f"ptx stream: {len(ptx_rows)} rows of {cfg.ptx_max_length} tokens from {cfg.ptx_dataset}"
        )

    policy_opt = build_optimizer(policy, cfg, lr=cfg.policy_lr or cfg.learning_rate)
    value_opt = build_optimizer(value_model, cfg, lr=cfg.value_lr)
    policy_sched = build_scheduler(policy_opt, cfg, num_steps)
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

    def reference_logprobs(seq: Any, response_ids: torch.Tensor) -> torch.Tensor:
        if reference is not None:
            return response_logprobs(reference, seq, response_ids, cfg.temperature)
        with policy_u.disable_adapter():
            return response_logprobs(policy_u, seq, response_ids, cfg.temperature)

    def micro_slices(rows: list[int]) -> list[list[int]]:
        return [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]

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
        n_rows, width = batch.response_ids.shape
        mask = batch.response_mask.float()

        # 2. scoring (no grad): old log-probs, reference log-probs, values, RM score, entropy
        t0 = time.perf_counter()
        old_logprobs = torch.zeros(n_rows, width, device=device)
        ref_logprobs = torch.zeros_like(old_logprobs)
        old_values = torch.zeros_like(old_logprobs)
        entropy = torch.zeros_like(old_logprobs)
        raw_scores = torch.zeros(n_rows, device=device)
        all_rows = list(range(n_rows))
        policy.eval()
        value_model.eval()
        frozen = [m for m in (reference, reward_model) if m is not None]
        for model in frozen:
            model.to(device)
        with torch.no_grad(), accelerator.autocast():
            for rows in micro_slices(all_rows):
                sub = sub_batch(batch, rows)
                seq, w = sub.sequences(left_pad=True), sub.response_ids.shape[1]
                logps, ent = response_logprobs(policy, seq, sub.response_ids, cfg.temperature, True)
                scatter_rows(old_logprobs, rows, logps)
                scatter_rows(entropy, rows, ent)
                scatter_rows(ref_logprobs, rows, reference_logprobs(seq, sub.response_ids))
                scatter_rows(old_values, rows, response_values(value_model, seq, w))
                if reward_model is not None:
                    scored = reward_model(seq.input_ids, seq.attention_mask)
                    raw_scores[torch.tensor(rows, device=device)] = scored.rewards.float()
        for model in frozen:
            model.to(frozen_home)
        if reward_fn is not None:
            raw_scores = torch.as_tensor(reward_fn(batch, texts), dtype=torch.float32, device=device)
        old_logprobs, ref_logprobs, old_values = old_logprobs * mask, ref_logprobs * mask, old_values * mask
        t_score = time.perf_counter() - t0

        # 3. rewards and advantages
        finished = batch.finished
        # Every process's scores feed the running mean (equal row counts, so gather needs no padding).
        everyone_scores, everyone_finished = accelerator.gather(raw_scores), accelerator.gather(finished)
        # Unclosed responses get a fixed penalty, so they stay out of the statistics of real scores.
        moments.update(
            everyone_scores[everyone_finished] if cfg.missing_eos_penalty is not None else everyone_scores
        )
        if cfg.reward_norm == "none":
            scores = raw_scores.clone()
        else:
            scores = moments.normalise(raw_scores, use_std=cfg.reward_norm == "running_mean_std")
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        rewards = -cfg.kl_coef * kl
        last_token = (batch.lengths - 1).clamp(min=0)
        rewards[torch.arange(n_rows, device=device), last_token] += scores * (batch.lengths > 0)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            # Statistics of the global batch, so N processes give the advantages of one.
            reduce_sum = (lambda t: accelerator.reduce(t.to(device), reduction="sum")) if world > 1 else None
            advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)

        # 4. update
        t0 = time.perf_counter()
        policy.train()
        value_model.train()
        stats_acc: dict[str, list[float]] = {}
        order_gen = torch.Generator().manual_seed(cfg.seed * 7 + step)
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n_rows, generator=order_gen).tolist()
            size = n_rows // cfg.num_mini_batches
            for mb in range(cfg.num_mini_batches):
                mini = perm[mb * size : (mb + 1) * size]
                tokens = accelerator.reduce(mask[mini].sum(), reduction="sum").clamp(min=1)
                micros = micro_slices(mini)
                ptx_rows = ptx.next_batch() if (ptx is not None and not warmup) else None
                for k, rows in enumerate(micros):
                    sub = sub_batch(batch, rows)
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
                    _add(
                        stats_acc,
                        {
                            "value_loss": v_loss.item()
                            * tokens.item()
                            / world
                            / max(sub_mask.sum().item(), 1),
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
                    _add(stats_acc, p_stats)
                value_norm = accelerator.clip_grad_norm_(value_model.parameters(), _clip(cfg))
                step_if_finite(value_opt, value_norm, counts, checkpointer, step + 1)
                if not warmup:
                    policy_norm = accelerator.clip_grad_norm_(policy.parameters(), _clip(cfg))
                    step_if_finite(policy_opt, policy_norm, counts, checkpointer, step + 1)
                    _add(stats_acc, {"policy_grad_norm": policy_norm})
                _add(stats_acc, {"value_grad_norm": value_norm})
        value_sched.step()
        if not warmup:
            policy_sched.step()
        t_train = time.perf_counter() - t0

        # 5. metrics
        metrics.update({k: sum(v) / len(v) for k, v in stats_acc.items()})
        metrics.update(
            {
                "rm_score": raw_scores[finished].mean().item() if finished.any() else float("nan"),
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


def gold_score(tasks: list[Any], local: list[int], batch: RolloutBatch, texts: list[str]) -> float:
    """Share of responses that the gold verifier accepts (generated prompts only)."""
    from align.tasks import verify

    prompt_rows = batch.prompt_index.tolist()
    return sum(verify(tasks[local[p]], text) for p, text in zip(prompt_rows, texts, strict=True)) / len(texts)


def log_rl_step(
    cfg: Any,
    metrics: dict[str, Any],
    done: int,
    total: int,
    logger: Any,
    batch: RolloutBatch,
    texts: list[str],
    scores: torch.Tensor,
    timings: tuple[float, float, float],
    *,
    tasks: list[Any] | None,
    local: list[int],
    prompts: list[list[dict[str, str]]],
    rollout_log: Path,
    is_main: bool,
) -> None:
    """The end of an iteration of PPO or an online loop: response length, unclosed share and timings
    (rollout, scoring, training) added to `metrics`, the gold verifier's score on generated prompts, the
    metrics line every `logging_steps`, and the first `log_rollouts` responses to rollouts.jsonl."""
    t_rollout, t_score, t_train = timings
    lengths = batch.lengths.float()
    metrics.update(
        {
            "response_length": lengths.mean().item(),
            "no_eos_frac": 1.0 - batch.finished.float().mean().item(),
            "time_rollout": t_rollout,
            "time_scoring": t_score,
            "time_training": t_train,
            "response_tokens_per_s": lengths.sum().item() / max(t_rollout, 1e-9),
        }
    )
    if tasks is not None:
        metrics["gold_score"] = gold_score(tasks, local, batch, texts)
    if done % cfg.logging_steps == 0 or done == total:
        logger.log(metrics, step=done)
    if is_main and cfg.log_rollouts > 0:
        append_rollouts(rollout_log, done, batch, texts, local, prompts, scores, cfg.log_rollouts)


def append_rollouts(
    path: Path,
    step: int,
    batch: RolloutBatch,
    texts: list[str],
    local: list[int],
    prompts: list[list[dict[str, str]]],
    scores: torch.Tensor,
    limit: int,
) -> None:
    """Write the first `limit` responses of this step, with their scores, to rollouts.jsonl."""
    with path.open("a") as fh:
        for row in range(min(limit, len(texts))):
            query = local[int(batch.prompt_index[row])]
            record = {
                "step": step,
                "query": query,
                "prompt": prompts[query][-1]["content"],
                "response": texts[row],
                "score": scores[row].item(),
                "finished": bool(batch.finished[row]),
            }
            fh.write(json.dumps(record) + "\n")


def _clip(cfg: PPOConfig) -> float:
    return cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf


def _add(acc: dict[str, list[float]], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        acc.setdefault(key, []).append(float(value))
