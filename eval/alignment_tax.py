"""The alignment tax of a policy: held-out language-model loss (perplexity) and task accuracy, before and after.

    python eval/alignment_tax.py --policy outputs/ppo/final --baseline outputs/sft/final --out outputs/ppo/tax

"Before" is the baseline (the model the policy started from), "after" the policy. The LM loss is
token-weighted over rows of held-out pre-training-style text: by default the held-out split of the
standard-library docstrings, which PPO's ptx stream never trains on (``align/ptx.py``), or ``--text FILE``.
Task accuracy is greedy, judged by the gold verifier on held-out generated tasks. Writes ``tax.json`` and
``tax.md`` into ``--out``. Exit status: 0, or 2 for unusable input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from align.assets import AssetError
from align.data import DataError
from align.evaluation.generation import verifier_accuracy
from align.evaluation.policy import add_cli_args, check_cli_args, lm_loss, load_lm, tax_rows, write_report
from align.models import load_tokenizer
from align.tasks import generate_tasks, read_tasks_jsonl


def measure(path: str, tasks: list, text: str, max_rows: int, args: argparse.Namespace) -> dict:
    """LM loss / perplexity on the held-out rows and greedy task accuracy of one model."""
    from align.assets import resolve_model

    device = args.device or "cpu"
    directory = resolve_model(path)
    tokenizer = load_tokenizer(directory)
    model = load_lm(directory, device)
    lm = lm_loss(model, tax_rows(tokenizer, text, max_rows), batch_size=max(1, args.batch_size // 2))
    acc = verifier_accuracy(
        model, tokenizer, tasks, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_samples=0
    )
    return {"lm_loss": lm["loss"], "ppl": lm["ppl"], "tokens": lm["tokens"], "accuracy": acc["accuracy"],
            "per_kind": {k: v["accuracy"] for k, v in acc["per_kind"].items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/alignment_tax.py", description=__doc__.split("\n\n")[0])
    add_cli_args(parser, reward=False)
    parser.add_argument(
        "--text", default="embedded", help="held-out text: embedded, a JSONL of {text} or a .txt"
    )
    parser.add_argument("--max-rows", type=int, default=64, help="rows of 64 tokens of held-out text")
    args = parser.parse_args(argv)
    problem = check_cli_args(args)
    if problem is None and args.text != "embedded" and not Path(args.text).is_file():
        problem = f"--text {args.text}: no such file"
    if problem is None and args.max_rows < 1:
        problem = "--max-rows must be >= 1"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.prompts:
            tasks = read_tasks_jsonl(args.prompts)[: args.num_prompts]
        else:
            tasks = generate_tasks(args.num_prompts, seed=args.seed, split="heldout")
        before = measure(args.baseline, tasks, args.text, args.max_rows, args)
        after = measure(args.policy, tasks, args.text, args.max_rows, args)
    except (AssetError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {
        "policy": args.policy,
        "baseline": args.baseline,
        "text": args.text,
        "num_tasks": len(tasks),
        "before": before,
        "after": after,
        "delta_lm_loss": after["lm_loss"] - before["lm_loss"],
        "accuracy_delta": after["accuracy"] - before["accuracy"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    md = "\n".join([
        f"# Alignment tax: {args.policy} (after) vs {args.baseline} (before)",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
        f"| held-out LM loss (nats/token) | {before['lm_loss']:.4f} | {after['lm_loss']:.4f} | "
        f"{result['delta_lm_loss']:+.4f} |",
        f"| held-out perplexity | {before['ppl']:.2f} | {after['ppl']:.2f} | {after['ppl'] - before['ppl']:+.2f} |",
        f"| task accuracy ({len(tasks)} held-out tasks, greedy) | {100 * before['accuracy']:.1f}% | "
        f"{100 * after['accuracy']:.1f}% | {100 * result['accuracy_delta']:+.1f} points |",
        "",
        f"LM loss over {before['tokens']} predicted tokens of {args.text} held-out text (token-weighted). "
        "A positive LM-loss change or a negative accuracy change is a tax.",
        "",
    ])  # fmt: skip
    write_report(args.out, "tax", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
