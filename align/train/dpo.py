"""Offline DPO (Qwen2/2.5) on preference pairs: the whole loop, on accelerate.

* Data: every preference format the reward model reads (`align.data.load_preference`), tokenised as
  ChatML with labels on the final assistant reply and its <|im_end|> only (`chatml.encode_conversation`,
  train_on="last_assistant"); a pair longer than max_length is skipped and counted, never truncated.
* One forward pass per micro-batch: its chosen and rejected sequences are packed into one padding-free
  row (`align.train.sft.packed_row`: positions restart per sequence, no attention across them), logits
  are built only at response positions, and per-sequence log-prob sums come from one segment sum.
* The reference: its log-probs are computed once, in one pass over the data, before training, and cached
  on disk under a key made of a fingerprint of the reference (its config and weight files, and the dtype)
  and of the tokenised pairs. A second run with the same reference and data reads the cache and never
  loads the reference model; a change to either makes a new key. With LoRA the reference is the policy
  with its adapter disabled (no second copy of the weights).
* Loss: `align.losses.dpo_loss` (sigmoid, robust, hinge, ipo; label smoothing), plus an optional RPO NLL
  term on the chosen responses. Batch means are taken over the global batch, whatever the split into
  micro-batches and processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig

import chatml
from align.assets import resolve_model, start_model
from align.attention import resolve_attn_implementation
from align.config import DPOConfig
from align.data import DataError, DataReport, load_preference
from align.losses import dpo_loss
from align.models import announce_attention, load_causal_lm, save_final_model
from align.packing import check_packed_attention
from align.tracking import plot_metrics
from align.train.batching import BatchPlan, global_batch_indices, total_steps
from align.train.checkpointing import fingerprint_rows
from align.train.optim_step import optimizer_step
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir
from align.train.rl_common import load_frozen_lm
from align.train.run_start import start_single_model_run
from align.train.sft import (
    packed_logprobs,
    packed_row,
    record_accuracy_after,
    record_accuracy_before,
    trained_tokens,
)
from align.train.sharding import full_state_dict, grad_sync, is_sharded, wants_sharding

CACHE_VERSION = "dpo-ref-logps-v1"


# ---------------------------------------------------------------------------------------------------
# Data


def load_dpo_pairs(cfg: DPOConfig, out: Path, is_main: bool) -> tuple[list[dict[str, Any]], DataReport, str]:
    """Preference pairs from `cfg.dataset`; `embedded` writes generated comparisons first."""
    source = cfg.dataset
    if source == "embedded":
        from align.tasks import generate_tasks, preference_pairs, write_jsonl

        path = out / "data" / "train.jsonl"
        if is_main and not path.exists():
            tasks = generate_tasks(cfg.embedded_pairs, cfg.seed + 2, split="train")
            write_jsonl(
                path, preference_pairs(tasks, cfg.seed, format_error_rate=cfg.embedded_format_error_rate)
            )
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        source = str(path)
    rejects = out / "rejects.jsonl" if cfg.skip_bad else None
    pairs, report = load_preference(
        source, skip_bad=cfg.skip_bad, rejects_path=rejects, format=cfg.dataset_format
    )
    return pairs, report, source


def tokenize_dpo_pairs(
    pairs: list[dict[str, Any]], tokenizer: Any, *, max_length: int | None, default_system: str | None = None
) -> tuple[list[dict[str, dict[str, list[int]]]], int]:
    """`{"chosen": {input_ids, labels}, "rejected": {...}}` per pair, labels on the last reply + <|im_end|>.

    Returns the examples and how many pairs were skipped (a side longer than max_length, or nothing
    to train on).
    """
    examples, skipped = [], 0
    for pair in pairs:
        ex = {}
        for side in ("chosen", "rejected"):
            enc = chatml.encode_conversation(
                [*_turns(pair["prompt"], "user"), *_turns(pair[side], "assistant")],
                tokenizer,
                train_on="last_assistant",
                default_system=default_system,
                tools=pair.get("tools"),  # a reply may be a tool call: render the pair's tool definitions
            )
            ex[side] = {"input_ids": enc["input_ids"], "labels": enc["labels"]}
        too_long = max_length is not None and max(len(ex[s]["input_ids"]) for s in ex) > max_length
        if too_long or not all(trained_tokens(ex[s]) for s in ex):
            skipped += 1
            continue
        examples.append(ex)
    return examples, skipped


def _turns(value: str | list[dict[str, str]], role: str) -> list[dict[str, str]]:
    """Message list of a pair field; a bare string is one turn of `role` (`align.tasks.preference_pairs`)."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def dpo_fingerprint(examples: list[dict[str, dict[str, list[int]]]]) -> str:
    rows = [
        {f"{s}_{k}": ex[s][k] for s in ("chosen", "rejected") for k in ("input_ids", "labels")}
        for ex in examples
    ]
    return fingerprint_rows(
        rows, keys=("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    )


# ---------------------------------------------------------------------------------------------------
# Forward passes


def sequence_logps(
    model: Any, sequences: list[dict[str, list[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of trained-token log-probs from one padding-free packed forward pass.

    Args:
        sequences: S tokenised sequences (`input_ids`, `labels` with -100 on untrained tokens).
    Returns:
        logps (S,) fp32 sums over each sequence's trained tokens, and their counts (S,).
    """
    token_lp = packed_logprobs(model, packed_row(sequences, device))
    counts = torch.tensor([trained_tokens(s) for s in sequences], device=device)
    segment = torch.repeat_interleave(torch.arange(len(sequences), device=device), counts)
    sums = torch.zeros(len(sequences), device=device, dtype=token_lp.dtype).index_add(0, segment, token_lp)
    return sums, counts


def pair_logps(
    model: Any, pairs: list[dict[str, dict[str, list[int]]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen token counts, rejected token counts), all (B,), one pass."""
    sums, counts = sequence_logps(
        model, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], device
    )
    b = len(pairs)
    return sums[:b], sums[b:], counts[:b], counts[b:]


@torch.no_grad()
def compute_reference_logps(
    model: Any, examples: list[dict[str, dict[str, list[int]]]], batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Reference log-prob sums of every pair, `{"chosen": (N,), "rejected": (N,)}` fp32 on the CPU."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(examples), batch_size):
            c, r, _, _ = pair_logps(model, examples[start : start + batch_size], device)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    finally:
        model.train(was_training)
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


# ---------------------------------------------------------------------------------------------------
# The reference cache


def model_fingerprint(path: str | Path, dtype: str = "float32") -> str:
    """A hash of a model directory's config and weight files (contents), and the dtype it runs in."""
    path = Path(path)
    digest = hashlib.sha256(f"{CACHE_VERSION}:{dtype}".encode())
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".gguf"))
    )
    if not any(p.name != "config.json" for p in files):
        raise RunSetupError(f"{path}: no weight files to fingerprint the reference model by")
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def reference_cache_path(cache_dir: str | Path, reference_fp: str, data_fp: str) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}:{reference_fp}:{data_fp}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"ref-logps-{key}.pt"


def load_or_compute_reference(
    cache_file: Path, compute: Any, *, expected: int, is_main: bool, wait: Any
) -> tuple[dict[str, torch.Tensor], bool]:
    """Read the cached reference log-probs, or run `compute()` on the main process and write them
    atomically. Returns (log-probs, whether the cache was hit)."""
    hit = cache_file.is_file()
    if not hit and is_main:
        values = compute()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(values, tmp)
        os.replace(tmp, cache_file)
    wait()
    values = torch.load(cache_file, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    if values["chosen"].numel() != expected or values["rejected"].numel() != expected:
        raise RunSetupError(
            f"{cache_file}: holds {values['chosen'].numel()} pairs, expected {expected}; delete it"
        )
    return values, hit


# ---------------------------------------------------------------------------------------------------
# The loop


def run_dpo(cfg: DPOConfig, *, stop_after_step: int | None = None) -> dict[str, Any]:
    """Train, checkpoint and save per `cfg`; return the run summary (also written to summary.json).

    `stop_after_step` ends the run early after that step's checkpoint, as a kill would (for tests).
    """
    t_start = time.perf_counter()
    accelerator = make_accelerator(cfg)
    is_main, device = accelerator.is_main_process, accelerator.device
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=is_main, stage="dpo")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    plan = BatchPlan(cfg.batch_size, cfg.micro_batch_size, accelerator.num_processes)
    start_name = start_model(cfg.model_name_or_path)
    model_cfg = cfg if start_name == cfg.model_name_or_path else _replace(cfg, model_name_or_path=start_name)
    try:  # every forward pass packs a micro-batch's chosen and rejected sequences into one row
        check_packed_attention(
            cfg.attn_implementation,
            packs=True,
            passes_document_kwargs=True,
            what="DPO: one row per micro-batch",
        )
    except ValueError as err:
        raise RunSetupError(str(err)) from err
    model, tokenizer = load_causal_lm(model_cfg)
    accelerator.print(f"policy: {start_name}")
    attention = announce_attention(
        model.config, cfg, device=device, mixed_precision=accelerator.mixed_precision,
        say=accelerator.print, warn=is_main,
    )  # fmt: skip

    pairs, report, source = load_dpo_pairs(cfg, out, is_main)
    examples, skipped = tokenize_dpo_pairs(
        pairs, tokenizer, max_length=cfg.max_length, default_system=cfg.default_system
    )
    if skipped:
        report.notes[f"pairs longer than max_length={cfg.max_length} (or empty), skipped"] = skipped
    if not examples:
        raise DataError(f"{source}: no pair fits max_length={cfg.max_length}")
    steps_per_epoch, num_steps = total_steps(cfg, len(examples))
    data_fp = dpo_fingerprint(examples)
    if is_main:
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        accelerator.print(report.summary())
        accelerator.print(
            f"{len(examples)} pairs ({skipped} skipped), {steps_per_epoch} steps per epoch, {num_steps} steps, "
            f"batch {cfg.batch_size} pairs = {plan.accumulation_steps} x {cfg.micro_batch_size} x "
            f"{accelerator.num_processes} process(es)"
        )

    # Reference log-probs: cached on disk, keyed by the reference and the data.
    t0 = time.perf_counter()
    adapter_ref = cfg.use_lora and cfg.ref_model_path is None
    ref_path = resolve_model(start_name if cfg.ref_model_path is None else cfg.ref_model_path)
    # The reference runs the policy's attention setting, not transformers' default: it scores the same
    # packed rows, through a path the check allowed. In the key: another kernel rounds differently.
    ref_attn = model.config._attn_implementation
    if not adapter_ref:
        ref_config = AutoConfig.from_pretrained(ref_path, trust_remote_code=cfg.trust_remote_code)
        ref_attn = resolve_attn_implementation(cfg.attn_implementation, ref_config)
    ref_fp = model_fingerprint(ref_path, cfg.ref_dtype) + (":adapter-off" if adapter_ref else "")
    ref_fp += f":{ref_attn}"
    cache_file = reference_cache_path(cfg.ref_cache_dir or out / "ref_cache", ref_fp, data_fp)

    def compute() -> dict[str, torch.Tensor]:
        accelerator.print(f"reference log-probs: one pass over {len(examples)} pairs ({ref_path})")
        if adapter_ref:
            model.to(device)
            with model.disable_adapter():
                return compute_reference_logps(model, examples, cfg.ref_batch_size, device)
        dtype = torch.bfloat16 if cfg.ref_dtype == "bfloat16" else torch.float32
        reference = load_frozen_lm(ref_path, dtype, cfg.trust_remote_code).to(device)
        reference.set_attn_implementation(ref_attn)
        try:
            return compute_reference_logps(reference, examples, cfg.ref_batch_size, device)
        finally:
            del reference

    ref_logps, hit = load_or_compute_reference(
        cache_file, compute, expected=len(examples), is_main=is_main, wait=accelerator.wait_for_everyone
    )
    t_ref = time.perf_counter() - t0
    accelerator.print(
        f"reference log-probs {'read from cache' if hit else 'computed and cached'}: {cache_file} ({t_ref:.1f} s)"
    )

    run = start_single_model_run(
        accelerator, model, cfg, out, num_steps, data_fp, shard=wants_sharding(cfg), start_model=start_name
    )
    model, unwrapped, optimizer, scheduler = run.model, run.unwrapped, run.optimizer, run.scheduler
    start_step, saved, logger = run.start_step, run.saved, run.logger
    state: dict[str, Any] = {"skipped_nonfinite": 0, **(saved or {})}
    embedded_eval = cfg.dataset == "embedded" and cfg.eval_tasks > 0
    if embedded_eval and is_main:
        record_accuracy_before(state, unwrapped, tokenizer, cfg, accelerator.print)

    model.train()
    bar = tqdm(total=num_steps, initial=start_step, desc="dpo", disable=not (is_main and cfg.progress))
    ipo = cfg.loss_type == "ipo"
    last: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    t_train = time.perf_counter()
    for step in range(start_step, num_steps):
        indices = global_batch_indices(step, len(examples), cfg.batch_size, cfg.seed)
        chosen_tokens = sum(trained_tokens(examples[i]["chosen"]) for i in indices)
        micro_batches = plan.local_micro_batches(indices, accelerator.process_index)
        acc: dict[str, list[torch.Tensor]] = {}
        loss_sum = torch.zeros((), device=device)
        for k, micro in enumerate(micro_batches):
            batch = [examples[i] for i in micro]
            sync = grad_sync(accelerator, model, sync=k == len(micro_batches) - 1)
            with sync, accelerator.autocast():
                pc, pr, nc, nr = pair_logps(model, batch, device)
                rc, rr = (ref_logps[s][micro].to(device) for s in ("chosen", "rejected"))
                if ipo:  # IPO works on per-token mean log-probs
                    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
                loss, stats = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
                # The micro-batch mean, weighted so the micro-batches of all processes sum to the global mean.
                loss = loss * len(micro) / plan.per_process
                if cfg.rpo_alpha > 0:
                    chosen_sums = pc * nc if ipo else pc
                    nll = -chosen_sums.sum() / (chosen_tokens / accelerator.num_processes)
                    loss = loss + cfg.rpo_alpha * nll
                    _acc(acc, nll_sum=-chosen_sums.detach().sum().reshape(1))
                accelerator.backward(loss)
            loss_sum += loss.detach()  # this process's mean; the mean over processes is the global one
            _acc(
                acc,
                chosen_rewards=stats["chosen_rewards"],
                rejected_rewards=stats["rejected_rewards"],
                logps_chosen=pc.detach(),
                logps_rejected=pr.detach(),
            )
        total_loss = accelerator.reduce(loss_sum, reduction="mean").item()
        grad_norm = optimizer_step(
            accelerator, model, optimizer, max_grad_norm=cfg.max_grad_norm, counts=state,
            checkpointer=run.checkpointer, step=step + 1, scheduler=scheduler, loss=total_loss,
        )  # fmt: skip
        done = step + 1
        gathered = {k: accelerator.gather(torch.cat(v)) for k, v in acc.items()}
        chosen_r, rejected_r = gathered["chosen_rewards"], gathered["rejected_rewards"]
        metrics = {
            "loss": total_loss,
            "rewards_chosen": chosen_r.mean().item(),
            "rewards_rejected": rejected_r.mean().item(),
            "rewards_margin": (chosen_r - rejected_r).mean().item(),
            "rewards_accuracy": (chosen_r > rejected_r).float().mean().item(),
            "logps_chosen": gathered["logps_chosen"].mean().item(),
            "logps_rejected": gathered["logps_rejected"].mean().item(),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "epoch": done / steps_per_epoch,
            "skipped_nonfinite": state["skipped_nonfinite"],
        }
        if "nll_sum" in gathered:
            metrics["nll"] = gathered["nll_sum"].sum().item() / chosen_tokens
        last = metrics
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.4f}", acc=f"{metrics['rewards_accuracy']:.2f}")
        window_steps += 1
        if done % cfg.logging_steps == 0 or done == num_steps:
            # The steps since the last log: fewer than logging_steps at the end and after a resume.
            metrics["pairs_per_s"] = (
                cfg.batch_size * window_steps / max(time.perf_counter() - window_start, 1e-9)
            )
            logger.log(metrics, step=done)
            window_start, window_steps = time.perf_counter(), 0
        if run.checkpointer.end_of_step(done, num_steps, lambda step: run.save(step, state), stop_after_step):
            bar.close()
            logger.close()
            return {"stopped_at": done}
    bar.close()
    t_train = time.perf_counter() - t_train

    summary: dict[str, Any] = {
        "stage": "dpo",
        "output_dir": str(out),
        "final_model": str(out / "final"),
        "metrics": str(out / "metrics.jsonl"),
        "policy": start_name,
        "steps": num_steps,
        "pairs": len(examples),
        "pairs_skipped": skipped,
        "skipped_nonfinite": state["skipped_nonfinite"],
        "dataset": source,
        "reference_cache": str(cache_file),
        "reference_cache_hit": hit,
        "attention": attention,
        "time_reference_s": round(t_ref, 2),
        "time_training_s": round(t_train, 2),
        "last": {k: v for k, v in last.items() if isinstance(v, int | float)},
    }
    accelerator.wait_for_everyone()
    # A collective (sharded or under accelerate's FSDP): every rank must call it.
    full_state = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if is_main:
        if embedded_eval:  # before saving: merging LoRA weights for the final save alters the model
            record_accuracy_after(summary, state, unwrapped, tokenizer, cfg, accelerator.print)
        save_final_model(unwrapped, tokenizer, out / "final", state_dict=full_state)
        summary["plot"] = str(
            plot_metrics(out, ["loss", "rewards_margin", "rewards_accuracy", "logps_chosen"], title="DPO")
        )
        summary["time_total_s"] = round(time.perf_counter() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.close()
    accelerator.wait_for_everyone()
    return summary


def _replace(cfg: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def _acc(acc: dict[str, list[torch.Tensor]], **values: torch.Tensor) -> None:
    for key, value in values.items():
        acc.setdefault(key, []).append(value.detach().float().reshape(-1))
