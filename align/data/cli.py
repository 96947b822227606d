"""``python -m align.data validate FILE...``: check data files and print a summary.
``python -m align.data show FILE``: print examples as the model will see them, trained spans marked.
``python -m align.data merge-pairs FILE... --out OUT``: join sampled pair files, one group per prompt."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from align.data.groups import merge_grouped_pairs
from align.data.loading import load_preference, load_records
from align.data.records import _FORMATS, DataError, DataSourceError, formats
from align.data.tokenize import tokenize_preference, tokenize_sft

# Names of the offline Qwen tokenizer for --tokenizer, with the chat template each brings.
QWEN_SPECS = {"qwen": "qwen2", "qwen2": "qwen2", "qwen2.5": "qwen2.5"}
# What training uses when the config does not say (see the configs' default_system).
DEFAULT_SYSTEM = "template"


def _load_tokenizer(spec: str) -> Any:
    if spec in QWEN_SPECS:
        try:
            import chatml
        except ImportError as e:
            raise DataSourceError(f"--tokenizer {spec} needs the chatml package: {e}") from e
        return chatml.qwen_tokenizer(template=QWEN_SPECS[spec])
    if not Path(spec).exists():
        raise DataSourceError(
            f"--tokenizer {spec}: no such directory (use qwen, qwen2.5 or a local tokenizer path)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:  # transformers raises many types for an unusable directory
        raise DataSourceError(f"--tokenizer {spec}: cannot load: {e}") from e


def _marked(tokenizer: Any, ids: Sequence[int], trained: Sequence[bool], colour: bool) -> str:
    """The decoded ids with each run of trained tokens marked: green on a terminal, ``[[...]]`` otherwise."""
    opened, closed = ("\033[1;32m", "\033[0m") if colour else ("[[", "]]")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(list(ids[start:i]))
            out.append(f"{opened}{text}{closed}" if trained[start] else text)
            start = i
    return "".join(out)


def show(
    files: Sequence[str],
    tokenizer: Any,
    *,
    kind: str = "sft",
    n: int = 3,
    default_system: str | None = DEFAULT_SYSTEM,
    train_on: str = "all_assistant",
    colour: bool = False,
    out: TextIO = sys.stdout,
) -> None:
    """Print the first ``n`` examples of ``files`` as token text with trained spans marked (for
    preference data: each side, with the scored reply marked), and trained/total token counts."""
    if kind == "preference":
        pairs, _ = load_preference(files, skip_bad=True)
        examples = tokenize_preference(pairs[:n], tokenizer, max_length=None, default_system=default_system)
        for k, ex in enumerate(examples, 1):
            for side in ("chosen", "rejected"):
                ids, reply = ex[f"{side}_ids"], ex[f"{side}_len"]
                trained = [i >= len(ids) - reply for i in range(len(ids))]
                print(f"--- pair {k} {side}: reply {reply} / {len(ids)} tokens", file=out)
                print(_marked(tokenizer, ids, trained, colour), file=out)
        return
    convs, _ = load_records(files, kind=kind, skip_bad=True)
    examples = tokenize_sft(
        convs[:n], tokenizer, max_length=None, train_on=train_on, default_system=default_system
    )
    for k, ex in enumerate(examples, 1):
        trained = [label != -100 for label in ex["labels"]]
        print(f"--- example {k}: trained {sum(trained)} / {len(trained)} tokens", file=out)
        print(_marked(tokenizer, ex["input_ids"], trained, colour), file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m align.data validate FILE...``: exit 0 when clean, 1 if any record is bad, 2 on usage
    errors. ``show``: exit 0, or 2 on usage errors."""
    parser = argparse.ArgumentParser(prog="python -m align.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check data files and print a summary")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--kind", default="sft", choices=sorted(_FORMATS))
    v.add_argument("--format", default=None, help="force a record format (default: detect per record)")
    v.add_argument("--tokenizer", default=None, help="qwen (Qwen2 template), qwen2.5, or a local directory")
    v.add_argument("--max-length", type=int, default=None)
    v.add_argument("--train-on", default="all_assistant", choices=["all_assistant", "last_assistant"])
    v.add_argument("--rejects", default=None, metavar="PATH", help="write bad records to this JSONL file")
    v.add_argument("--show", type=int, default=50, metavar="N", help="list at most N bad records")
    s = sub.add_parser("show", help="print examples as the model will see them, trained spans marked")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--kind", default="sft", choices=sorted(_FORMATS))
    s.add_argument("--n", type=int, default=3, help="how many examples (default 3)")
    s.add_argument("--tokenizer", default="qwen2.5", help="qwen2.5 (default), qwen, or a local directory")
    s.add_argument("--train-on", default="all_assistant", choices=["all_assistant", "last_assistant"])
    m = sub.add_parser(
        "merge-pairs", help="join pair files of several sample_pairs runs (their group ids collide)"
    )
    m.add_argument("files", nargs="+", metavar="FILE")
    m.add_argument(
        "--out", required=True, metavar="PATH", help="the merged JSONL (written whole or not at all)"
    )
    for p in (v, s):
        p.add_argument(
            "--default-system",
            default=DEFAULT_SYSTEM,
            help="system prompt for conversations without one: template (its own default), none, or text",
        )
    args = parser.parse_args(argv)
    if args.command == "merge-pairs":
        if any(Path(f).resolve() == Path(args.out).resolve() for f in args.files):
            parser.error("--out must not be one of the input files")
        try:
            counts = merge_grouped_pairs(args.files, args.out)
        except (DataError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{args.out}: {counts['written']} pairs from {counts['files']} file(s) ({counts['read']} read, "
            f"{counts['duplicates']} exact duplicates dropped), {counts['groups']} prompt groups"
        )
        return 0

    known = formats(args.kind)
    if args.command == "validate" and args.format is not None and args.format not in known:
        parser.error(f"--format {args.format}: unknown {args.kind} format (known: {', '.join(known)})")
    if args.command == "validate" and args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be positive")
    if args.command == "show" and args.n < 1:
        parser.error("--n must be positive")
    try:
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        if args.command == "show":
            show(
                args.files,
                tokenizer,
                kind=args.kind,
                n=args.n,
                default_system=args.default_system,
                train_on=args.train_on,
                colour=sys.stdout.isatty(),
            )
            return 0
        load = load_preference if args.kind == "preference" else partial(load_records, kind=args.kind)
        values, report = load(args.files, skip_bad=True, rejects_path=args.rejects, format=args.format)
        if tokenizer is not None and args.kind == "sft":
            tokenize_sft(
                values,
                tokenizer,
                max_length=args.max_length,
                train_on=args.train_on,
                default_system=args.default_system,
                report=report,
            )
        elif tokenizer is not None and args.kind == "preference":
            tokenize_preference(
                values,
                tokenizer,
                max_length=args.max_length,
                default_system=args.default_system,
                report=report,
            )
    except DataSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for a user's data; say what failed and exit as usage error
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_bad=args.show))
    return 1 if report.skipped else 0
