"""Supervised fine-tuning on ChatML conversations: the whole loop, on accelerate.

Every micro-batch is fed to the model as one padding-free row: its conversations are concatenated,
position ids restart at each conversation, and transformers builds a block-diagonal causal mask from
them, so no token attends across conversations and no compute goes to padding. Logits are computed
only at trained positions (`logits_to_keep`), not over the full vocabulary for every prompt token.
The loss is the mean over the trained tokens of the whole global batch, whatever the split into
micro-batches and processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from align.attention import document_kwargs, lengths_from_positions
from align.config import SFTConfig
from align.data import DataReport, load_sft, tokenize_sft
from align.fused_logprobs import lm_logprobs
from align.losses import sft_loss_from_logprobs
from align.models import announce_attention, load_causal_lm, save_final_model
from align.packing import check_packed_attention, pack_examples
from align.tracking import plot_metrics
from align.train.batching import BatchPlan, global_batch_indices, total_steps
from align.train.checkpointing import fingerprint_rows
from align.train.optim_step import optimizer_step
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir
from align.train.run_start import start_single_model_run
from align.train.sharding import full_state_dict, grad_sync, is_sharded, wants_sharding


def packed_row(sequences: list[dict[str, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate tokenised sequences into one (1, T) row for a padding-free forward pass.

    Returns input_ids and position_ids (1, T), `keep` (1, T) bool marking positions whose next token is
    trained, `targets` (N,) those next tokens, and `documents`: the varlen kwargs of the row's documents
    (`align.attention.document_kwargs`, from the positions, so no per-layer re-derivation or host sync).
    Labels are shifted inside each sequence, so the last token of one conversation never predicts the
    first of the next.
    """
    ids, pos, targets = [], [], []
    for seq in sequences:
        ids.extend(seq["input_ids"])
        # A packed row carries its own restarting positions; a lone conversation starts at 0.
        pos.extend(seq.get("position_ids", range(len(seq["input_ids"]))))
        # Packed rows already mask the first label of each conversation, so no token is trained to
        # predict the start of the next conversation.
        targets.extend(seq["labels"][1:] + [-100])
    # Built on the CPU and copied without blocking: a copy from pageable memory (or a boolean index on
    # the GPU) would wait for the GPU's queue, one host sync per micro-batch.
    tgt = torch.tensor([targets], dtype=torch.long)
    keep = tgt != -100
    row = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "keep": keep,
        "targets": tgt[keep],
    }
    row = {k: _to_device(v, device) for k, v in row.items()}
    documents = document_kwargs(lengths_from_positions(pos), "cpu")
    row["documents"] = {k: _to_device(v, device) if torch.is_tensor(v) else v for k, v in documents.items()}
    return row


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def packed_logprobs(model: Any, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) log-probs of the trained targets of a `packed_row`, from one padding-free forward pass.

    Chunked over positions: the (trained tokens, vocabulary) logits are never built.
    """
    return lm_logprobs(
        model,
        row["targets"],
        input_ids=row["input_ids"],
        position_ids=row["position_ids"],
        logits_to_keep=row["keep"],
        use_cache=False,  # with a cache, transformers ignores the packed positions' boundaries
        **row.get("documents", {}),
    )


def check_sft_attention(cfg: SFTConfig) -> None:
    """Refuse an attention that would let a packed row's conversations see each other, before loading.

    A row holds several conversations with `packing`, and also without it when micro_batch_size > 1 (a
    micro-batch is one padding-free row); `packed_logprobs` passes the rows' varlen kwargs."""
    what = (
        "packing: true"
        if cfg.packing
        else f"micro_batch_size={cfg.micro_batch_size}: one row per micro-batch"
    )
    try:
        check_packed_attention(
            cfg.attn_implementation,
            packs=cfg.packing or cfg.micro_batch_size > 1,
            passes_document_kwargs=True,
            what=what,
        )
    except ValueError as err:
        raise RunSetupError(str(err)) from err


def trained_tokens(sequence: dict[str, list[int]]) -> int:
    """Tokens that carry loss (the first token never does: nothing predicts it)."""
    return sum(1 for label in sequence["labels"][1:] if label != -100)


def load_sft_data(cfg: SFTConfig, out: Path, is_main: bool) -> tuple[list[list[dict]], DataReport, str]:
    """Conversations from `cfg.dataset`; `embedded` writes the generated task set first."""
    source = cfg.dataset
    if source == "embedded":
        from align.tasks import write_sft_jsonl

        path = out / "data" / "train.jsonl"
        if is_main and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_sft_jsonl(path, cfg.embedded_train_tasks, cfg.seed)
        source = str(path)
    rejects = out / "rejects.jsonl" if cfg.skip_bad else None
    conversations, report = load_sft(
        source, skip_bad=cfg.skip_bad, rejects_path=rejects, format=cfg.dataset_format
    )
    return conversations, report, source


def heldout_tasks(cfg: Any) -> list[Any]:
    """The held-out generated tasks whose accuracy a run reports before and after training."""
    from align.tasks import generate_tasks

    return generate_tasks(cfg.eval_tasks, seed=cfg.seed, split="heldout")


def heldout_accuracy(model: torch.nn.Module, tokenizer: Any, cfg: SFTConfig) -> dict[str, Any]:
    """Gold-verifier accuracy on `heldout_tasks` (embedded data only)."""
    from align.evaluation.generation import verifier_accuracy

    tasks = heldout_tasks(cfg)
    was_training = model.training
    model.eval()
    try:
        result = verifier_accuracy(
            model,
            tokenizer,
            tasks,
            max_new_tokens=cfg.eval_max_new_tokens,
            default_system=cfg.default_system,
            show_progress=cfg.progress,
        )
    finally:
        model.train(was_training)
    return result


def record_accuracy_before(
    state: dict[str, Any], model: torch.nn.Module, tokenizer: Any, cfg: Any, say: Any = print
) -> None:
    """Held-out gold accuracy before training, measured once: it lives in the checkpointed `state`,
    so a resumed run does not measure the already-trained model as its "before"."""
    if "accuracy_before" not in state:
        say(f"held-out accuracy before training ({cfg.eval_tasks} generated tasks)...")
        result = heldout_accuracy(model, tokenizer, cfg)
        state["accuracy_before"] = result["accuracy"]
        # Per task, so the "after" figure can be tested against it pairwise (same tasks, McNemar).
        if "oks" in result:
            state["accuracy_before_oks"] = [int(ok) for ok in result["oks"]]


def record_accuracy_after(
    summary: dict[str, Any], state: dict[str, Any], model: torch.nn.Module, tokenizer: Any, cfg: Any,
    say: Any = print,
) -> None:  # fmt: skip
    """Held-out gold accuracy after training, beside the "before" figure, into the run's summary."""
    say(f"held-out accuracy after training ({cfg.eval_tasks} generated tasks)...")
    summary["accuracy_before"] = state.get("accuracy_before")
    result = heldout_accuracy(model, tokenizer, cfg)
    summary["accuracy_after"] = result["accuracy"]
    before_oks = state.get("accuracy_before_oks")
    test = ""
    if before_oks is not None and len(before_oks) == len(result.get("oks", ())):
        from align.evaluation.policy import conversation_id, paired_accuracy, paired_by_prompt

        before = [bool(x) for x in before_oks]
        summary["accuracy_test"] = t = paired_accuracy(before, result["oks"])
        test = (
            f" (95% CI {t['before_lo']:.1%}-{t['before_hi']:.1%} -> {t['after_lo']:.1%}-{t['after_hi']:.1%}; "
            f"change {t['delta']:+.1%} [{t['delta_lo']:+.1%}, {t['delta_hi']:+.1%}], {t['gained']} gained, "
            f"{t['lost']} lost, McNemar exact p = {t['p_mcnemar']:.3g})"
        )
        # The tasks heldout_accuracy asked: past ~100 of them some prompts repeat (small task kinds).
        ids = [conversation_id(task.messages) for task in heldout_tasks(cfg)]
        u = paired_by_prompt(ids, before, result["oks"])
        if u["repeats"]:
            summary["accuracy_test_by_prompt"] = u
            test += (
                f"; {u['n']} distinct prompts, each once: {u['gained']} gained, {u['lost']} lost, "
                f"p = {u['p_mcnemar']:.3g}"
            )
    say(
        f"held-out accuracy (gold verifier, {cfg.eval_tasks} tasks): "
        f"before {summary['accuracy_before']:.1%} -> after {summary['accuracy_after']:.1%}{test}"
    )


def run_sft(cfg: SFTConfig, *, stop_after_step: int | None = None) -> dict[str, Any]:
    """Train, checkpoint and save per `cfg`; return the run summary (also written to summary.json).

    `stop_after_step` ends the run early after that step's checkpoint, as a kill would (for tests).
    """
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=is_main, stage="sft")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    plan = BatchPlan(cfg.batch_size, cfg.micro_batch_size, accelerator.num_processes)

    check_sft_attention(cfg)
    model, tokenizer = load_causal_lm(cfg)
    attention = announce_attention(
        model.config, cfg, device=accelerator.device, mixed_precision=accelerator.mixed_precision,
        say=accelerator.print, warn=is_main,
    )  # fmt: skip
    conversations, report, source = load_sft_data(cfg, out, is_main)
    examples = tokenize_sft(
        conversations,
        tokenizer,
        max_length=cfg.max_length,
        train_on=cfg.train_on,
        default_system=cfg.default_system,
        report=report,
    )
    rows = pack_examples(examples, cfg.max_length) if cfg.packing else examples
    steps_per_epoch, num_steps = total_steps(cfg, len(rows))
    if is_main:
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        accelerator.print(report.summary())
        accelerator.print(
            f"{len(rows)} training rows ({'packed' if cfg.packing else 'one conversation each'}), "
            f"{steps_per_epoch} steps per epoch, {num_steps} steps, batch {cfg.batch_size} = "
            f"{plan.accumulation_steps} x {cfg.micro_batch_size} x {accelerator.num_processes} process(es)"
        )

    run = start_single_model_run(
        accelerator, model, cfg, out, num_steps, fingerprint_rows(rows), shard=wants_sharding(cfg)
    )
    model, unwrapped, optimizer, scheduler = run.model, run.unwrapped, run.optimizer, run.scheduler
    start_step, saved, logger = run.start_step, run.saved, run.logger
    state: dict[str, Any] = {"skipped_nonfinite": 0, **(saved or {})}
    embedded_eval = cfg.dataset == "embedded" and cfg.eval_tasks > 0
    if embedded_eval and is_main:
        record_accuracy_before(state, unwrapped, tokenizer, cfg, accelerator.print)

    model.train()
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc="sft",
        disable=not (is_main and cfg.progress),
        dynamic_ncols=True,
    )
    last_loss = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, num_steps):
        indices = global_batch_indices(step, len(rows), cfg.batch_size, cfg.seed)
        normalizer = sum(trained_tokens(rows[i]) for i in indices)
        if normalizer == 0:
            raise RunSetupError(f"step {step + 1}: the global batch has no trained token")
        micro_batches = plan.local_micro_batches(indices, accelerator.process_index)
        nll_sum = torch.zeros((), device=accelerator.device)
        for k, micro in enumerate(micro_batches):
            batch = packed_row([rows[i] for i in micro], accelerator.device)
            window_tokens += batch["input_ids"].numel()
            last = k == len(micro_batches) - 1
            # Gradients are all-reduced once per optimiser step, not once per micro-batch.
            sync = grad_sync(accelerator, model, sync=last)
            with sync, accelerator.autocast():
                logps = packed_logprobs(model, batch)
                # DDP (and FSDP's reduce-scatter) average gradients over processes; scale so their sum
                # is the global token mean.
                loss, stats = sft_loss_from_logprobs(logps, normalizer / accelerator.num_processes)
                accelerator.backward(loss)
            nll_sum += stats["nll_sum"]
        total_nll = accelerator.reduce(nll_sum, reduction="sum").item()
        # A non-finite step would poison the weights and Adam's moments: skipped, counted, said.
        grad_norm = optimizer_step(
            accelerator, model, optimizer, max_grad_norm=cfg.max_grad_norm, counts=state,
            checkpointer=run.checkpointer, step=step + 1, scheduler=scheduler, loss=total_nll,
        )  # fmt: skip
        last_loss = total_nll / normalizer
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if done % cfg.logging_steps == 0 or done == num_steps:
            elapsed = time.perf_counter() - window_start
            logger.log(
                {
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "trained_tokens": normalizer,
                    "tokens_per_s": window_tokens * accelerator.num_processes / max(elapsed, 1e-9),
                    "epoch": done / steps_per_epoch,
                    "skipped_nonfinite": state["skipped_nonfinite"],
                },
                step=done,
            )
            window_start, window_tokens = time.perf_counter(), 0
        if run.checkpointer.end_of_step(done, num_steps, lambda step: run.save(step, state), stop_after_step):
            bar.close()
            logger.close()
            return {"stopped_at": done}
    bar.close()

    summary: dict[str, Any] = {
        "stage": "sft",
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "metrics": str(out / "metrics.jsonl"),
        "steps": num_steps,
        "final_loss": last_loss,
        "data": report.to_dict(),
        "dataset": source,
        "skipped_nonfinite": state["skipped_nonfinite"],
        "attention": attention,
    }
    accelerator.wait_for_everyone()
    # A collective (sharded or under accelerate's FSDP): every rank must call it.
    full_state = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if is_main:
        if embedded_eval:  # before saving: merging LoRA weights for the final save alters the model
            record_accuracy_after(summary, state, unwrapped, tokenizer, cfg, accelerator.print)
        save_final_model(unwrapped, tokenizer, out / "final", state_dict=full_state)
        summary["plot"] = str(plot_metrics(out, ["loss", "lr", "grad_norm"], title="SFT"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.close()
    accelerator.wait_for_everyone()
    return summary
