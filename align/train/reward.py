"""Reward model training on preference pairs: PMP, RM fine-tuning, or both in sequence, on accelerate.

Both responses of every pair go through the model in the same forward pass: a micro-batch's chosen
and rejected sequences are packed back to back into one padding-free row (position ids restart at
each sequence, so attention stays inside it, as in the SFT loop), and the reward of each sequence is
read at its last token, its end token. Pairs whose end token was truncated away are counted and left
out. The loss is the mean over the pairs of the whole global batch, whatever the split into
micro-batches and processes.

With ``pair_grouping: prompt`` (InstructGPT's grouped comparisons) the batch item is a prompt's group of
pairs instead (the pairs sharing a ``group`` id, `align.data.groups.prompt_groups`): the group's
distinct responses are packed and scored once each, so K responses cost K sequences, not two per pair,
and the loss is `align.losses.grouped_pairwise_loss`, the mean over the batch's groups of each group's
mean comparison loss. A group is never split over micro-batches, so the update does not depend on the
split there either.

With ``num_heads`` K > 1 the model is an ensemble of K scalar heads on the backbone, and each head is trained
on its own loss over its own bootstrap weighting of the batch items (`align.train.reward_heads`,
`align.losses.ensemble_pairwise_loss`); the logged accuracy, margin and rewards stay those of the heads'
mean, ``disagreement`` is the mean std over heads of the pair margin, and held-out scoring adds each head's
accuracy and the accuracy of the min over heads.

Held-out pairs (``eval_dataset`` or ``eval_fraction``, and each of ``eval_datasets`` by name) are scored
before training, after every epoch and at the end, with the same code as ``eval/rm_accuracy.py``; the
eval curves (``curves.png``, ``eval/accuracy.png``) start at step 0, the model before training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from align.assets import resolve_model, start_model
from align.config import RMConfig
from align.data import end_token_id, tokenize_preference
from align.data.groups import prompt_groups
from align.evaluation.reward_model import evaluate_pairs, format_result, write_report
from align.losses import grouped_pairwise_loss, pairwise_reward_loss
from align.models import announce_attention, load_tokenizer
from align.packing import check_packed_attention
from align.reward import RewardModel, pack_pairs, pad_sequences
from align.tracking import plot_metrics
from align.train.batching import BatchPlan, global_batch_indices, total_steps
from align.train.checkpointing import fingerprint_rows
from align.train.optim_step import optimizer_step
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir
from align.train.reward_data import eval_set_specs, group_examples, load_eval_sets, load_rm_data
from align.train.reward_heads import bootstrap_weights, micro_batch_ensemble_loss, widen_head
from align.train.run_start import start_single_model_run
from align.train.sharding import full_state_dict, full_weights, grad_sync, is_sharded, wants_sharding


def load_reward_model_for_training(cfg: RMConfig) -> tuple[RewardModel, Any, str]:
    """(model, tokenizer, where it came from): `init_from` (head carried over) or a new head on a backbone."""
    load_kwargs = {
        "attn_implementation": cfg.attn_implementation,
        "dropout": cfg.dropout,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.init_from:
        source = cfg.init_from
        if not Path(source).is_dir():
            raise RunSetupError(f"init_from={source}: no such directory (expected a reward model's final/)")
        try:
            model = RewardModel.from_pretrained(source, **load_kwargs)
        except FileNotFoundError as err:
            raise RunSetupError(f"init_from: {err}") from err
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        if model.config.end_token != cfg.end_token:
            raise RunSetupError(
                f"init_from={source} reads rewards at {model.config.end_token!r} but end_token={cfg.end_token!r}"
            )
        model.config.unclosed_reward = cfg.unclosed_reward
        model.config.default_system = cfg.default_system
        model.config.max_length = cfg.max_length
        heads = model.config.num_heads
        if heads != cfg.num_heads:
            if heads != 1:  # which K' of the K trained heads to keep, or what to add, is no choice to guess
                raise RunSetupError(
                    f"init_from={source} has {heads} reward heads but num_heads={cfg.num_heads}: an ensemble "
                    f"continues with its own heads (num_heads={heads}); only a one-head model (a PMP model) "
                    "is widened to K heads"
                )
            model.head = widen_head(model.head, cfg.num_heads, cfg.seed, cfg.head_init_noise)
            model.config.num_heads = cfg.num_heads
    else:
        source = resolve_model(start_model(cfg.model_name_or_path))
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
        try:
            end_id = end_token_id(tokenizer, cfg.end_token)
        except ValueError as err:
            raise RunSetupError(str(err)) from err
        model = RewardModel.from_backbone(
            source,
            end_token_id=end_id,
            end_token=cfg.end_token,
            unclosed_reward=cfg.unclosed_reward,
            default_system=cfg.default_system,
            max_length=cfg.max_length,
            seed=cfg.seed,
            num_heads=cfg.num_heads,
            **load_kwargs,
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.backbone.config.use_cache = False
    if cfg.use_lora:
        model.backbone = apply_lora_to_backbone(model.backbone, cfg)
    return model, tokenizer, source


def apply_lora_to_backbone(backbone: torch.nn.Module, cfg: RMConfig) -> torch.nn.Module:
    """LoRA adapters on the backbone's linear layers; the reward head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    backbone = get_peft_model(backbone, lora)
    if cfg.gradient_checkpointing:
        backbone.enable_input_require_grads()
    return backbone


# --------------------------------------------------------------------------------------------------
# The loop


def _forward_pairs(
    model: torch.nn.Module, examples: list[dict], cfg: RMConfig, pad_id: int, device: torch.device
) -> tuple[Any, torch.Tensor | None, int]:
    """Rewards of a micro-batch's sequences (chosen_1, rejected_1, ...) in one forward pass."""
    if cfg.packing:
        batch = pack_pairs(examples, device)
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], end_index=batch["end_index"]
        )
        tokens = batch["input_ids"].numel()
        margin, has_margin = batch["margin"], batch["has_margin"]
    else:
        seqs = [s for ex in examples for s in (ex["chosen_ids"], ex["rejected_ids"])]
        ids, mask = pad_sequences(seqs, pad_id, side="right", device=device)
        out = model(input_ids=ids, attention_mask=mask)
        tokens = int(mask.sum())
        margins = [ex.get("margin") for ex in examples]
        margin = torch.tensor([m or 0.0 for m in margins], device=device)
        has_margin = torch.tensor([m is not None for m in margins], device=device)
    use = cfg.use_margin and bool(has_margin.any())
    return out, (margin if use else None), tokens


def _forward_groups(
    model: torch.nn.Module, groups: list[dict], cfg: RMConfig, pad_id: int, device: torch.device
) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor | None, int]:
    """Rewards of a micro-batch of prompt groups (`group_examples`): every group's distinct sequences in one
    forward pass (one packed row, or one padded batch), and the comparisons as indices into those rewards.

    Returns (model output, {"chosen_index", "rejected_index", "group_of_pair"} (P,) int64, margin (P,) or
    None, tokens)."""
    seqs: list[list[int]] = []
    index: dict[str, list[int]] = {"chosen_index": [], "rejected_index": [], "group_of_pair": []}
    margins: list[float | None] = []
    for g, group in enumerate(groups):
        offset = len(seqs)
        seqs += group["seqs"]
        index["chosen_index"] += [offset + i for i in group["chosen_index"]]
        index["rejected_index"] += [offset + i for i in group["rejected_index"]]
        index["group_of_pair"] += [g] * len(group["chosen_index"])
        margins += group["margin"]
    if cfg.packing:
        ids = [t for seq in seqs for t in seq]
        pos = [p for seq in seqs for p in range(len(seq))]
        ends = torch.tensor([len(seq) for seq in seqs]).cumsum(0) - 1
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            position_ids=torch.tensor([pos], dtype=torch.long, device=device),
            end_index=ends.to(device),
        )
        tokens = len(ids)
    else:
        ids_t, mask = pad_sequences(seqs, pad_id, side="right", device=device)
        out = model(input_ids=ids_t, attention_mask=mask)
        tokens = int(mask.sum())
    tensors = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in index.items()}
    use = cfg.use_margin and any(m is not None for m in margins)
    margin = torch.tensor([m or 0.0 for m in margins], device=device) if use else None
    return out, tensors, margin, tokens


def check_rm_attention(cfg: RMConfig) -> None:
    """Refuse, before loading, an attention that would let a packed row's sequences see each other.

    Training packs with `packing`; held-out scoring (`align.evaluation.reward_model.score_pairs`) always packs each
    micro-batch's pairs into one row, and there is held-out data with `eval_dataset`, `eval_fraction`,
    `eval_datasets` or the embedded data. The reward model's forward passes no varlen kwargs
    (`align.reward.RewardModel`)."""
    held_out = (
        cfg.eval_dataset is not None
        or cfg.dataset == "embedded"
        or cfg.eval_fraction > 0
        or bool(cfg.eval_datasets)
    )
    try:
        check_packed_attention(
            cfg.attn_implementation,
            packs=cfg.packing or held_out,
            passes_document_kwargs=False,
            what="packing: true" if cfg.packing else "held-out scoring packs each micro-batch into one row",
        )
    except ValueError as err:
        raise RunSetupError(str(err)) from err


def run_reward(cfg: RMConfig, *, stop_after_step: int | None = None) -> dict[str, Any]:
    """Run the configured stage (or both, for stage=pmp+rm); return the summary (also summary.json)."""
    if cfg.stage == "pmp+rm":
        return run_pmp_then_rm(cfg, stop_after_step=stop_after_step)
    return train_reward_model(cfg, stop_after_step=stop_after_step)


def run_pmp_then_rm(cfg: RMConfig, *, stop_after_step: int | None = None) -> dict[str, Any]:
    """PMP into output_dir/pmp, then RM fine-tuning from its final/ (head included) into output_dir/rm."""
    state = PartialState()
    out = prepare_output_dir(
        cfg.output_dir, overwrite=cfg.overwrite, is_main=state.is_main_process, stage="pmp+rm"
    )
    state.wait_for_everyone()
    start = time.perf_counter()
    # One PMP head, widened to num_heads in RM: the ensemble is over the fine-tuning, and the RM is the one
    # a separate pmp run then an rm run (init_from) would give.
    pmp_cfg = dataclasses.replace(cfg, stage="pmp", output_dir=str(out / "pmp"), num_heads=1)
    pmp = train_reward_model(pmp_cfg, stop_after_step=stop_after_step)
    if "stopped_at" in pmp:
        return pmp
    rm_cfg = dataclasses.replace(
        cfg,
        stage="rm",
        dataset=cfg.rm_dataset,
        num_epochs=cfg.num_epochs if cfg.rm_num_epochs is None else cfg.rm_num_epochs,
        init_from=pmp["final_model"],
        output_dir=str(out / "rm"),
        eval_before=False,  # the PMP model's held-out accuracy is already known
    )
    rm = train_reward_model(
        rm_cfg, accuracy_before=pmp.get("accuracy_after"), accuracies_before=pmp.get("accuracies_after")
    )
    if "stopped_at" in rm:  # stopped by a signal: no final model yet, resume continues it
        return rm
    summary = {
        "stage": "pmp+rm",
        "output_dir": str(out),
        "final_model": rm["final_model"],
        "metrics": rm["metrics"],
        "accuracy_before_pmp": pmp.get("accuracy_before"),
        "accuracy_after_pmp": pmp.get("accuracy_after"),
        "accuracy_after_rm": rm.get("accuracy_after"),
        "pmp_seconds": pmp["seconds"],
        "rm_seconds": rm["seconds"],
        "seconds": round(time.perf_counter() - start, 1),
        "pmp": pmp,
        "rm": rm,
    }
    if state.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(
            f"held-out accuracy: before {_pct(summary['accuracy_before_pmp'])} -> after PMP "
            f"{_pct(summary['accuracy_after_pmp'])} -> after RM {_pct(summary['accuracy_after_rm'])} "
            f"({summary['seconds']:.0f} s)"
        )
    return summary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def train_reward_model(
    cfg: RMConfig,
    *,
    stop_after_step: int | None = None,
    accuracy_before: float | None = None,
    accuracies_before: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train one stage per `cfg`; return the run summary (also written to summary.json).

    `stop_after_step` ends the run early after that step's checkpoint, as a kill would (for tests);
    `accuracy_before` (the main held-out set) and `accuracies_before` (any set, by name) are reported as
    the held-out accuracy before training when eval_before is off (pmp+rm: the PMP model's, known already).
    """
    if cfg.stage not in ("pmp", "rm"):
        raise RunSetupError(f"train_reward_model runs one stage (pmp or rm), got stage={cfg.stage!r}")
    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=is_main, stage=cfg.stage)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    plan = BatchPlan(cfg.batch_size, cfg.micro_batch_size, accelerator.num_processes)
    grouped = cfg.pair_grouping == "prompt"

    check_rm_attention(cfg)
    eval_set_specs(cfg.eval_datasets)  # refuse clashing names before loading a model
    model, tokenizer, model_source = load_reward_model_for_training(cfg)
    attention = announce_attention(
        model.backbone.config, cfg, device=accelerator.device, mixed_precision=accelerator.mixed_precision,
        say=accelerator.print, warn=is_main,
    )  # fmt: skip
    pairs, report, source, eval_pairs, eval_name = load_rm_data(cfg, out, is_main)
    extra_sets = load_eval_sets(cfg, eval_name)
    tok_kwargs = {
        "max_length": cfg.max_length,
        "end_token": cfg.end_token,
        "default_system": cfg.default_system,
        "truncation_side": cfg.truncation_side,
    }
    examples = tokenize_preference(pairs, tokenizer, report=report, **tok_kwargs)
    if grouped:
        rows, unclosed_pairs = group_examples(examples, prompt_groups(pairs))
        row_keys: tuple[str, ...] = ("seqs", "chosen_index", "rejected_index", "margin")
    else:
        rows = [ex for ex in examples if ex["chosen_closed"] and ex["rejected_closed"]]
        unclosed_pairs = len(examples) - len(rows)
        row_keys = ("chosen_ids", "rejected_ids", "margin")
    # The held-out sets by name, the main one (eval_dataset / eval_fraction / embedded) first.
    eval_sets: dict[str, list[dict]] = {}
    if eval_pairs:
        eval_sets[eval_name or "heldout"] = tokenize_preference(eval_pairs, tokenizer, **tok_kwargs)
    for name, set_pairs in extra_sets.items():
        eval_sets[name] = tokenize_preference(set_pairs, tokenizer, **tok_kwargs)
    main_set = next(iter(eval_sets), None)
    eval_examples = eval_sets.get(main_set, []) if main_set else []
    steps_per_epoch, num_steps = total_steps(cfg, len(rows))
    train_pairs = sum(len(r["chosen_index"]) for r in rows) if grouped else len(rows)
    train_sequences = sum(len(r["seqs"]) for r in rows) if grouped else 2 * len(rows)
    if is_main:
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        accelerator.print(report.summary())
        unit = "groups" if grouped else "pairs"
        what = (
            f"{len(rows)} prompt groups of {train_pairs} training pairs, {train_sequences} distinct "
            f"responses scored per epoch (per pair: {2 * train_pairs})"
            if grouped
            else f"{len(rows)} training pairs"
        )
        held = ", ".join(f"{name} {len(ex)}" for name, ex in eval_sets.items()) or "none"
        accelerator.print(
            f"{cfg.stage}: {what} ({unclosed_pairs} pairs left out: end token truncated away), held-out "
            f"pairs: {held}; {steps_per_epoch} steps per epoch, {num_steps} steps, batch {cfg.batch_size} "
            f"{unit} = {plan.accumulation_steps} x {cfg.micro_batch_size} x {accelerator.num_processes} "
            f"process(es); model from {model_source}"
        )

    heads = cfg.num_heads
    fingerprint = fingerprint_rows(rows, keys=row_keys)
    if heads > 1:  # each head's data: a checkpoint of other heads or another bootstrap is refused on resume
        fingerprint += f":heads={heads}:{cfg.head_bootstrap}"
    run = start_single_model_run(
        accelerator,
        model,
        cfg,
        out,
        num_steps,
        fingerprint,
        shard=wants_sharding(cfg),
        start_model=str(model_source),
    )
    model, unwrapped, optimizer, scheduler = run.model, run.unwrapped, run.optimizer, run.scheduler
    start_step, saved, logger = run.start_step, run.saved, run.logger
    state: dict[str, Any] = {"skipped_nonfinite": 0, "eval_history": [], "eval_seconds": 0.0, **(saved or {})}

    def evaluate() -> dict[str, dict[str, Any]]:
        t0 = time.perf_counter()
        results = {
            name: evaluate_pairs(
                unwrapped,
                ex,
                micro_batch_size=cfg.eval_micro_batch_size,
                device=accelerator.device,
                autocast=accelerator.autocast,
            )
            for name, ex in eval_sets.items()
        }
        state["eval_seconds"] += time.perf_counter() - t0
        return results

    def evaluate_on_main() -> dict[str, dict[str, Any]]:
        """The held-out sets scored by the main process ({} elsewhere). Sharded weights are gathered on
        every rank first (a collective), so the main process alone can run forwards."""
        with full_weights(model):
            return evaluate() if is_main else {}

    def eval_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The main set's accuracy as eval_accuracy (as always), every other set's as eval_accuracy/name."""
        metrics = {"eval_accuracy": results[main_set]["accuracy"]} if main_set in results else {}
        metrics.update({f"eval_accuracy/{n}": r["accuracy"] for n, r in results.items() if n != main_set})
        if main_set in results and "mean_margin" in results[main_set]:
            metrics.update(
                eval_mean_margin=results[main_set]["mean_margin"], eval_ties=results[main_set]["ties"]
            )
        if main_set in results and "head_accuracies" in results[main_set]:
            main = results[main_set]
            metrics.update(eval_min_accuracy=main["min_accuracy"], eval_disagreement=main["disagreement"])
            metrics.update({f"eval_accuracy_head{k}": a for k, a in enumerate(main["head_accuracies"])})
        return metrics

    if eval_sets and saved is None:
        before: dict[str, dict[str, Any]] = {}
        if cfg.eval_before:
            sizes = ", ".join(f"{name} {len(ex)}" for name, ex in eval_sets.items())
            accelerator.print(f"held-out accuracy before training ({sizes} pairs)...")
            before = evaluate_on_main()
            for name, result in before.items():
                accelerator.print(format_result(f"{name} (before)", result))
        else:
            known = dict(accuracies_before or {})
            if accuracy_before is not None:
                known.setdefault(main_set, accuracy_before)
            before = {n: {"accuracy": a} for n, a in known.items() if n in eval_sets and a is not None}
        if before:  # evaluated here (main process) or known already (every process)
            state["accuracy_before"] = before[main_set]["accuracy"] if main_set in before else None
            state["accuracies_before"] = {n: r["accuracy"] for n, r in before.items()}
            # Step 0 of the eval curve: the model before training.
            state["eval_history"].append(_history_entry(0, 0.0, before, main_set))
            logger.log(eval_metrics(before), step=0)
        accelerator.wait_for_everyone()

    model.train()
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc=cfg.stage,
        disable=not (is_main and cfg.progress),
        dynamic_ncols=True,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    normalizer = cfg.batch_size / accelerator.num_processes  # DDP averages over processes
    last_loss = float("nan")
    train_seconds = state.get("train_seconds", 0.0)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, num_steps):
        step_start = time.perf_counter()
        indices = global_batch_indices(step, len(rows), cfg.batch_size, cfg.seed)
        micro_batches = plan.local_micro_batches(indices, accelerator.process_index)
        # loss, correct, margin, chosen, rejected (per pair, or a group's means), pairs, responses
        sums = torch.zeros(7, device=accelerator.device)
        if heads > 1:  # each item's bootstrap weights; each head's loss is its weighted mean over the batch
            item_weights = bootstrap_weights(indices, heads, cfg.seed, cfg.head_bootstrap)
            item_weights = item_weights.to(accelerator.device)
            weight_of = dict(zip(indices, item_weights, strict=True))
            head_weight = item_weights.sum(0)
            head_sums = torch.zeros(heads + 1, device=accelerator.device)  # loss per head, disagreement
        for k, micro in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with grad_sync(accelerator, model, sync=last), accelerator.autocast():
                if grouped:
                    result, index, margin, tokens = _forward_groups(
                        model, [rows[i] for i in micro], cfg, pad_id, accelerator.device
                    )
                    loss, stats = grouped_pairwise_loss(
                        result.rewards,
                        index["chosen_index"],
                        index["rejected_index"],
                        index["group_of_pair"],
                        margin,
                        cfg.center_rewards_coef,
                        normalizer=normalizer,
                    )
                    chosen_sum, rejected_sum = stats["chosen_sum"], stats["rejected_sum"]
                    counts = [stats["pairs"], stats["responses"]]
                else:
                    result, margin, tokens = _forward_pairs(
                        model, [rows[i] for i in micro], cfg, pad_id, accelerator.device
                    )
                    chosen, rejected = result.rewards[0::2], result.rewards[1::2]
                    loss, stats = pairwise_reward_loss(
                        chosen, rejected, margin, cfg.center_rewards_coef, normalizer=normalizer
                    )
                    chosen_sum, rejected_sum = chosen.detach().sum(), rejected.detach().sum()
                    counts = [stats["pairs"], 2 * stats["pairs"]]
                if heads > 1:  # trains each head on its own data; the stats above stay the heads' mean's
                    loss, head_stats = micro_batch_ensemble_loss(
                        result.member_rewards,
                        torch.stack([weight_of[i] for i in micro]),
                        index if grouped else None,
                        margin,
                        cfg.center_rewards_coef,
                        normalizer=head_weight / accelerator.num_processes,
                    )
                    head_sums += torch.cat([head_stats["loss_sum"], head_stats["disagreement_sum"][None]])
                accelerator.backward(loss)
            window_tokens += tokens
            sums += torch.stack(
                [stats["loss_sum"], stats["correct"], stats["margin_sum"], chosen_sum, rejected_sum, *counts]
            )
        reduced = accelerator.reduce(sums, reduction="sum")
        totals = (reduced[:5] / cfg.batch_size).tolist()
        head_metrics: dict[str, float] = {}
        if heads > 1:  # the loss trained: the mean over heads of each one's weighted mean
            head_sums = accelerator.reduce(head_sums, reduction="sum")
            head_losses = head_sums[:heads] / head_weight.clamp(min=1e-12)
            totals[0] = float(head_losses.mean())
            head_metrics = {"disagreement": float(head_sums[heads] / reduced[5])}
        grad_norm = optimizer_step(
            accelerator, model, optimizer, max_grad_norm=cfg.max_grad_norm, counts=state,
            checkpointer=run.checkpointer, step=step + 1, scheduler=scheduler, loss=totals[0],
        )  # fmt: skip
        step_seconds = time.perf_counter() - step_start
        train_seconds += step_seconds
        last_loss = totals[0]
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", acc=f"{totals[1]:.2f}")
        metrics: dict[str, Any] = {}
        if grouped:  # what grouping saves: comparisons trained vs sequences scored
            metrics.update(pairs=int(reduced[5]), responses=int(reduced[6]))
        if eval_sets and (done % steps_per_epoch == 0 or done == num_steps):
            eval_start = time.perf_counter()
            results = evaluate_on_main()
            if is_main:
                epoch = done / steps_per_epoch
                state["eval_history"].append(_history_entry(done, epoch, results, main_set))
                state["last_evals"] = {
                    n: {k: v for k, v in r.items() if k != "margins"} for n, r in results.items()
                }
                state["last_evals_margins"] = {n: r["margins"] for n, r in results.items()}
                metrics.update(eval_metrics(results))
                for name, result in results.items():
                    accelerator.print(format_result(f"{name} (epoch {epoch:g}, step {done})", result))
            accelerator.wait_for_everyone()
            # Keep scoring time out of the training throughput: the window's clock skips it (restarting
            # the clock here instead left ~0 s for the window's training tokens, a 1e9 tokens/s figure).
            window_start += time.perf_counter() - eval_start
        if done % cfg.logging_steps == 0 or done == num_steps or "eval_accuracy" in metrics:
            elapsed = time.perf_counter() - window_start
            logger.log(
                {
                    "loss": last_loss,
                    "accuracy": totals[1],
                    "margin": totals[2],
                    "chosen_reward": totals[3],
                    "rejected_reward": totals[4],
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens * accelerator.num_processes / max(elapsed, 1e-9),
                    "step_seconds": step_seconds,
                    "epoch": done / steps_per_epoch,
                    "skipped_nonfinite": state["skipped_nonfinite"],
                    **head_metrics,
                    **metrics,
                },
                step=done,
            )
            window_start, window_tokens = time.perf_counter(), 0
        state["train_seconds"] = train_seconds
        if run.checkpointer.end_of_step(done, num_steps, lambda step: run.save(step, state), stop_after_step):
            bar.close()
            logger.close()
            return {"stopped_at": done}
    bar.close()

    history = state["eval_history"]
    after = [h for h in history if h["step"] > 0]
    summary: dict[str, Any] = {
        "stage": cfg.stage,
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "metrics": str(out / "metrics.jsonl"),
        "model_from": model_source,
        "steps": num_steps,
        "final_loss": last_loss,
        "pair_grouping": cfg.pair_grouping,
        "train_pairs": train_pairs,
        "unclosed_pairs_left_out": unclosed_pairs,
        "eval_pairs": len(eval_examples),
        "accuracy_before": state.get("accuracy_before"),
        "accuracy_after": after[-1]["accuracy"] if after else None,
        "eval_sets": {name: len(ex) for name, ex in eval_sets.items()},
        "accuracies_before": state.get("accuracies_before"),
        # .get: an eval point saved before named held-out sets existed has no "accuracies".
        "accuracies_after": after[-1].get("accuracies") if after else None,
        "eval_history": history,
        "data": report.to_dict(),
        "dataset": source,
        "skipped_nonfinite": state["skipped_nonfinite"],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(state["eval_seconds"], 1),
        "attention": attention,
    }
    if grouped:
        summary.update(train_groups=len(rows), train_responses=train_sequences)
    if heads > 1:  # what makes it an ensemble: do the heads differ, and how good is each
        numbers = ("accuracy", "min_accuracy", "head_accuracies", "disagreement")
        summary["heads"] = {
            "num_heads": heads,
            "head_bootstrap": cfg.head_bootstrap,
            "eval": {n: {k: r[k] for k in numbers} for n, r in state.get("last_evals", {}).items()},
        }
    accelerator.wait_for_everyone()
    # A collective (sharded or under accelerate's FSDP): every rank must call it.
    full_state = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if is_main:
        unwrapped.save_pretrained(out / "final", tokenizer=tokenizer, state_dict=full_state)
        if "last_evals" in state:
            last = {
                n: {**r, "margins": state["last_evals_margins"][n]} for n, r in state["last_evals"].items()
            }
            summary["report"] = str(
                write_report(
                    last,
                    out / "eval",
                    model=str(out / "final"),
                    before=state.get("accuracies_before"),
                    history=history,
                )["json"]
            )
        keys = ["loss", "accuracy", "margin", "eval_accuracy"]
        keys += [f"eval_accuracy/{name}" for name in eval_sets if name != main_set]
        keys += ["disagreement"] if heads > 1 else []
        summary["plot"] = str(plot_metrics(out, [*keys, "lr", "grad_norm"], title=cfg.stage))
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        for name, acc in (summary["accuracies_after"] or {}).items():
            acc_before = (summary["accuracies_before"] or {}).get(name)
            accelerator.print(
                f"{cfg.stage}: held-out accuracy on {name} {_pct(acc_before)} -> {_pct(acc)} "
                f"({len(eval_sets[name])} pairs)"
            )
    summary.setdefault("seconds", round(time.perf_counter() - started, 1))
    logger.close()
    accelerator.wait_for_everyone()
    return summary


def _history_entry(
    step: int, epoch: float, results: dict[str, dict[str, Any]], main_set: str | None
) -> dict[str, Any]:
    """One point of the eval curve: ``accuracy`` of the main held-out set, ``accuracies`` of every set."""
    accuracies = {name: r["accuracy"] for name, r in results.items()}
    return {"step": step, "epoch": epoch, "accuracy": accuracies.get(main_set), "accuracies": accuracies}
