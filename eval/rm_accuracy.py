"""Pairwise accuracy of a reward model on preference data sets.

    python eval/rm_accuracy.py --model outputs/rm/rm/final --data pairs.jsonl [more.jsonl ...] --out DIR

Prints, and writes into DIR: ``report.json`` (``accuracy`` per data set, and per data set every
number), ``report.md`` (accuracy, ties, mean and median margin, unclosed responses, and a length-bias
line: accuracy when the chosen response is the longer one vs the shorter one) and ``margins.png``
(a histogram of r(chosen) - r(rejected) per data set). Any preference format `align` reads works
(pair, hh, sharegpt, oasst). Exit status: 0, or 2 for unusable input (a message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from align.data import DataError, load_preference, tokenize_preference
from align.evaluation.reward_model import evaluate_pairs, format_result, write_report
from align.reward import load_reward_model
from align.train.reward_data import dataset_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/rm_accuracy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a reward model directory (a run's final/)")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE", help="preference data files")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where report.json/.md and margins.png go"
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="truncate sequences (default: as in training)"
    )
    parser.add_argument("--truncation-side", default="left", choices=["left", "right"])
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    parser.add_argument("--format", default=None, help="force a preference record format")
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed pairs instead of stopping")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model_dir = Path(args.model)
    try:
        model, tokenizer = load_reward_model(model_dir)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: --model {model_dir}: {err}", file=sys.stderr)
        return 2
    model.to(args.device)
    max_length = args.max_length or model.config.max_length
    results, names = {}, {}
    start = time.perf_counter()
    for path in args.data:
        name = dataset_name(path)
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name}-{names[name]}"
        try:
            pairs, report = load_preference(path, skip_bad=args.skip_bad, format=args.format)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        examples = tokenize_preference(
            pairs,
            tokenizer,
            max_length=max_length,
            end_token=model.config.end_token,
            default_system=model.config.default_system,
            truncation_side=args.truncation_side,
            report=report,
        )
        if not examples:
            print(f"error: {path}: no pairs to score", file=sys.stderr)
            return 2
        results[name] = evaluate_pairs(model, examples, micro_batch_size=args.batch_size, device=args.device)
        results[name]["source"] = str(path)
        results[name]["skipped_bad"] = report.skipped
        results[name]["truncated"] = report.truncated
        print(format_result(name, results[name]))
    paths = write_report(
        results, args.out, model=str(model_dir), extra={"seconds": round(time.perf_counter() - start, 1)}
    )
    print(json.dumps({"accuracy": {k: round(v["accuracy"], 4) for k, v in results.items()}}))
    print(f"report: {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
