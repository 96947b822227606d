"""Online preference learning: online DPO (Qwen2) and GRPO (Qwen2.5), on one loop skeleton.

One iteration, both methods:
  1. rollout   the current policy samples `samples_per_query` responses per query (the rollout engine);
  2. scoring   the reward model scores each response at its closing <|im_end|> (or the gold verifier of
               the embedded tasks, or a caller's `reward_fn` for rule-based rewards);
  3. update    online DPO: in every query's group the best and the worst response form a DPO pair
               (groups whose scores all tie are skipped and counted), and one DPO step is taken against
               the initial policy as reference.
               GRPO: advantages are the rewards normalised within each query's group, the token-level
               clipped objective of PPO is applied (`ppo_policy_loss`), plus kl_coef x the k3 KL to the
               reference. Before training, a scoring pass samples every query once and the queries with
               the larger reward variance are trained first (the Qwen2.5 ordering; switchable).

The maths lives in pure functions (`align.rl_math.best_worst_pairs`, `group_advantages`,
`variance_order`, `kl_estimate`; `align.losses.dpo_loss`, `ppo_policy_loss`); this file moves tensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import chatml
from align.assets import resolve_model, start_model
from align.config import GRPOConfig, OnlineConfig, OnlineDPOConfig
from align.config_loader import config_to_dict
from align.data import DataError
from align.losses import dpo_loss, ppo_policy_loss
from align.models import load_causal_lm, save_final_model
from align.rl_math import (
    best_worst_pairs,
    group_advantages,
    group_scores,
    kl_estimate,
    masked_mean,
    variance_order,
)
from align.rollout import RolloutBatch
from align.rollout_engines import engine_class, engine_options
from align.tracking import MetricsLogger, plot_metrics
from align.train.batching import global_batch_indices, total_steps
from align.train.checkpointing import RunCheckpointer, fingerprint_rows
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
from align.train.sft import record_accuracy_after, record_accuracy_before

Method = Literal["online_dpo", "grpo"]


def run_online_dpo(cfg: OnlineDPOConfig, **kw: Any) -> dict[str, Any]:
    """Online DPO per `cfg`; see `run_online` for the keyword arguments."""
    return run_online(cfg, "online_dpo", **kw)


def run_grpo(cfg: GRPOConfig, **kw: Any) -> dict[str, Any]:
    """GRPO per `cfg`; see `run_online` for the keyword arguments."""
    return run_online(cfg, "grpo", **kw)


def load_online_prompts(cfg: OnlineConfig) -> tuple[list[list[dict[str, str]]], list[Any] | None]:
    """Prompt conversations and, for embedded data, their verifiable tasks."""
    if cfg.dataset == "embedded":
        from align.tasks import generate_tasks

        tasks = generate_tasks(cfg.embedded_prompts, seed=cfg.seed + 1, split="train")
        return [t.messages for t in tasks], tasks
    return load_prompts(cfg)  # the PPO prompt reader: JSONL of {messages} or {prompt}


def verifier_reward(tasks: list[Any], queries: list[int]) -> Any:
    """A rule-based reward_fn: 1.0 where the gold verifier accepts the response to `queries[prompt]`."""
    from align.tasks import verify

    def reward(batch: RolloutBatch, texts: list[str]) -> list[float]:
        rows = batch.prompt_index.tolist()
        return [float(verify(tasks[queries[int(p)]], t)) for p, t in zip(rows, texts, strict=True)]

    return reward


def reward_source(cfg: OnlineConfig, reward_fn: Any, tasks: list[Any] | None) -> str:
    """`reward_fn`, `model` or `verifier`, per cfg.reward (auto: the RM when its directory exists)."""
    if reward_fn is not None:
        return "reward_fn"
    kind = cfg.reward
    if kind == "auto":
        kind = "model" if Path(cfg.reward_model_path).is_dir() else "verifier"
    if kind == "verifier" and tasks is None:
        raise RunSetupError(
            "reward=verifier needs the embedded prompts (a gold answer per task); use reward=model"
        )
    return kind


def run_online(
    cfg: OnlineConfig, method: Method, *, reward_fn: Any = None, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Run online DPO or GRPO per `cfg`; return the summary (also written to summary.json).

    `reward_fn(batch, texts) -> (B,) scores` replaces the reward model (rule-based rewards, tests);
    `stop_after_step` ends the run after that iteration's checkpoint, as a kill would.
    """
    if method not in ("online_dpo", "grpo"):
        raise ValueError(f"unknown online method {method!r}")
    t_start = time.perf_counter()
    grpo = method == "grpo"
    accelerator = make_accelerator(cfg)
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=is_main, stage=method)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    if cfg.batch_size % world:
        raise RunSetupError(f"batch_size={cfg.batch_size} queries cannot be split over {world} processes")
    if cfg.samples_per_query < 2:
        raise RunSetupError(
            f"samples_per_query={cfg.samples_per_query}: {method} compares samples, use 2 or more"
        )
    queries_per_process = cfg.batch_size // world
    rows_per_process = queries_per_process * cfg.samples_per_query
    if grpo and rows_per_process % cfg.num_mini_batches:
        raise RunSetupError(
            f"{rows_per_process} responses per process do not split into num_mini_batches={cfg.num_mini_batches}"
        )

    # Models. Dropout off (the config has no dropout key): the scored log-probs must be those the update
    # recomputes.
    start_name = start_model(cfg.model_name_or_path)
    policy, tokenizer = load_causal_lm(dataclasses.replace(cfg, model_name_or_path=start_name))
    needs_reference = not grpo or cfg.kl_coef > 0
    reference = load_reference(cfg, resolve_model(start_name), device) if needs_reference else None
    prompts, tasks = load_online_prompts(cfg)
    source = reward_source(cfg, reward_fn, tasks)
    reward_model = load_reward_model(cfg, tokenizer, device) if source == "model" else None
    accelerator.print(
        f"{method}: policy {start_name}; reward: "
        + {
            "model": f"the reward model at {cfg.reward_model_path}",
            "verifier": "the gold verifier of the embedded tasks (rule-based 0/1; no reward model at "
            f"{cfg.reward_model_path})",
            "reward_fn": "the caller's reward_fn",
        }[source]
    )

    default_system = rl_default_system(cfg, reward_model, tokenizer)
    prompt_ids = [chatml.encode_prompt(p, tokenizer, default_system=default_system) for p in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > cfg.max_length]
    if too_long:
        raise DataError(
            f"{len(too_long)} prompts exceed max_length={cfg.max_length} tokens (first: #{too_long[0]})"
        )
    steps_per_epoch, num_steps = total_steps(cfg, len(prompt_ids))

    optimizer = build_optimizer(policy, cfg)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy_u = accelerator.unwrap_model(policy)
    engine_cls = engine_class(cfg.rollout_engine)
    engine = engine_cls(
        policy_u, tokenizer, batch_size=max(rows_per_process, 1), logprobs="none", **engine_options(cfg)
    )

    fingerprint = fingerprint_rows([{"input_ids": ids} for ids in prompt_ids], keys=("input_ids",))
    checkpointer = RunCheckpointer(accelerator, out, cfg, fingerprint)
    objects = ({"policy": policy_u}, {"policy": optimizer}, {"policy": scheduler})
    start_step, saved = checkpointer.restore(*objects)
    state: dict[str, Any] = dict(saved or {})
    logger = MetricsLogger(
        out,
        cfg.report_to,
        enabled=is_main,
        resume_step=start_step if saved is not None else None,
        run_config=config_to_dict(cfg),
    )
    rollout_log = out / "rollouts.jsonl"
    if is_main and saved is None and rollout_log.exists():
        rollout_log.unlink()
    embedded_eval = tasks is not None and cfg.eval_tasks > 0
    if embedded_eval and is_main:
        record_accuracy_before(state, policy_u, tokenizer, cfg, accelerator.print)

    def score(batch: RolloutBatch, texts: list[str], queries: list[int]) -> torch.Tensor:
        """(B,) scores of a rollout batch whose prompt i is query `queries[i]`; unclosed (or unreadable)
        responses rank below every closed one when missing_eos_penalty is set (`group_scores`)."""
        rule = reward_fn
        if rule is None and reward_model is None:
            rule = verifier_reward(tasks, queries)
        raw, closed, _ = score_rollouts(
            batch, texts, reward_model=reward_model, reward_fn=rule,
            micro_batch_size=cfg.micro_batch_size, autocast=accelerator.autocast,
        )  # fmt: skip
        return group_scores(raw, closed, cfg.missing_eos_penalty)

    def rollout(queries: list[int], seed: int) -> RolloutBatch:
        return engine.generate(
            [prompt_ids[i] for i in queries],
            n=cfg.samples_per_query,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
        ).to(device)

    def sample_scores(queries: list[int], seed: int) -> torch.Tensor:
        batch = rollout(queries, seed=seed)
        return batch.grouped(score(batch, batch.texts(tokenizer), queries)).cpu()

    order, t_order = None, 0.0
    if grpo and cfg.variance_order:
        policy.eval()
        order, t_order = variance_pass(cfg, out, accelerator, len(prompt_ids), sample_scores)

    def batch_indices(step: int) -> list[int]:
        if order is None:
            return global_batch_indices(step, len(prompt_ids), cfg.batch_size, cfg.seed)
        k = step % steps_per_epoch
        return order[k * cfg.batch_size : (k + 1) * cfg.batch_size]

    trainer = PolicyTrainer(cfg, accelerator, policy, policy_u, reference, optimizer, checkpointer, state)

    bar = tqdm(total=num_steps, initial=start_step, desc=method, disable=not (is_main and cfg.progress))
    last: dict[str, Any] = {}
    for step in range(start_step, num_steps):
        indices = batch_indices(step)
        local = indices[
            accelerator.process_index * queries_per_process : (accelerator.process_index + 1)
            * queries_per_process
        ]

        # 1. rollout
        t0 = time.perf_counter()
        policy.eval()
        batch = rollout(local, seed=cfg.seed * 100_003 + step * world + accelerator.process_index)
        t_rollout = time.perf_counter() - t0
        texts = batch.texts(tokenizer)

        # 2. scoring
        t0 = time.perf_counter()
        scores = score(batch, texts, local)
        grouped = batch.grouped(scores)
        t_score = time.perf_counter() - t0

        # 3. update
        t0 = time.perf_counter()
        policy.train()
        update = grpo_update if grpo else online_dpo_update
        metrics = update(trainer, batch, grouped, step)
        scheduler.step()
        t_train = time.perf_counter() - t0

        # 4. metrics
        metrics.update(
            {
                "reward_mean": scores.mean().item(),
                "reward_std_within_group": grouped.std(dim=1).mean().item(),
                "lr": scheduler.get_last_lr()[0],
                "skipped_nonfinite": state.get("skipped_nonfinite", 0),
            }
        )
        done = step + 1
        log_rl_step(
            cfg, metrics, done, num_steps, logger, batch, texts, scores, (t_rollout, t_score, t_train),
            tasks=tasks, local=local, prompts=prompts, rollout_log=rollout_log, is_main=is_main,
        )  # fmt: skip
        last = metrics
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
        if checkpointer.end_of_step(
            done, num_steps, lambda step: checkpointer.save(step, state, *objects), stop_after_step
        ):
            bar.close()
            logger.close()
            return {"stopped_at": done}
    bar.close()

    summary: dict[str, Any] = {
        "stage": method,
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "metrics": str(out / "metrics.jsonl"),
        "policy": start_name,
        "reward": source,
        "steps": num_steps,
        "time_variance_pass_s": round(t_order, 2),
        "skipped_nonfinite": state.get("skipped_nonfinite", 0),
        "last": {k: v for k, v in last.items() if isinstance(v, int | float)},
    }
    accelerator.wait_for_everyone()
    policy_state = accelerator.get_state_dict(policy)
    if is_main:
        if embedded_eval:  # before saving: merging LoRA weights for the final save alters the model
            record_accuracy_after(summary, state, policy_u, tokenizer, cfg, accelerator.print)
        save_final_model(policy_u, tokenizer, out / "final", state_dict=policy_state)
        keys = ["reward_mean", "gold_score", "loss"] + (
            ["kl", "clipfrac"] if grpo else ["dpo_margin", "pairs"]
        )
        summary["plot"] = str(plot_metrics(out, keys, title="GRPO" if grpo else "Online DPO"))
        summary["time_total_s"] = round(time.perf_counter() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.close()
    accelerator.wait_for_everyone()
    return summary


def pair_weight(pairs_here: int, global_pairs: int, world: int) -> float:
    """Loss weight of a micro-batch of `pairs_here` pairs whose loss is their mean, so that after the
    data-parallel gradient average (1/world) every pair of the global batch weighs 1/global_pairs."""
    return pairs_here * world / global_pairs if global_pairs else 0.0


def informative_rows(grouped: torch.Tensor, skip_ties: bool) -> list[int]:
    """Flat row indices (q * G + j) of the (Q, G) grouped rewards to train on: all, or with `skip_ties`
    only those of groups whose rewards differ. A tied group's advantages are all 0, so its rows add
    nothing to the policy gradient but their forward and backward cost (75% of the rows at the start of
    the verifier run); only their KL term is lost, which then covers the trained rows."""
    q, g = grouped.shape
    if not skip_ties:
        return list(range(q * g))
    keep = grouped.max(dim=1).values > grouped.min(dim=1).values
    return [i * g + j for i in range(q) if bool(keep[i]) for j in range(g)]


def grpo_update(t: PolicyTrainer, batch: RolloutBatch, grouped: torch.Tensor, step: int) -> dict[str, Any]:
    """GRPO's advantages and update for one rollout batch: group-normalised advantages, the token-level
    clipped objective plus kl_coef x the k3 KL to the reference, `ppo_epochs` x `num_mini_batches` steps.
    `grouped`: (Q, G) scores. Returns the iteration's metrics (means of the per-micro-batch statistics)."""
    cfg, accelerator, policy, device, world = t.cfg, t.accelerator, t.policy, t.device, t.world
    n_rows, width = batch.response_ids.shape
    mask = batch.response_mask.float()
    stats_acc: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    advantages = group_advantages(grouped, scale=cfg.scale_rewards).flatten().to(device)
    single_pass = cfg.ppo_epochs == 1 and cfg.num_mini_batches == 1
    train_rows = informative_rows(grouped, cfg.skip_zero_variance_groups and world == 1)
    old_logprobs = torch.zeros(n_rows, width, device=device)
    ref_logprobs = torch.zeros_like(old_logprobs)
    with torch.no_grad(), accelerator.autocast():
        for rows in micro_slices(train_rows, cfg.micro_batch_size):
            sub = batch.select(rows)
            seq, w = sub.sequences(left_pad=True), sub.response_ids.shape[1]
            if not single_pass:  # one pass: the ratio is 1 by construction, no extra forward needed
                scatter_rows(
                    old_logprobs,
                    rows,
                    response_logprobs(policy, seq, sub.response_ids, cfg.temperature),
                )
            if cfg.kl_coef > 0:
                scatter_rows(ref_logprobs, rows, t.reference_logprobs(seq, sub.response_ids))
    order_gen = torch.Generator().manual_seed(cfg.seed * 7 + step)
    for _epoch in range(cfg.ppo_epochs):
        perm = (
            [train_rows[i] for i in torch.randperm(len(train_rows), generator=order_gen).tolist()]
            if not single_pass
            else train_rows
        )
        size = len(train_rows) // cfg.num_mini_batches
        for mb in range(cfg.num_mini_batches):
            mini = perm[mb * size : (mb + 1) * size]
            tokens = accelerator.reduce(mask[mini].sum(), reduction="sum").clamp(min=1)
            micros = micro_slices(mini, cfg.micro_batch_size)
            if not micros:  # every group tied: no advantage anywhere, nothing to update
                continue
            for k, rows in enumerate(micros):
                sub = batch.select(rows)
                seq, w = sub.sequences(left_pad=True), sub.response_ids.shape[1]
                idx = torch.tensor(rows, device=device)
                sub_mask = mask[idx, :w]
                sync = nullcontext() if k == len(micros) - 1 else accelerator.no_sync(policy)
                with sync, accelerator.autocast():
                    logprobs = response_logprobs(policy, seq, sub.response_ids, cfg.temperature)
                    old = logprobs.detach() if single_pass else old_logprobs[idx, :w]
                    adv = advantages[idx][:, None].expand(-1, w)
                    loss, p_stats = ppo_policy_loss(
                        logprobs, old, adv, sub_mask, cfg.clip_eps, tokens / world
                    )
                    if cfg.kl_coef > 0:
                        kl = kl_estimate(logprobs, ref_logprobs[idx, :w], "k3")
                        kl_loss = (kl * sub_mask).sum() / (tokens / world)
                        loss = loss + cfg.kl_coef * kl_loss
                        p_stats["kl"] = masked_mean(kl.detach(), sub_mask)
                    accelerator.backward(loss)
                add_stats(
                    stats_acc,
                    {"loss": loss.item() * tokens.item() / world / max(sub_mask.sum().item(), 1)},
                )
                add_stats(stats_acc, p_stats)
            grad_norm = t.optimizer_step(step + 1)
            add_stats(stats_acc, {"grad_norm": grad_norm})
    metrics["zero_variance_groups"] = (grouped.std(dim=1) == 0).float().mean().item()
    return {**metrics, **{k: sum(v) / len(v) for k, v in stats_acc.items()}}


def online_dpo_update(
    t: PolicyTrainer, batch: RolloutBatch, grouped: torch.Tensor, step: int
) -> dict[str, Any]:
    """Online DPO's pairs and update for one rollout batch: in each query's group the best and the worst
    response form a pair (all-tied groups skipped and counted), one DPO step against the reference.
    `grouped`: (Q, k) scores. Returns the iteration's metrics."""
    cfg, accelerator, policy, device, world = t.cfg, t.accelerator, t.policy, t.device, t.world
    stats_acc: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    chosen, rejected, _, ties = best_worst_pairs(grouped)
    n_pairs = int(chosen.numel())
    # Pairs on every process: each pair weighs 1/global_pairs, whatever process it fell on. Weighting
    # by the local count gave a mean of per-process means (a process with 1 pair counted as much as
    # one with 8).
    global_pairs = int(accelerator.reduce(torch.tensor(n_pairs, device=device), reduction="sum"))
    pairs = list(zip(chosen.tolist(), rejected.tolist(), strict=True))
    pair_micro = max(cfg.micro_batch_size // 2, 1)
    slices = [pairs[i : i + pair_micro] for i in range(0, n_pairs, pair_micro)] or [[(0, 0)]]
    for k, part in enumerate(slices):
        rows = [c for c, _ in part] + [r for _, r in part]
        sub = batch.select(rows)
        seq = sub.sequences(left_pad=True)
        sub_mask = sub.response_mask.float()
        ref_seq = (t.reference_logprobs(seq, sub.response_ids) * sub_mask).sum(1)
        sync = nullcontext() if k == len(slices) - 1 else accelerator.no_sync(policy)
        with sync, accelerator.autocast():
            logprobs = response_logprobs(policy, seq, sub.response_ids, cfg.temperature)
            seq_logps = (logprobs * sub_mask).sum(1)
            b = len(part)
            loss, d_stats = dpo_loss(
                seq_logps[:b],
                seq_logps[b:],
                ref_seq[:b],
                ref_seq[b:],
                cfg.beta,
                cfg.loss_type,
                cfg.label_smoothing,
            )
            # No pair on this process: a zero-weight pass keeps data-parallel gradient syncs in step.
            # (data parallelism averages gradients over `world` processes, hence the factor)
            weight = pair_weight(b, global_pairs, world)
            accelerator.backward(loss * weight)
        if n_pairs:
            add_stats(
                stats_acc,
                {
                    "loss": loss.item(),
                    "dpo_accuracy": d_stats["accuracy"],
                    "dpo_margin": d_stats["margins"].mean(),
                    "chosen_score": grouped.flatten()[chosen].mean(),
                    "rejected_score": grouped.flatten()[rejected].mean(),
                },
            )
    if global_pairs:
        grad_norm = t.optimizer_step(step + 1)
    else:  # no pair anywhere: nothing to learn, the zero-weight pass's gradients are dropped
        grad_norm = 0.0
        t.optimizer.zero_grad(set_to_none=True)
    add_stats(stats_acc, {"grad_norm": grad_norm})
    t.counts["ties_skipped"] = t.counts.get("ties_skipped", 0) + ties
    metrics.update({"pairs": n_pairs, "ties_skipped": ties, "ties_skipped_total": t.counts["ties_skipped"]})
    return {**metrics, **{k: sum(v) / len(v) for k, v in stats_acc.items()}}


def variance_pass(
    cfg: OnlineConfig, out: Path, accelerator: Any, n_queries: int, sample_scores: Any
) -> tuple[list[int], float]:
    """GRPO's curriculum (Qwen2.5): one scoring pass over every query, larger reward variance first. Kept
    on disk (query_order.json), so a resumed run trains in the same order without sampling again.

    `sample_scores(queries, seed) -> (Q, G) scores`. Returns the order and the pass's seconds (0 when read).
    """
    order_file = out / "query_order.json"
    if order_file.is_file():
        return json.loads(order_file.read_text())["order"], 0.0
    t0 = time.perf_counter()
    # Every process runs the same seeded pass, so all agree on the order without communicating.
    chunks = [list(range(k, min(k + cfg.batch_size, n_queries))) for k in range(0, n_queries, cfg.batch_size)]
    grouped_all = torch.cat([sample_scores(chunk, cfg.seed * 7_919 + chunk[0]) for chunk in chunks])
    order = variance_order(grouped_all)
    seconds = time.perf_counter() - t0
    variances = grouped_all.var(dim=1, unbiased=False)
    if accelerator.is_main_process:
        order_file.write_text(
            json.dumps({"order": order, "variance": [round(float(v), 6) for v in variances]}) + "\n"
        )
    accelerator.print(
        f"variance ordering: scored {len(order)} queries x {cfg.samples_per_query} samples in {seconds:.1f} s; "
        f"{int((variances > 0).sum())} have non-zero reward variance and are trained first"
    )
    accelerator.wait_for_everyone()
    return order, seconds
