"""``python -m align.data validate FILE...``: check data files and print a summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from align.data.loading import load_preference, load_records
from align.data.records import _FORMATS, DataSourceError, formats
from align.data.tokenize import tokenize_preference, tokenize_sft


def _load_tokenizer(spec: str) -> Any:
    if spec == "qwen":
        try:
            import chatml
        except ImportError as e:
            raise DataSourceError(f"--tokenizer qwen needs the chatml package: {e}") from e
        return chatml.qwen_tokenizer()
    if not Path(spec).exists():
        raise DataSourceError(f"--tokenizer {spec}: no such directory (use 'qwen' or a local tokenizer path)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:  # transformers raises many types for an unusable directory
        raise DataSourceError(f"--tokenizer {spec}: cannot load: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m align.data validate FILE...``: exit 0 when clean, 1 if any record is bad, 2 on usage
    errors."""
    parser = argparse.ArgumentParser(prog="python -m align.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check data files and print a summary")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--kind", default="sft", choices=sorted(_FORMATS))
    v.add_argument("--format", default=None, help="force a record format (default: detect per record)")
    v.add_argument("--tokenizer", default=None, help="'qwen' or a local tokenizer directory")
    v.add_argument("--max-length", type=int, default=None)
    v.add_argument("--train-on", default="all_assistant", choices=["all_assistant", "last_assistant"])
    v.add_argument("--rejects", default=None, metavar="PATH", help="write bad records to this JSONL file")
    v.add_argument("--show", type=int, default=50, metavar="N", help="list at most N bad records")
    args = parser.parse_args(argv)

    known = formats(args.kind)
    if args.format is not None and args.format not in known:
        parser.error(f"--format {args.format}: unknown {args.kind} format (known: {', '.join(known)})")
    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be positive")
    try:
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        load = load_preference if args.kind == "preference" else partial(load_records, kind=args.kind)
        values, report = load(args.files, skip_bad=True, rejects_path=args.rejects, format=args.format)
        if tokenizer is not None and args.kind == "sft":
            tokenize_sft(values, tokenizer, max_length=args.max_length, train_on=args.train_on, report=report)
        elif tokenizer is not None and args.kind == "preference":
            tokenize_preference(values, tokenizer, max_length=args.max_length, report=report)
    except DataSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for a user's data; say what failed and exit as usage error
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_bad=args.show))
    return 1 if report.skipped else 0
