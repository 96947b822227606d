"""Online preference learning: online DPO (Qwen2) and GRPO (Qwen2.5), on one loop skeleton.

One iteration, both methods:
  1. rollout     the current policy samples `samples_per_query` responses per query (the rollout engine);
  2. score       the reward model scores each response at its closing <|im_end|> (or the gold verifier of
                 the embedded tasks, or a caller's `reward_fn` for rule-based rewards), through the
                 over-optimisation guards (ensemble -> clip -> anchor; off by default);
  3. advantages  online DPO: in every query's group the best and the worst response form a DPO pair
                 (groups whose scores all tie are skipped and counted).
                 GRPO: the rewards normalised within each query's group.
  4. update      online DPO: one DPO step against the initial policy as reference.
                 GRPO: the token-level clipped objective of PPO (`ppo_policy_loss`), plus kl_coef x the k3
                 KL to the reference (`grpo_kl_term`; with kl_target the adaptive controller's coefficient,
                 moved after each iteration). Before training, a scoring pass samples every query once and
                 the queries with the larger reward variance are trained first (the Qwen2.5 ordering;
                 switchable).

The maths lives in pure functions (`align.rl_math.best_worst_pairs`, `group_advantages`,
`variance_order`, `kl_estimate`; `align.losses.dpo_loss`, `ppo_policy_loss`); the run around the loop
(output directory, engine, resume, logging, summary) is `align.train.rl_run`; this file moves tensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from align.assets import resolve_model, start_model
from align.config import GRPOConfig, OnlineConfig, OnlineDPOConfig
from align.losses import dpo_loss, ppo_policy_loss
from align.models import load_causal_lm
from align.reward import RewardModel
from align.rl_math import (
    best_worst_pairs,
    group_advantages,
    group_scores,
    grpo_kl_term,
    masked_mean,
    variance_order,
)
from align.rollout.batch import RolloutBatch
from align.train.batching import total_steps
from align.train.optimization import build_optimizer, build_scheduler
from align.train.process import RunSetupError
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
from align.train.rl_run import (
    PhaseTimer,
    RLRun,
    encode_rl_prompts,
    open_rl_run,
    rows_per_process,
    start_rl_run,
)
from align.train.run_start import log_memory
from align.train.sft import record_accuracy_after, record_accuracy_before
from align.train.sharding import grad_sync, is_sharded, shard_model, wants_sharding

Method = Literal["online_dpo", "grpo"]
# `best_worst_pairs`: (P,) chosen and (P,) rejected flat row indices, (P,) their queries, tied groups
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def run_online_dpo(cfg: OnlineDPOConfig, **kw: Any) -> dict[str, Any]:
    """Online DPO per `cfg`; see `run_online` for the keyword arguments."""
    return run_online(cfg, "online_dpo", **kw)


def run_grpo(cfg: GRPOConfig, **kw: Any) -> dict[str, Any]:
    """GRPO per `cfg`; see `run_online` for the keyword arguments."""
    return run_online(cfg, "grpo", **kw)


def run_online(
    cfg: OnlineConfig, method: Method, *, reward_fn: Any = None, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Run online DPO or GRPO per `cfg`; return the summary (also written to summary.json).

    `reward_fn(batch, texts) -> (B,) scores` replaces the reward model (rule-based rewards, tests);
    `stop_after_step` ends the run after that iteration's checkpoint, as a kill would.
    """
    if method not in METHODS:
        raise ValueError(f"unknown online method {method!r}")
    started = time.perf_counter()
    run, online = setup_online(cfg, method, reward_fn)
    for step in run.steps():
        queries, timer = run.local_queries(step), PhaseTimer()
        with timer("rollout"):
            online.policy.eval()
            batch = run.rollout(queries, step)
        texts = batch.texts(run.tokenizer)
        with timer("scoring"):
            scores, guard_stats = score_phase(online, batch, texts, queries)
            grouped = batch.grouped(scores)
        with timer("training"):
            advantages = advantages_phase(online, grouped)
            metrics = update_phase(online, batch, grouped, advantages, step)
        metrics.update({**online_metrics(online, scores, grouped), **guard_stats})
        if method == "grpo":  # the adaptive KL controller (kl_target) moves the next iteration's coefficient
            metrics.update(adapt_kl(online, metrics.get("kl"), cfg.batch_size * cfg.samples_per_query))
        if run.end_step(
            step, metrics, batch, texts, queries, scores, timer, online.trainer_state, stop_after_step
        ):
            return {"stopped_at": step + 1}
    state = online.counts  # checkpointed: the counters and the held-out accuracy before training
    fields = {
        "policy": online.policy_name,
        "reward": online.source,
        "steps": run.num_steps,
        "time_variance_pass_s": round(online.time_variance_pass_s, 2),
        "skipped_nonfinite": state.get("skipped_nonfinite", 0),
        "last": run.last_numbers(),
    }
    # Measured before the final save: merging LoRA weights for it alters the model.
    accuracy_after = partial(
        record_accuracy_after, state=state, model=online.policy_u, tokenizer=run.tokenizer, cfg=cfg,
        say=online.accelerator.print,
    )  # fmt: skip
    keys = ["reward_mean", "gold_score", "loss", *online.method.plot_keys]
    before_save = accuracy_after if online.embedded_eval else None
    return run.finish(fields, keys, online.method.title, before_save=before_save, started=started)


# ---------------------------------------------------------------------------------------------------
# Set-up


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


def describe_reward(cfg: OnlineConfig, source: str) -> str:
    """The reward source in words, for the run's first line."""
    return {
        "model": f"the reward model at {cfg.reward_model_path}",
        "verifier": "the gold verifier of the embedded tasks (rule-based 0/1; no reward model at "
        f"{cfg.reward_model_path})",
        "reward_fn": "the caller's reward_fn",
    }[source]


@dataclasses.dataclass
class OnlineTrainer(PolicyTrainer):
    """What the online phases work on besides the run: the policy side (policy, reference, optimiser,
    checkpointer, and the checkpointed loop state in `counts`), the method, the schedule and the scorer."""

    method: OnlineMethod
    scheduler: Any
    reward_model: RewardModel | None
    reward_fn: Any
    tasks: list[Any] | None  # the embedded prompts' tasks (the verifier reward, the gold evaluation)
    policy_name: str
    source: str  # reward_fn, model or verifier
    time_variance_pass_s: float = 0.0

    @property
    def embedded_eval(self) -> bool:
        return self.tasks is not None and self.cfg.eval_tasks > 0


def setup_online(cfg: OnlineConfig, method: Method, reward_fn: Any) -> tuple[RLRun, OnlineTrainer]:
    """Set up: the policy (and its reference where the method needs one), the prompts and the scorer,
    optimiser and schedule, the run (engine, resume, logger), the held-out accuracy before training and,
    for GRPO, the variance ordering of the queries."""
    grpo = method == "grpo"
    guards = RewardGuards.from_config(cfg)  # refuses settings that do nothing before any model loads
    accelerator, out = start_rl_run(cfg, method, min_samples=2, split_mini_batches=grpo)
    device = accelerator.device
    # Dropout off (the config has no dropout key): the scored log-probs must be those the update
    # recomputes.
    start_name = start_model(cfg.model_name_or_path)
    policy, tokenizer = load_causal_lm(dataclasses.replace(cfg, model_name_or_path=start_name))
    needs_reference = not grpo or cfg.kl_coef > 0
    reference = load_reference(cfg, resolve_model(start_name), device) if needs_reference else None
    prompts, tasks = load_prompts(cfg)  # PPO's: the query set of query_count and query_seed, or a file
    source = reward_source(cfg, reward_fn, tasks)
    reward_model = load_reward_model(cfg, tokenizer, device) if source == "model" else None
    shard = wants_sharding(cfg)
    if shard:  # the frozen models sharded too: every rank scores the same number of micro-batches
        for frozen in (reference, reward_model):
            if frozen is not None:
                shard_model(frozen, frozen=True)
    guards.check_scorer(reward_model)
    accelerator.print(f"{method}: policy {start_name}; reward: {describe_reward(cfg, source)}")
    prompt_ids = encode_rl_prompts(cfg, prompts, tokenizer, rl_default_system(cfg, reward_model, tokenizer))
    steps = total_steps(cfg, len(prompt_ids))

    if shard:  # align's FSDP2, not accelerate's prepare; the optimiser built after, on the shards
        policy = shard_model(policy.to(device))
    optimizer = build_optimizer(policy, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps[1])
    if not shard:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    rows = rows_per_process(cfg, accelerator.num_processes) // (cfg.num_mini_batches if grpo else 1)
    log_memory(accelerator, policy, cfg, out, accumulation=-(-rows // cfg.micro_batch_size))
    run = open_rl_run(
        cfg, method, accelerator, out, tokenizer, prompts, tasks, prompt_ids, steps, policy, modules={},
        optimizers={"policy": optimizer}, schedulers={"policy": scheduler}, postfix={"reward": "reward_mean"},
    )  # fmt: skip
    state: dict[str, Any] = dict(run.saved or {})
    if run.saved is not None:
        guards.load_state_dict(run.saved)
    online = OnlineTrainer(
        cfg, accelerator, policy, run.policy_u, reference, optimizer, run.checkpointer, state,
        METHODS[method], scheduler, reward_model, reward_fn, tasks, start_name, source, guards=guards,
    )  # fmt: skip
    if online.embedded_eval and run.is_main:
        record_accuracy_before(state, run.policy_u, tokenizer, cfg, accelerator.print)
    if guards.anchor and guards.anchors is None:  # a fresh run: the policy is still the starting one
        policy.eval()
        guards.anchors = reference_anchors(run, guards, partial(raw_scores, online))
    if grpo and cfg.variance_order:
        policy.eval()
        run.order, online.time_variance_pass_s = variance_pass(
            cfg, out, accelerator, len(prompt_ids), partial(sample_scores, run, online)
        )
    return run, online


# ---------------------------------------------------------------------------------------------------
# The phases of one iteration


def scorer(online: OnlineTrainer, queries: list[int]) -> Any:
    """The rule-based reward of a batch of `queries`: the caller's reward_fn, the gold verifier when there
    is no reward model, else None (the reward model scores)."""
    if online.reward_fn is None and online.reward_model is None:
        return verifier_reward(online.tasks, queries)
    return online.reward_fn


def raw_scores(
    online: OnlineTrainer, batch: RolloutBatch, texts: list[str], queries: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scorer's (B, K) scores, closed and readable (`score_members`): what the PAR anchors are made of."""
    return score_members(
        batch, texts, reward_model=online.reward_model, reward_fn=scorer(online, queries),
        micro_batch_size=online.cfg.micro_batch_size, autocast=online.accelerator.autocast,
    )  # fmt: skip


def score_phase(
    online: OnlineTrainer, batch: RolloutBatch, texts: list[str], queries: list[int]
) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) scores of a rollout batch whose prompt i is query `queries[i]`, through the guards; unclosed
    (or unreadable) responses rank below every closed one when missing_eos_penalty is set
    (`group_scores`). Also what each guard did."""
    cfg = online.cfg
    s = guard_scores(
        online.guards, batch, texts, queries, reward_model=online.reward_model,
        reward_fn=scorer(online, queries), micro_batch_size=cfg.micro_batch_size,
        autocast=online.accelerator.autocast,
    )  # fmt: skip
    return group_scores(s.scores, s.closed, cfg.missing_eos_penalty), s.stats


def sample_scores(run: RLRun, online: OnlineTrainer, queries: list[int], seed: int) -> torch.Tensor:
    """(Q, G) scores of fresh samples for `queries`, drawn with `seed` (the variance pass), on the CPU."""
    batch = run.sample(queries, seed=seed)
    scores, _ = score_phase(online, batch, batch.texts(run.tokenizer), queries)
    return batch.grouped(scores).cpu()


def advantages_phase(online: OnlineTrainer, grouped: torch.Tensor) -> Any:
    """The method's advantages from the (Q, G) scores: GRPO's (B,) group-normalised advantages, or online
    DPO's best-worst pairs (`Pairs`)."""
    return online.method.advantages(online.cfg, grouped)


def update_phase(
    online: OnlineTrainer, batch: RolloutBatch, grouped: torch.Tensor, advantages: Any, step: int
) -> dict[str, Any]:
    """The method's update in training mode, then one step of the schedule. `grouped`: (Q, G) scores;
    `advantages`: what the method's advantages phase gave (GRPO: (B,) advantages; online DPO: pairs).
    Returns the iteration's metrics."""
    online.policy.train()
    metrics = online.method.update(online, batch, grouped, advantages, step)
    online.scheduler.step()
    return metrics


def online_metrics(online: OnlineTrainer, scores: torch.Tensor, grouped: torch.Tensor) -> dict[str, Any]:
    """The metrics both methods log besides their update's: (B,) `scores`, grouped as (Q, G)."""
    return {
        "reward_mean": scores.mean().item(),
        "reward_std_within_group": grouped.std(dim=1).mean().item(),
        "lr": online.scheduler.get_last_lr()[0],
        "skipped_nonfinite": online.counts.get("skipped_nonfinite", 0),
    }


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


def grpo_advantages(cfg: OnlineConfig, grouped: torch.Tensor) -> torch.Tensor:
    """GRPO's advantages phase: the (Q, G) scores normalised within each query's group, as (Q * G,) =
    (B,) per-response advantages (every token of a response gets its response's)."""
    return group_advantages(grouped, scale=cfg.scale_rewards).flatten()


def grpo_update(
    t: PolicyTrainer, batch: RolloutBatch, grouped: torch.Tensor, advantages: torch.Tensor, step: int
) -> dict[str, Any]:
    """GRPO's update for one rollout batch: the token-level clipped objective plus kl_coef x the k3 KL to
    the reference, `ppo_epochs` x `num_mini_batches` steps. `grouped`: (Q, G) scores; `advantages`: (B,).
    Returns the iteration's metrics (means of the per-micro-batch statistics)."""
    cfg, accelerator, policy, device, world = t.cfg, t.accelerator, t.policy, t.device, t.world
    n_rows, width = batch.response_ids.shape
    mask = batch.response_mask.float()
    stats_acc: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    advantages = advantages.to(device)
    single_pass = cfg.ppo_epochs == 1 and cfg.num_mini_batches == 1
    train_rows = informative_rows(grouped, cfg.skip_zero_variance_groups and world == 1)
    old_logprobs = torch.zeros(n_rows, width, device=device)
    ref_logprobs = torch.zeros_like(old_logprobs)
    with torch.no_grad(), accelerator.autocast():
        for rows in micro_slices(train_rows, cfg.micro_batch_size):
            sub = batch.select(rows)
            if not single_pass:  # one pass: the ratio is 1 by construction, no extra forward needed
                scatter_rows(old_logprobs, rows, rollout_logprobs(policy, sub, cfg.temperature))
            if cfg.kl_coef > 0:
                scatter_rows(ref_logprobs, rows, t.reference_logprobs(sub))
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
                w = sub.response_ids.shape[1]
                idx = torch.tensor(rows, device=device)
                sub_mask = mask[idx, :w]
                with grad_sync(accelerator, policy, sync=k == len(micros) - 1), accelerator.autocast():
                    logprobs = rollout_logprobs(policy, sub, cfg.temperature)
                    old = logprobs.detach() if single_pass else old_logprobs[idx, :w]
                    adv = advantages[idx][:, None].expand(-1, w)
                    loss, p_stats = ppo_policy_loss(
                        logprobs, old, adv, sub_mask, cfg.clip_eps, tokens / world
                    )
                    if cfg.kl_coef > 0:  # the adaptive controller's coefficient with kl_target
                        kl_loss, kl = grpo_kl_term(
                            logprobs, ref_logprobs[idx, :w], sub_mask, t.kl_coef, tokens / world
                        )
                        loss = loss + kl_loss
                        p_stats["kl"] = masked_mean(kl, sub_mask)
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


def dpo_pairs(cfg: OnlineConfig, grouped: torch.Tensor) -> Pairs:
    """Online DPO's advantages phase: in each row of the (Q, k) scores the best and the worst response
    form a pair; (P,) chosen and (P,) rejected flat row indices, (P,) their queries, and the count of
    all-tied groups (skipped)."""
    return best_worst_pairs(grouped)


def online_dpo_update(
    t: PolicyTrainer, batch: RolloutBatch, grouped: torch.Tensor, pairs: Pairs, step: int
) -> dict[str, Any]:
    """Online DPO's update for one rollout batch: one DPO step on the `pairs` against the reference.
    `grouped`: (Q, k) scores. Returns the iteration's metrics."""
    cfg, accelerator, policy, device, world = t.cfg, t.accelerator, t.policy, t.device, t.world
    stats_acc: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    chosen, rejected, _, ties = pairs
    n_pairs = int(chosen.numel())
    # Pairs on every process: each pair weighs 1/global_pairs, whatever process it fell on. Weighting
    # by the local count gave a mean of per-process means (a process with 1 pair counted as much as
    # one with 8).
    global_pairs = int(accelerator.reduce(torch.tensor(n_pairs, device=device), reduction="sum"))
    pairs = list(zip(chosen.tolist(), rejected.tolist(), strict=True))
    pair_micro = max(cfg.micro_batch_size // 2, 1)
    slices = [pairs[i : i + pair_micro] for i in range(0, n_pairs, pair_micro)]
    real = len(slices)
    # Zero-weight dummy slices (as verl pads micro-batches): a process without pairs still makes the
    # data-parallel gradient sync, and a sharded model's every forward and backward is a collective, so
    # all processes run the largest process's slice count.
    width = len(slices) or 1
    if is_sharded(policy):
        width = int(accelerator.reduce(torch.tensor(width, device=device), reduction="max"))
    slices += [[(0, 0)]] * (width - len(slices))
    for k, part in enumerate(slices):
        rows = [c for c, _ in part] + [r for _, r in part]
        sub = batch.select(rows)
        sub_mask = sub.response_mask.float()
        ref_seq = (t.reference_logprobs(sub) * sub_mask).sum(1)
        with grad_sync(accelerator, policy, sync=k == len(slices) - 1), accelerator.autocast():
            logprobs = rollout_logprobs(policy, sub, cfg.temperature)
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
            # (data parallelism averages gradients over `world` processes, hence the factor)
            weight = pair_weight(b, global_pairs, world) if k < real else 0.0
            accelerator.backward(loss * weight)
        if k < real:
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


@dataclasses.dataclass(frozen=True)
class OnlineMethod:
    """What differs between online DPO and GRPO: the advantages and update phases, and the plot."""

    title: str
    plot_keys: tuple[str, ...]  # plotted after reward_mean, gold_score and loss
    advantages: Callable[[OnlineConfig, torch.Tensor], Any]
    update: Callable[[PolicyTrainer, RolloutBatch, torch.Tensor, Any, int], dict[str, Any]]


METHODS: dict[str, OnlineMethod] = {
    "online_dpo": OnlineMethod("Online DPO", ("dpo_margin", "pairs"), dpo_pairs, online_dpo_update),
    "grpo": OnlineMethod("GRPO", ("kl", "clipfrac"), grpo_advantages, grpo_update),
}
