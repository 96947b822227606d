"""Loading: read every source, detect and parse each record, account for it in a `DataReport`, and
refuse (or, with ``skip_bad``, set aside) bad records."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.data.preference import OASST_PAIRS_NOTE
from align.data.records import (
    _FORMATS,
    BadRecord,
    DataError,
    DataReport,
    Parsed,
    RecordError,
    RecordFormat,
    _bad_lines,
    _json_type,
    _short,
)
from align.data.sources import _DatasetSource, _expand, _iter_raw, _Raw

logger = logging.getLogger("align.data")


def _parse_record(raw: _Raw, fmts: dict[str, RecordFormat], fmt_name: str | None) -> tuple[str, Parsed]:
    """Pick the format (the forced one, or the first that detects) and parse; raises RecordError."""
    rec = raw.value
    if not isinstance(rec, dict):
        raise RecordError(f"record must be a JSON object, found {_json_type(rec)}")
    if fmt_name is not None:
        return fmt_name, fmts[fmt_name].parse(rec)
    for name, fmt in fmts.items():
        if fmt.detect(rec):
            return name, fmt.parse(rec)
    keys = ", ".join(_short(k, 20) for k in list(rec)[:8])
    expected = ", ".join(f"{f.name} ({f.description})" for f in fmts.values())
    raise RecordError(f"unrecognised record (keys: {keys}); expected one of: {expected}")


def load_records(
    source: Any,
    *,
    kind: str,
    skip_bad: bool = False,
    rejects_path: str | Path | None = None,
    format: str | None = None,
    max_errors_shown: int = 20,
) -> tuple[list[Any], DataReport]:
    """Read, detect, parse and check every record of ``source`` for a data kind.

    ``source``: a path (JSONL, JSON, ``.gz`` of either, a directory of those, or a directory written by
    ``Dataset.save_to_disk``), a ``datasets.Dataset``, or a list of these. Any bad record raises
    `DataError` unless ``skip_bad``; bad records go to ``rejects_path`` (JSONL) when given.
    Raises `DataSourceError` for a source that cannot be opened, ValueError for an unknown kind/format.
    """
    if kind not in _FORMATS:
        raise ValueError(f"unknown data kind {kind!r} (known: {', '.join(_FORMATS)})")
    fmts = _FORMATS[kind]
    if format is not None and format not in fmts:
        raise ValueError(f"unknown {kind} format {format!r} (known: {', '.join(fmts)})")
    items = _expand(source)
    report = DataReport(
        kind=kind, sources=[i.name if isinstance(i, _DatasetSource) else str(i) for i in items]
    )
    values = []
    for item in items:
        for raw in _iter_raw(item):
            report.read += 1
            if raw.error is None:
                try:
                    name, parsed = _parse_record(raw, fmts, format)
                except RecordError as e:
                    raw.error = str(e)
                except RecursionError:  # a parser walking absurdly nested values
                    raw.error = "record nested too deeply"
            if raw.error is not None:
                report.skipped += 1
                report.bad.append(raw.bad())
                continue
            report.used += 1
            report.formats[name] = report.formats.get(name, 0) + 1
            for note in parsed.notes:
                report.notes[note] = report.notes.get(note, 0) + 1
            values.append(parsed.value)
    if rejects_path is not None:
        _write_rejects(Path(rejects_path), report.bad)
    if report.bad and not skip_bad:
        raise DataError(
            "\n".join(
                [f"{len(report.bad)} bad {kind} record(s) in {', '.join(report.sources)}:"]
                + _bad_lines(report.bad, max_errors_shown)
                + ["fix them, or pass skip_bad=true to skip them (and rejects_path to keep them in a file)"]
            ),
            report.bad,
        )
    if report.bad and rejects_path is None:
        logger.warning("skipped %d bad record(s):\n%s", len(report.bad), "\n".join(_bad_lines(report.bad, 5)))
    return values, report


_LINE_BREAK_ESCAPES = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def _write_rejects(path: Path, bad: Sequence[BadRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # backslashreplace writes a lone surrogate as the JSON escape it came from, so every line stays JSON.
    with path.open("w", encoding="utf-8", errors="backslashreplace") as f:
        for b in bad:
            row = {"source": b.source, "line": b.line, "record": b.record, "reason": b.reason, "raw": b.raw}
            # Escape the characters str.splitlines() treats as line breaks, so one record stays one line.
            f.write(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAK_ESCAPES) + "\n")


def load_sft(
    source: Any,
    *,
    skip_bad: bool = False,
    rejects_path: str | Path | None = None,
    format: str | None = None,
    max_errors_shown: int = 20,
) -> tuple[list[list[dict]], DataReport]:
    """Load SFT conversations: each a list of ``{"role", "content"}`` turns, checked (see
    `check_conversation`). Formats: openai, sharegpt, alpaca, hh (auto-detected per record unless
    ``format`` is given). See `load_records` for sources and error handling."""
    return load_records(
        source,
        kind="sft",
        skip_bad=skip_bad,
        rejects_path=rejects_path,
        format=format,
        max_errors_shown=max_errors_shown,
    )


def load_preference(
    source: Any,
    *,
    skip_bad: bool = False,
    rejects_path: str | Path | None = None,
    format: str | None = None,
    max_errors_shown: int = 20,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Load preference pairs: each ``{"prompt", "chosen", "rejected", "margin"}`` with message lists
    (see `make_pair`) and ``margin`` a float or None. Formats: pair ``{prompt, chosen, rejected}``, hh
    (full conversations sharing a prefix), sharegpt, oasst (one tree gives several pairs); detected per
    record unless ``format`` is given. ``report.used`` counts records; the pairs are the returned list.
    See `load_records` for sources and error handling."""
    values, report = load_records(
        source,
        kind="preference",
        skip_bad=skip_bad,
        rejects_path=rejects_path,
        format=format,
        max_errors_shown=max_errors_shown,
    )
    pairs = [pair for pairs_of_record in values for pair in pairs_of_record]
    if len(pairs) != report.used:
        report.notes[OASST_PAIRS_NOTE] = len(pairs)
    return pairs, report
