"""The shared vocabulary of data loading: errors, bad-record and report types, the per-kind format
registry, and the field checks every record parser uses."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training data: the message lists the bad records as ``file:line: reason``."""

    def __init__(self, message: str, bad: Sequence[BadRecord] = ()) -> None:
        super().__init__(message)
        self.bad = list(bad)


class DataSourceError(DataError):
    """A source that cannot be opened at all (missing path, unsupported file type): a usage error."""


class RecordError(Exception):
    """Raised by a record parser; the message is the reason shown after ``file:line:``."""


@dataclass(frozen=True)
class BadRecord:
    """One record (or one file-level problem) that could not be used."""

    source: str
    line: int | None
    reason: str
    raw: str = ""
    # Index of the record in its source, used in messages when there is no line (datasets rows).
    record: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}: {self.reason}"
        if self.record is not None:
            return f"{self.source}:record {self.record}: {self.reason}"
        return f"{self.source}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "record": self.record, "reason": self.reason}


@dataclass(frozen=True)
class Parsed:
    """What a record parser returns: the normalised value, and notes on harmless fixes it made."""

    value: Any
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordFormat:
    """A record format of one data kind: ``detect`` says whether a record looks like it, ``parse``
    normalises it or raises `RecordError`."""

    name: str
    detect: Callable[[dict], bool]
    parse: Callable[[dict], Parsed]
    description: str = ""


# kind -> format name -> format; dict order is the auto-detection order.
_FORMATS: dict[str, dict[str, RecordFormat]] = {}


def register_format(kind: str, fmt: RecordFormat) -> None:
    """Add (or replace) a record format for a data kind; new kinds are created on first use."""
    _FORMATS.setdefault(kind, {})[fmt.name] = fmt


def formats(kind: str) -> list[str]:
    """Names of the formats registered for a kind, in detection order."""
    return list(_FORMATS.get(kind, {}))


@dataclass
class TokenStats:
    """Token-length statistics over tokenised examples."""

    examples: int
    total_tokens: int
    trainable_tokens: int
    min: int
    mean: float
    p50: int
    p95: int
    max: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_tokens / self.total_tokens if self.total_tokens else 0.0

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], trainable: Sequence[int]) -> TokenStats | None:
        if not lengths:
            return None
        s = sorted(lengths)

        def pct(q: float) -> int:  # nearest-rank percentile
            return s[max(0, math.ceil(q * len(s)) - 1)]

        return cls(len(s), sum(s), sum(trainable), s[0], sum(s) / len(s), pct(0.5), pct(0.95), s[-1])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}


@dataclass
class DataReport:
    """Accounting of one load: ``read == used + skipped + dropped_no_trainable`` at all times.

    ``read`` counts records, plus one per file-level problem (an empty or unreadable file), so that
    ``skipped == len(bad)``. ``truncated`` counts used examples that were cut to ``max_length``.
    """

    kind: str = "sft"
    sources: list[str] = field(default_factory=list)
    read: int = 0
    used: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None
    tokens: TokenStats | None = None
    bad: list[BadRecord] = field(default_factory=list)

    def summary(self, max_bad: int = 20) -> str:
        """Human-readable multi-line summary, listing up to ``max_bad`` bad records."""
        src = self.sources[0] if len(self.sources) == 1 else f"{len(self.sources)} sources"
        lines = [
            f"{self.kind} data from {src}: read {self.read}, used {self.used}, skipped {self.skipped} (bad), "
            f"dropped {self.dropped_no_trainable} (no trainable token)"
        ]
        if self.formats:
            lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        for note, n in sorted(self.notes.items()):
            lines.append(f"{note}: {n}")
        if self.max_length is not None:
            lines.append(f"truncated to {self.max_length} tokens: {self.truncated}")
        if self.tokens is not None:
            t = self.tokens
            lines.append(
                f"tokens per example: min {t.min}, mean {t.mean:.1f}, p50 {t.p50}, p95 {t.p95}, max {t.max}; "
                f"total {t.total_tokens}, trainable {t.trainable_tokens} ({t.trainable_fraction:.1%})"
            )
        if self.bad:
            lines.append(f"bad records ({len(self.bad)}):")
            lines.extend(_bad_lines(self.bad, max_bad))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = self.tokens.to_dict() if self.tokens else None
        d["bad"] = [b.to_dict() for b in self.bad]
        return d


def _bad_lines(bad: Sequence[BadRecord], max_shown: int) -> list[str]:
    lines = [f"  {b}" for b in bad[:max_shown]]
    if len(bad) > max_shown:
        lines.append(f"  ... and {len(bad) - max_shown} more")
    return lines


# --------------------------------------------------------------------------------------------------
# Field checks shared by the parsers. Messages name the field as a JSON path and use JSON type names,
# since that is what a user sees when opening the file.

_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _short(v: Any, limit: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _get(obj: dict, key: str, where: str, types: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``obj[key]`` checked against ``types``; None when absent (or null) and not required."""
    path = f"{where}.{key}" if where else key
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise RecordError(f"missing field '{path}'")
        return None
    v = obj[key]
    if not isinstance(v, types):
        want = " or ".join(_JSON_NAMES[t] for t in (types if isinstance(types, tuple) else (types,)))
        raise RecordError(f"'{path}' must be {want}, found {_json_type(v)}")
    if isinstance(v, str) and _SURROGATE.search(v):
        # Only reachable through JSON "\\u" escapes; tokenizers cannot encode lone surrogates.
        raise RecordError(f"'{path}' contains a lone surrogate (invalid Unicode)")
    return v


_JSON_NAMES = {str: "a string", list: "an array", dict: "an object"}
