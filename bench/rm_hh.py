"""Reward model on real HH-RLHF pairs: align's loop and TRL's RewardTrainer, same pairs, same budget.

    python bench/rm_hh.py --pairs 160 --eval-pairs 128 --max-length 256 --steps 20 --batch 8 \\
        --micro-batch 4 --lr 2e-5 --device cpu --out bench/results/rm_hh_cpu.json

Both sides train SmolLM2-135M-Instruct (offline, `align.assets`) with a new scalar head on the first
``--pairs`` pairs of ``../shared/data/hh-rlhf/harmless-base-pairs.jsonl.gz`` whose two ChatML sequences
fit in ``--max-length`` tokens (so neither side truncates), for ``--steps`` optimiser steps of
``--batch`` pairs, AdamW (0.9, 0.95), no weight decay, clipping 1.0, a constant learning rate ``--lr``.
Both are then scored on the first ``--eval-pairs`` such pairs of ``harmless-base-heldout.jsonl.gz``
(held out: never trained or tuned on). The prompt carries SmolLM2's default system message explicitly,
so that both sides see the same tokens: align reads the reward at the ``<|im_end|>`` closing the reply;
TRL's sequence-classification head reads it at the last token that is not the pad token.

Writes one JSON with, per side: training wall time, pairs/s, tokens/s, final loss, held-out accuracy
and the scoring time. ``--sides`` runs one side only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf"
sys.path.insert(0, str(ROOT))  # bench.common, as the other bench scripts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/rm_hh.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=160, help="training pairs (first that fit max-length)")
    p.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs scored after training")
    p.add_argument("--max-length", type=int, default=256, help="longest sequence in tokens (pairs filtered)")
    p.add_argument("--steps", type=int, default=0, help="optimiser steps (0: one epoch = pairs // batch)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimiser step")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    p.add_argument("--lr", type=float, default=2e-5, help="constant learning rate")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sides", default="align,trl", help="comma-separated: align, trl")
    p.add_argument("--train-file", default=str(DATA / "harmless-base-pairs.jsonl.gz"))
    p.add_argument("--eval-file", default=str(DATA / "harmless-base-heldout.jsonl.gz"))
    p.add_argument("--out", default="bench/results/rm_hh.json")
    return p.parse_args(argv)


def select_pairs(path: str, n: int, tokenizer, max_length: int, system: str) -> tuple[list[dict], dict]:
    """The first `n` well-formed pairs of `path` whose chosen and rejected sequences, with the chat
    template's closing newline (which TRL keeps), fit in `max_length` tokens."""
    from align.data import encode_scored, load_preference

    pairs, report = load_preference(path, skip_bad=True)
    chosen_pairs, lengths = [], []
    for pair in pairs:
        prompt = [{"role": "system", "content": system}, *pair["prompt"]]
        ids = [encode_scored([*prompt, *pair[s]], tokenizer) for s in ("chosen", "rejected")]
        if max(len(i) for i in ids) + 1 > max_length:
            continue
        chosen_pairs.append({**pair, "prompt": prompt})
        lengths += [len(i) for i in ids]
        if len(chosen_pairs) == n:
            break
    if len(chosen_pairs) < n:
        raise SystemExit(f"{path}: only {len(chosen_pairs)} pairs fit in {max_length} tokens, {n} asked")
    info = {
        "file": path,
        "read": report.read,
        "bad_records_skipped": report.skipped,
        "pairs": len(chosen_pairs),
        "mean_tokens_per_sequence": round(sum(lengths) / len(lengths), 1),
        "tokens": sum(lengths),
    }
    return chosen_pairs, info


def run_align(args, model_dir: str, train: list[dict], held: list[dict], work: Path) -> dict:
    from align.config import RMConfig
    from align.tasks import write_jsonl
    from align.tracking import read_metrics
    from align.train.reward import train_reward_model

    train_path = write_jsonl(work / "train.jsonl", train)
    held_path = write_jsonl(work / "heldout.jsonl", held)
    cfg = RMConfig(
        stage="rm",
        model_name_or_path=model_dir,
        dataset=str(train_path),
        eval_dataset=str(held_path),
        output_dir=str(work / "align-out"),
        max_length=args.max_length,
        batch_size=args.batch,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        eval_before=False,
        eval_micro_batch_size=8,
        save_steps=0,
        save_total_limit=1,
        seed=args.seed,
        report_to=["none"],
        progress=False,
    )
    start = time.perf_counter()
    summary = train_reward_model(cfg)
    wall = time.perf_counter() - start
    step_seconds = [r["step_seconds"] for r in read_metrics(cfg.output_dir)]
    tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in _tokenized(train, model_dir, args))
    train_s = summary["train_seconds"]
    pairs_seen = args.steps * args.batch
    return {
        "train_seconds": train_s,
        "median_step_seconds": round(statistics.median(step_seconds), 2),
        "pairs_per_s": round(pairs_seen / train_s, 3),
        "tokens_per_s": round(tokens * pairs_seen / len(train) / train_s, 1),
        "final_loss": summary["final_loss"],
        "heldout_accuracy": summary["accuracy_after"],
        "eval_seconds": summary["eval_seconds"],
        "wall_seconds_incl_load_eval_save": round(wall, 1),
        "heldout": {
            k: v
            for k, v in json.loads(Path(summary["report"]).read_text())["datasets"]["heldout"].items()
            if k in ("pairs", "correct", "ties", "mean_margin", "length_bias")
        },
    }


def _tokenized(pairs, model_dir, args):
    from align.data import tokenize_preference
    from align.models import load_tokenizer

    return tokenize_preference(pairs, load_tokenizer(model_dir), max_length=args.max_length)


def run_trl(args, model_dir: str, train: list[dict], held: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from align.models import load_tokenizer
    from bench import common  # imports torch: only after main() has picked the device

    def to_trl(pairs):
        return Dataset.from_list(
            [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
        )

    cuda = args.device == "cuda"
    peer = {
        **common.peer_args(args.device),
        # Where this run differs from the synthetic side-by-side peers: its own learning rate and seed,
        # whole batches only, the loss logged every step, and TRL's default progress bars. Gradient
        # checkpointing stays off as on our side (RewardConfig's default turns it on; the CPU figures of
        # 2026-11-23 were measured with it on, which made TRL recompute its forward pass).
        "learning_rate": args.lr,
        "seed": args.seed,
        "dataloader_drop_last": True,
        "logging_steps": 1,
        "disable_tqdm": None,
    }
    config = RewardConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch,
        per_device_eval_batch_size=8,
        max_steps=args.steps,
        max_length=args.max_length,
        **peer,
    )
    tokenizer = load_tokenizer(model_dir)
    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - self.t0)

    trainer = RewardTrainer(
        model=model_dir,
        args=config,
        train_dataset=to_trl(train),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    kept = len(trainer.train_dataset)
    start = time.perf_counter()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    start = time.perf_counter()
    metrics = trainer.evaluate(to_trl(held))
    eval_s = time.perf_counter() - start
    pairs_seen = args.steps * args.batch
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_seconds": round(train_s, 1),
        "median_step_seconds": round(statistics.median(step_seconds), 2),
        "pairs_per_s": round(pairs_seen / train_s, 3),
        "tokens_per_s": round(tokens * pairs_seen / kept / train_s, 1),
        "final_loss": losses[-1] if losses else result.training_loss,
        "heldout_accuracy": metrics["eval_accuracy"],
        "eval_seconds": round(eval_s, 1),
        "train_pairs_after_trl_filter": kept,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: both sides on the CPU
    import torch

    from align.assets import SMOLLM2_DEFAULT_SYSTEM, resolve_model
    from align.models import load_tokenizer

    if args.steps <= 0:
        args.steps = args.pairs // args.batch
    if args.batch % args.micro_batch or args.eval_pairs % 8:
        raise SystemExit("--batch must be a multiple of --micro-batch, and --eval-pairs of 8")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    train, train_info = select_pairs(
        args.train_file, args.pairs, tokenizer, args.max_length, SMOLLM2_DEFAULT_SYSTEM
    )
    held, held_info = select_pairs(
        args.eval_file, args.eval_pairs, tokenizer, args.max_length, SMOLLM2_DEFAULT_SYSTEM
    )
    results = {
        "command": "python bench/rm_hh.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "budget": {
            "pairs": args.pairs,
            "steps": args.steps,
            "batch": args.batch,
            "micro_batch": args.micro_batch,
            "lr": args.lr,
            "max_length": args.max_length,
            "epochs": round(args.steps * args.batch / args.pairs, 3),
        },
        "train_data": train_info,
        "heldout_data": held_info,
        "environment": {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "trl": __import__("trl").__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            work = Path(tmp) / side
            work.mkdir()
            print(
                f"--- {side}: {args.steps} steps x {args.batch} pairs, lr {args.lr}, on {args.device}",
                flush=True,
            )
            run = {"align": run_align, "trl": run_trl}[side]
            results[side] = run(args, model_dir, train, held, work)
            print(json.dumps({side: results[side]}, indent=2), flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            gc.collect()
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
