"""Conversation data: loading, format detection, validation and tokenisation, plus a `validate` CLI.

Records come from JSONL / JSON files (optionally gzip-compressed), directories of them, or `datasets`
objects. Each record is recognised as one of several formats (OpenAI messages, ShareGPT, Alpaca,
HH-RLHF transcripts), normalised to a list of ``{"role", "content"}`` turns and checked. A bad record
is never dropped silently: it becomes a `BadRecord` (``file:line: reason``) that either stops the load
(`DataError`) or, with ``skip_bad``, is counted in the `DataReport` and written to a rejects file.

Parsers are registered per data *kind* (``"sft"`` conversations, ``"preference"`` pairs) so that
every kind shares the same reading, error-reporting and accounting machinery via `register_format`.

    python -m align.data validate data.jsonl --kind sft --tokenizer qwen --max-length 2048
    python -m align.data validate pairs.jsonl --kind preference
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import logging
import math
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
# Top-level keys of a JSON object that hold the list of records ({"data": [...]}).
WRAPPER_KEYS = ("data", "train", "examples", "records", "rows")
# Marker files of a directory written by `datasets.Dataset.save_to_disk`.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# Above this many records tokenisation shows a progress bar.
PROGRESS_MIN_RECORDS = 2000


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


# --------------------------------------------------------------------------------------------------
# SFT conversations: every format becomes turns (role, content, where) and goes through one checker.

TRAILING_NOTE = "conversations with trailing unanswered turns removed"


def check_conversation(turns: Sequence[tuple[str, str, str]]) -> Parsed:
    """Check turn order and contents; return the normalised conversation.

    ``turns`` holds (role, content, where) with ``where`` naming the turn in the record. Rules: a system
    turn only comes first; the first other turn is a user turn; no two user or two assistant turns in
    a row; a tool turn follows an assistant turn (its call) or another tool turn, and is answered by
    the assistant, not by the user; an assistant turn is not empty (it would teach the model to say
    nothing); at least one assistant turn. Turns after the last assistant turn train nothing and are
    removed (noted in the report).
    """
    prev: str | None = None
    for role, content, where in turns:
        if role == "system":
            if prev is not None:
                raise RecordError(f"{where}: a system turn is only allowed first")
        elif role == "user":
            if prev == "user":
                raise RecordError(f"{where}: two user turns in a row")
            if prev == "tool":
                raise RecordError(f"{where}: a user turn follows a tool turn (the assistant must answer it)")
        elif role == "assistant":
            if prev in (None, "system"):
                raise RecordError(f"{where}: the conversation starts with an assistant turn, expected user")
            if prev == "assistant":
                raise RecordError(f"{where}: two assistant turns in a row")
            if not content.strip():
                raise RecordError(f"{where}: empty assistant turn")
        elif role == "tool":
            if prev not in ("assistant", "tool"):
                raise RecordError(f"{where}: a tool turn must follow an assistant turn")
        else:  # parsers map roles first; this guards a parser bug, not user data
            raise RecordError(f"{where}: unknown role {_short(role)}")
        prev = role
    last = max((i for i, t in enumerate(turns) if t[0] == "assistant"), default=None)
    if last is None:
        raise RecordError("no assistant turn")
    messages = [{"role": r, "content": c} for r, c, _ in turns[: last + 1]]
    return Parsed(messages, (TRAILING_NOTE,) if last + 1 < len(turns) else ())


def _text_content(content: Any, where: str) -> str:
    """OpenAI content: a string, or a list of text parts (the structured form of the same API)."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise RecordError(f"'{where}.content[{j}]' must be an object, found {_json_type(part)}")
            kind = _get(part, "type", f"{where}.content[{j}]", str)
            if kind != "text":
                raise RecordError(
                    f"'{where}.content[{j}]': unsupported content part {_short(kind)} (only text)"
                )
            texts.append(_get(part, "text", f"{where}.content[{j}]", str))
        return "".join(texts)
    return content


def _parse_openai(rec: dict) -> Parsed:
    msgs = _get(rec, "messages", "", list)
    if not msgs:
        raise RecordError("'messages' is empty")
    turns = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"'{where}' must be an object, found {_json_type(m)}")
        role = _get(m, "role", where, str)
        if role not in ROLES:
            raise RecordError(f"'{where}.role': unknown role {_short(role)} (expected {', '.join(ROLES)})")
        if m.get("content") is None and "tool_calls" in m:
            raise RecordError(f"'{where}': tool_calls without string content are not supported")
        content = _text_content(_get(m, "content", where, (str, list)), where)
        turns.append((role, content, where))
    return check_conversation(turns)


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    # The model's tool call is an assistant turn (trained); the tool's answer is a tool turn (masked).
    "function_call": "assistant",
    "observation": "tool",
}


def _parse_sharegpt(rec: dict) -> Parsed:
    convs = _get(rec, "conversations", "", list)
    if not convs:
        raise RecordError("'conversations' is empty")
    turns = []
    system = _get(rec, "system", "", str, required=False)
    if system:  # an empty top-level system string means "no system prompt"
        turns.append(("system", system, "system"))
    for i, t in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise RecordError(f"'{where}' must be an object, found {_json_type(t)}")
        who = _get(t, "from", where, str)
        if who not in SHAREGPT_ROLES:
            raise RecordError(
                f"'{where}.from': unknown role {_short(who)} (expected {', '.join(SHAREGPT_ROLES)})"
            )
        turns.append((SHAREGPT_ROLES[who], _get(t, "value", where, str), where))
    return check_conversation(turns)


def _parse_alpaca(rec: dict) -> Parsed:
    instruction = _get(rec, "instruction", "", str)
    inp = _get(rec, "input", "", str, required=False) or ""
    output = _get(rec, "output", "", str)
    turns = []
    system = _get(rec, "system", "", str, required=False)
    if system:
        turns.append(("system", system, "system"))
    history = _get(rec, "history", "", list, required=False) or []
    for j, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            found = f"an array of length {len(pair)}" if isinstance(pair, list) else _json_type(pair)
            raise RecordError(f"'history[{j}]' must be a [query, response] pair, found {found}")
        for k, (role, text) in enumerate(zip(("user", "assistant"), pair, strict=True)):
            if not isinstance(text, str):
                raise RecordError(f"'history[{j}][{k}]' must be a string, found {_json_type(text)}")
            turns.append((role, text, f"history[{j}][{k}]"))
    # The instruction, then the input (when there is one) after a blank line.
    user = "\n\n".join(p for p in (instruction, inp) if p.strip()) or instruction
    turns += [("user", user, "instruction"), ("assistant", output, "output")]
    return check_conversation(turns)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _parse_hh(rec: dict) -> Parsed:
    key = "text" if "text" in rec else "chosen"  # SFT on a preference pair uses the chosen transcript
    return check_conversation(_hh_turns(_get(rec, key, "", str), key))


register_format("sft", RecordFormat("openai", lambda r: "messages" in r, _parse_openai, "messages"))
register_format(
    "sft",
    RecordFormat("sharegpt", lambda r: "conversations" in r, _parse_sharegpt, "conversations"),
)
register_format(
    "sft", RecordFormat("alpaca", lambda r: "instruction" in r, _parse_alpaca, "instruction, output")
)
register_format(
    "sft",
    RecordFormat("hh", lambda r: "text" in r or "chosen" in r, _parse_hh, "text or chosen"),
)


# --------------------------------------------------------------------------------------------------
# Preference pairs: every format becomes {"prompt", "chosen", "rejected", "margin"}, where the prompt is
# the shared conversation (ending in a user turn, usually) and chosen/rejected are the response turns
# (ending in the assistant turn the reward model scores). A record may give several pairs (an
# OpenAssistant tree), so a parser's value is a list of pairs.

IDENTICAL_REASON = "chosen and rejected are identical"
OASST_TIE_NOTE = "OpenAssistant sibling replies of equal rank skipped"
OASST_SAME_TEXT_NOTE = "OpenAssistant sibling replies with the same text skipped"
OASST_PAIRS_NOTE = "pairs (OpenAssistant trees give several per record)"
EMPTY_RESPONSE_NOTE = "pairs with an empty chosen or rejected reply"


def _margin(rec: dict) -> float | None:
    """The optional ``margin`` field: a finite number (how much the chosen should win by)."""
    if rec.get("margin") is None:
        return None
    m = rec["margin"]
    if isinstance(m, bool) or not isinstance(m, int | float):
        raise RecordError(f"'margin' must be a number, found {_json_type(m)}")
    if not math.isfinite(m):
        raise RecordError(f"'margin' must be finite, found {m}")
    return float(m)


def _message_turn(m: Any, where: str) -> tuple[str, str, str]:
    """One message as an OpenAI ``{role, content}`` or a ShareGPT ``{from, value}`` object."""
    if not isinstance(m, dict):
        raise RecordError(f"'{where}' must be an object, found {_json_type(m)}")
    if "role" in m:
        role = _get(m, "role", where, str)
        if role not in ROLES:
            raise RecordError(f"'{where}.role': unknown role {_short(role)} (expected {', '.join(ROLES)})")
        return role, _text_content(_get(m, "content", where, (str, list)), where), where
    if "from" in m:
        who = _get(m, "from", where, str)
        if who not in SHAREGPT_ROLES:
            raise RecordError(
                f"'{where}.from': unknown role {_short(who)} (expected {', '.join(SHAREGPT_ROLES)})"
            )
        return SHAREGPT_ROLES[who], _get(m, "value", where, str), where
    raise RecordError(f"'{where}' has neither 'role'/'content' nor 'from'/'value'")


def _turns(value: Any, where: str, text_role: str) -> list[tuple[str, str, str]]:
    """A prompt or a response: a string (one turn of ``text_role``), a message object, or a list of them."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise RecordError(f"'{where}' contains a lone surrogate (invalid Unicode)")
        return [(text_role, value, where)]
    if isinstance(value, dict):
        return [_message_turn(value, where)]
    if isinstance(value, list):
        if not value:
            raise RecordError(f"'{where}' is empty")
        return [_message_turn(m, f"{where}[{i}]") for i, m in enumerate(value)]
    raise RecordError(f"'{where}' must be a string, an object or an array, found {_json_type(value)}")


def _messages(turns: Sequence[tuple[str, str, str]]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c, _ in turns]


def make_pair(
    prompt: Sequence[tuple[str, str, str]],
    chosen: Sequence[tuple[str, str, str]],
    rejected: Sequence[tuple[str, str, str]],
    margin: float | None = None,
) -> dict[str, Any]:
    """Check one comparison and return it as ``{"prompt", "chosen", "rejected", "margin"}`` messages.

    ``prompt``, ``chosen`` and ``rejected`` hold (role, content, where) turns. Each response ends with
    the assistant turn that is scored; prompt + response must be a valid conversation (the rules of
    `check_conversation`), except that the scored reply may be empty (saying nothing can be the better
    answer; such pairs are noted); the prompt has a user turn; chosen and rejected differ (beyond
    surrounding whitespace). Returns the pair and its notes.
    """
    if not any(role == "user" for role, _, _ in prompt):
        raise RecordError("the prompt has no user turn")
    notes = []
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise RecordError(f"'{name}' is empty")
        role, content, where = response[-1]
        if role != "assistant":
            raise RecordError(f"'{where}': the {name} response must end with an assistant turn, found {role}")
        if not content.strip():
            notes.append(EMPTY_RESPONSE_NOTE)
            response = [*response[:-1], (role, "(empty)", where)]  # the checker refuses empty replies
        check_conversation([*prompt, *response])
    if [(r, c.strip()) for r, c, _ in chosen] == [(r, c.strip()) for r, c, _ in rejected]:
        raise RecordError(IDENTICAL_REASON)
    pair = {
        "prompt": _messages(prompt),
        "chosen": _messages(chosen),
        "rejected": _messages(rejected),
        "margin": margin,
    }
    return pair, tuple(dict.fromkeys(notes))


def _one_pair(prompt: list, chosen: list, rejected: list, margin: float | None) -> Parsed:
    pair, notes = make_pair(prompt, chosen, rejected, margin)
    return Parsed([pair], notes)


def _split_shared_prefix(
    chosen: list[tuple[str, str, str]], rejected: list[tuple[str, str, str]], what: str
) -> tuple[list, list, list]:
    """Full conversations that share a prefix and differ in the last assistant turn -> (prompt, c, r)."""
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1][0] != "assistant":
            raise RecordError(f"'{turns[-1][2]}': the {name} {what} must end with an assistant turn")
    if len(chosen) != len(rejected):
        raise RecordError(
            f"the chosen and rejected {what}s have {len(chosen)} and {len(rejected)} turns; they must share "
            "every turn but the last assistant turn"
        )
    for k, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if (c[0], c[1].strip()) != (r[0], r[1].strip()):
            raise RecordError(
                f"the chosen and rejected {what}s differ at turn {k + 1} ({c[2]}), before the last assistant "
                "turn; they must share every turn but the last"
            )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _hh_turns(text: str, key: str) -> list[tuple[str, str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as turns."""
    marks = list(_HH_TURN.finditer(text))
    if not marks:
        raise RecordError(f"'{key}': no 'Human:' / 'Assistant:' turns found")
    if text[: marks[0].start()].strip():
        raise RecordError(f"'{key}': text before the first 'Human:' turn")
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        # The transcript's spaces and newlines around a turn are separators, not content.
        turns.append((role, text[m.end() : end].strip(), f"'{key}' turn {k + 1} ({m.group(1)})"))
    return turns


def _parse_pref_explicit(rec: dict) -> Parsed:
    """``{prompt, chosen, rejected}``: prompt a string or messages, responses strings or messages."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"missing field '{key}'")
    prompt = _turns(rec["prompt"], "prompt", "user")
    system = _get(rec, "system", "", str, required=False)
    if system and prompt[0][0] != "system":
        prompt.insert(0, ("system", system, "system"))
    chosen = _turns(rec["chosen"], "chosen", "assistant")
    rejected = _turns(rec["rejected"], "rejected", "assistant")
    return _one_pair(prompt, chosen, rejected, _margin(rec))


def _parse_pref_full(rec: dict) -> Parsed:
    """``{chosen, rejected}`` full conversations (HH-RLHF transcripts or message lists) sharing a prefix."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if "rejected" not in rec:
        raise RecordError("missing field 'rejected'")
    if isinstance(chosen, str) and isinstance(rejected, str):
        c, r = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
        what = "transcript"
    elif isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _turns(chosen, "chosen", "assistant"), _turns(rejected, "rejected", "assistant")
        what = "conversation"
    else:
        raise RecordError(
            f"'chosen' and 'rejected' must both be HH transcripts (strings) or both message arrays, found "
            f"{_json_type(chosen)} and {_json_type(rejected)} (a separate prompt goes in 'prompt')"
        )
    if [(x[0], x[1].strip()) for x in c] == [(x[0], x[1].strip()) for x in r]:
        raise RecordError(IDENTICAL_REASON)
    prompt, c_last, r_last = _split_shared_prefix(c, r, what)
    return _one_pair(prompt, c_last, r_last, _margin(rec))


def _parse_pref_sharegpt(rec: dict) -> Parsed:
    """ShareGPT pairs (LLaMA-Factory): ``conversations`` then ``chosen``/``rejected`` {from, value}."""
    convs = _get(rec, "conversations", "", list)
    if not convs:
        raise RecordError("'conversations' is empty")
    prompt = []
    system = _get(rec, "system", "", str, required=False)
    if system:
        prompt.append(("system", system, "system"))
    prompt += _turns(convs, "conversations", "user")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"missing field '{key}'")
    chosen = _turns(rec["chosen"], "chosen", "assistant")
    rejected = _turns(rec["rejected"], "rejected", "assistant")
    return _one_pair(prompt, chosen, rejected, _margin(rec))


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _parse_oasst(rec: dict) -> Parsed:
    """An OpenAssistant message tree: for every message, each two ranked assistant replies (rank 0 =
    best) give a pair with the conversation up to that message as the prompt. Deleted messages (and
    what follows them) and replies failing review are left out; equal ranks are no preference."""
    root = _get(rec, "prompt", "", dict)
    pairs: list[dict[str, Any]] = []
    notes: set[str] = set()
    # (node, where, turns before it); iterative so a deep tree cannot exhaust the stack.
    stack: list[tuple[dict, str, list[tuple[str, str, str]]]] = [(root, "prompt", [])]
    while stack:
        node, where, before = stack.pop()
        role = _get(node, "role", where, str)
        if role not in OASST_ROLES:
            raise RecordError(f"'{where}.role': unknown role {_short(role)} (expected prompter or assistant)")
        turns = [*before, (OASST_ROLES[role], _get(node, "text", where, str), f"{where}.text")]
        replies = _get(node, "replies", where, list, required=False) or []
        ranked, children = [], []
        for i, reply in enumerate(replies):
            rwhere = f"{where}.replies[{i}]"
            if not isinstance(reply, dict):
                raise RecordError(f"'{rwhere}' must be an object, found {_json_type(reply)}")
            if reply.get("deleted") is True or reply.get("review_result") is False:
                continue
            children.append((reply, rwhere, turns))
            rank = reply.get("rank")
            if rank is None or reply.get("role") != "assistant" or role != "prompter":
                continue
            if isinstance(rank, bool) or not isinstance(rank, int | float):
                raise RecordError(f"'{rwhere}.rank' must be a number, found {_json_type(rank)}")
            text = _get(reply, "text", rwhere, str)
            ranked.append((rank, text, f"{rwhere}.text"))
        stack.extend(reversed(children))  # depth first, in file order
        ranked.sort(key=lambda x: x[0])
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                (rank_a, text_a, where_a), (rank_b, text_b, where_b) = ranked[a], ranked[b]
                if rank_a == rank_b:
                    notes.add(OASST_TIE_NOTE)
                    continue
                if text_a.strip() == text_b.strip():
                    notes.add(OASST_SAME_TEXT_NOTE)
                    continue
                chosen = [("assistant", text_a, where_a)]
                rejected = [("assistant", text_b, where_b)]
                pair, pair_notes = make_pair(turns, chosen, rejected)
                pairs.append(pair)
                notes.update(pair_notes)
    if not pairs:
        raise RecordError("no two ranked assistant replies to the same message: nothing to compare")
    return Parsed(pairs, tuple(sorted(notes)))


def _is_oasst(rec: dict) -> bool:
    return isinstance(rec.get("prompt"), dict) and ("replies" in rec["prompt"] or "message_tree_id" in rec)


register_format(
    "preference",
    RecordFormat("oasst", _is_oasst, _parse_oasst, "OpenAssistant tree: prompt{text, role, replies[rank]}"),
)
register_format(
    "preference",
    RecordFormat(
        "sharegpt",
        lambda r: "conversations" in r,
        _parse_pref_sharegpt,
        "conversations, chosen{from,value}, rejected{from,value}",
    ),
)
register_format(
    "preference",
    RecordFormat("pair", lambda r: "prompt" in r, _parse_pref_explicit, "prompt, chosen, rejected"),
)
register_format(
    "preference",
    RecordFormat(
        "hh",
        lambda r: "chosen" in r,
        _parse_pref_full,
        "chosen, rejected: HH-RLHF transcripts or message arrays sharing a prefix",
    ),
)


# --------------------------------------------------------------------------------------------------
# Reading sources. Readers yield _Raw items: a decoded JSON value, or an error for that record.


@dataclass
class _Raw:
    source: str
    line: int | None
    record: int | None
    raw: str
    value: Any = None
    error: str | None = None

    def bad(self) -> BadRecord:
        return BadRecord(self.source, self.line, self.error or "", self.raw, self.record)


@dataclass(frozen=True)
class _DatasetSource:
    name: str
    dataset: Any


def _expand(source: Any) -> list[Any]:
    """Turn a source argument into a list of files (Path) and datasets objects."""
    if isinstance(source, list | tuple):
        return [s for item in source for s in _expand(item)]
    if not isinstance(source, str | Path):
        return [_as_dataset(source, "<dataset>")]
    path = Path(source)
    if not path.exists():
        raise DataSourceError(
            f"{source}: no such file or directory (hub data sets are not fetched: download it and pass "
            "a local path, or pass a datasets.Dataset)"
        )
    if path.is_dir():
        _refuse_escaping_links(path)
        if any((path / m).exists() for m in _SAVED_DATASET_FILES):
            return [_load_saved_dataset(path)]
        files = sorted(p for p in path.iterdir() if p.is_file() and _file_kind(p))
        if not files:
            raise DataSourceError(f"{source}: directory holds no .jsonl/.json(.gz) files or saved data set")
        return files
    if not _file_kind(path):
        raise DataSourceError(f"{source}: unsupported file type (expected .jsonl or .json, optionally .gz)")
    return [path]


def _refuse_escaping_links(root: Path) -> None:
    """A data directory is read as a whole, so a symlink inside it that resolves outside it would
    read a file the user never named (a key, another user's data): refuse it, naming the link."""
    top = root.resolve()
    for entry in sorted(root.rglob("*")):
        if entry.is_symlink():
            target = entry.resolve()
            if target != top and top not in target.parents:
                raise DataSourceError(
                    f"{entry}: symlink to {target}, outside the data directory {root}; copy the file in "
                    "instead (links are only followed inside the data root)"
                )


def iter_jsonl_values(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of each non-blank line of a JSONL file (optionally .gz).

    For the small readers outside the record formats (prompt files, ptx text): a line that is not
    UTF-8 JSON, an unreadable file, or a file with no records raises `DataError` as `file:line: reason`.
    """
    for raw in _iter_jsonl(Path(path)):
        if raw.error is not None:
            where = f"{raw.source}:{raw.line}" if raw.line is not None else raw.source
            raise DataError(f"{where}: {raw.error}")
        yield raw.line, raw.value


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def _load_saved_dataset(path: Path) -> _DatasetSource:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged directory
        raise DataSourceError(f"{path}: cannot load saved data set: {e}") from e
    return _as_dataset(ds, str(path))


def _as_dataset(obj: Any, name: str) -> _DatasetSource:
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj)
        if "train" not in obj and len(splits) != 1:
            raise DataSourceError(
                f"{name}: DatasetDict with splits {splits}: pass one split, e.g. ds['train']"
            )
        obj = obj["train" if "train" in obj else splits[0]]
    if not isinstance(obj, datasets.Dataset):
        raise DataSourceError(
            f"unsupported source type {type(obj).__name__} (expected a path, a list of paths, or a datasets.Dataset)"
        )
    return _DatasetSource(name, obj)


def _iter_dataset(src: _DatasetSource) -> Iterator[_Raw]:
    name, ds = src.name, src.dataset
    if len(ds) == 0:
        yield _Raw(name, None, None, "", error="empty, no records")
    for i, row in enumerate(ds):
        # Arrow gives every row every column, null where a record lacked it: treat null as absent, or
        # a "messages: null" column would claim the rows of another format.
        row = {k: v for k, v in row.items() if v is not None}
        yield _Raw(name, None, i, json.dumps(row, ensure_ascii=False, default=str), value=row)


def _open_binary(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        return opener(path, "rb")
    except OSError as e:
        raise DataSourceError(f"{path}: cannot open: {e.strerror or e}") from e


def _decode_json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        return None, f"invalid JSON: {e}"


def _iter_jsonl(path: Path) -> Iterator[_Raw]:
    src = str(path)
    records = 0
    lineno = 0
    with _open_binary(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]
                if not line.strip():
                    continue  # blank lines are layout, not records
                records += 1
                data = line.rstrip(b"\r\n")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raw = data.decode("utf-8", "backslashreplace")
                    yield _Raw(
                        src,
                        lineno,
                        None,
                        raw,
                        error=f"invalid UTF-8: byte 0x{data[e.start]:02x} at column {e.start + 1}",
                    )
                    continue
                value, err = _decode_json(text)
                yield _Raw(src, lineno, None, text, value=value, error=err)
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip stream
            yield _Raw(src, lineno + 1, None, "", error=f"cannot read the rest of the file: {e}")
            return
    if records == 0:
        yield _Raw(src, None, None, "", error="empty, no records")


_WS = re.compile(r"[ \t\n\r]*")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 bytes into


class _JsonScanner:
    """Walks a JSON document holding a list of records, yielding each record with its line number.

    Records are decoded one at a time with ``raw_decode`` so that each gets its real line, a record
    with invalid UTF-8 is rejected alone, and records before a syntax error are still read.
    """

    def __init__(self, src: str, text: str) -> None:
        self.src, self.text, self.decoder = src, text, json.JSONDecoder()
        self._line, self._line_pos = 1, 0
        self.array_end = 0

    def line_of(self, pos: int) -> int:
        # Records come in file order, so newlines are counted incrementally (linear overall).
        self._line += self.text.count("\n", self._line_pos, pos)
        self._line_pos = pos
        return self._line

    def ws(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()

    def expect(self, pos: int, chars: str, what: str) -> int:
        if pos >= len(self.text) or self.text[pos] not in chars:
            raise json.JSONDecodeError(f"Expecting {what}", self.text, pos)
        return pos

    def iter_records(self) -> Iterator[_Raw]:
        text = self.text
        pos = self.ws(0)
        count = 0
        try:
            if pos == len(text):
                yield _Raw(self.src, None, None, "", error="empty, no records")
                return
            if text[pos] == "[":
                items = self.iter_array(pos)
            elif text[pos] == "{":
                items = self.iter_object(pos)
            else:
                value, end = self.decoder.raw_decode(text, pos)
                self.check_end(end)
                items = iter([self.record(pos, end, value)])
            for item in items:
                count += 1
                yield item
            if count == 0:
                yield _Raw(self.src, None, None, "", error="empty, no records")
        except json.JSONDecodeError as e:
            rest = "; the rest of the file was not read" if count else "; the file was not read"
            yield _Raw(self.src, e.lineno, None, "", error=f"invalid JSON: {e.msg} (column {e.colno}){rest}")
        except (RecursionError, ValueError) as e:  # deep nesting; integers beyond the digit limit
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            yield _Raw(
                self.src, self.line_of(max(pos, self._line_pos)), None, "", error=f"invalid JSON: {reason}"
            )

    def record(self, start: int, end: int, value: Any) -> _Raw:
        chunk = self.text[start:end]
        line = self.line_of(start)
        bad = _BAD_BYTE.search(chunk)
        if bad:
            raw = chunk.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            byte = ord(bad.group()) - 0xDC00
            return _Raw(self.src, line, None, raw, error=f"invalid UTF-8: byte 0x{byte:02x} in this record")
        return _Raw(self.src, line, None, chunk, value=value)

    def iter_array(self, pos: int, top_level: bool = True) -> Iterator[_Raw]:
        """The records of the array at ``pos``; leaves the position after its ']' in ``array_end``."""
        text = self.text
        pos = self.ws(pos + 1)
        if pos >= len(text) or text[pos] != "]":
            while True:
                value, end = self.decoder.raw_decode(text, pos)
                yield self.record(pos, end, value)
                pos = self.expect(self.ws(end), ",]", "',' delimiter")
                if text[pos] == "]":
                    break
                pos = self.ws(pos + 1)
        self.array_end = pos + 1
        if top_level:
            self.check_end(self.array_end)

    def check_end(self, pos: int) -> None:
        pos = self.ws(pos)
        if pos != len(self.text):
            raise json.JSONDecodeError("Extra data", self.text, pos)

    def iter_object(self, pos: int) -> Iterator[_Raw]:
        """An object with a wrapper key holding the records ({"data": [...]}), or a single record."""
        text, start, fields, found = self.text, pos, {}, False
        pos = self.ws(pos + 1)
        if pos < len(text) and text[pos] == "}":
            pos += 1
        else:
            while True:
                self.expect(pos, '"', "property name enclosed in double quotes")
                key, pos = self.decoder.raw_decode(text, pos)
                pos = self.ws(self.expect(self.ws(pos), ":", "':' delimiter") + 1)
                if key in WRAPPER_KEYS and not found and pos < len(text) and text[pos] == "[":
                    found = True
                    yield from self.iter_array(pos, top_level=False)
                    pos = self.array_end
                else:
                    fields[key], pos = self.decoder.raw_decode(text, pos)
                pos = self.expect(self.ws(pos), ",}", "',' delimiter")
                if text[pos] == "}":
                    pos += 1
                    break
                pos = self.ws(pos + 1)
        self.check_end(pos)
        if found:
            return
        if any(fmt.detect(fields) for kind in _FORMATS.values() for fmt in kind.values()):
            yield self.record(start, pos, fields)  # a file holding a single record
            return
        keys = ", ".join(_short(k, 20) for k in list(fields)[:8])
        yield _Raw(
            self.src,
            self.line_of(start),
            None,
            "",
            error=f'JSON object without a list of records (keys: {keys}); expected a list or {{"data": [...]}}',
        )


def _iter_json(path: Path) -> Iterator[_Raw]:
    src = str(path)
    with _open_binary(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip stream
            yield _Raw(src, None, None, "", error=f"cannot read the file: {e}")
            return
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    # surrogateescape keeps invalid bytes visible, so that only the records holding them are rejected.
    yield from _JsonScanner(src, data.decode("utf-8", "surrogateescape")).iter_records()


def _iter_raw(item: Any) -> Iterator[_Raw]:
    if isinstance(item, _DatasetSource):
        return _iter_dataset(item)
    return _iter_jsonl(item) if _file_kind(item) == "jsonl" else _iter_json(item)


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


def tokenize_sft(
    conversations: Sequence[list[dict]],
    tokenizer: Any,
    *,
    max_length: int | None,
    train_on: str = "all_assistant",
    default_system: str | None = None,
    report: DataReport | None = None,
) -> list[dict]:
    """Tokenise conversations with ChatML loss masks (`chatml.encode_conversation`).

    Returns dicts with ``input_ids`` and ``labels`` (-100 where not trained). An example with no
    trainable token left after truncation is dropped (it would give a 0/0 loss) and counted in
    ``report``, which also gets truncation counts and token statistics. A fresh report (nothing read)
    is filled in as if the conversations had just been loaded.
    """
    from tqdm.auto import tqdm

    import chatml

    if report is not None and report.read == 0:
        report.read = report.used = len(conversations)
    examples, lengths, trainable = [], [], []
    truncated = dropped = 0
    bar = tqdm(
        conversations,
        desc="tokenising",
        unit="conv",
        disable=len(conversations) <= PROGRESS_MIN_RECORDS or not sys.stderr.isatty(),
    )
    for conv in bar:
        enc = chatml.encode_conversation(
            conv, tokenizer, max_length=max_length, train_on=train_on, default_system=default_system
        )
        if enc["num_trainable"] == 0:
            dropped += 1
            continue
        truncated += bool(enc["truncated"])
        examples.append({"input_ids": list(enc["input_ids"]), "labels": list(enc["labels"])})
        lengths.append(len(enc["input_ids"]))
        trainable.append(enc["num_trainable"])
    if report is not None:
        report.used -= dropped
        report.dropped_no_trainable += dropped
        report.truncated += truncated
        report.max_length = max_length
        report.tokens = TokenStats.from_lengths(lengths, trainable)
    return examples


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


UNCLOSED_NOTE = "pairs with a response whose end token was truncated away"


def end_token_id(tokenizer: Any, token: str) -> int:
    """The id of ``token`` when it is a single token of the tokenizer; ValueError otherwise."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"end token {token!r} is not a single token of this tokenizer (encodes to {ids}); the reward is "
            "read at that token, so pick one the tokenizer has (ChatML models: <|im_end|>)"
        )
    return ids[0]


def encode_scored(
    messages: Sequence[dict],
    tokenizer: Any,
    *,
    end_token: str | None = None,
    default_system: str | None = None,
) -> list[int]:
    """Token ids of a conversation scored by a reward model: ChatML, ending with the ``<|im_end|>``
    that closes the last turn (the template's newline after it is left out), followed by
    ``end_token`` when that is another token (e.g. ``<|endoftext|>``)."""
    import chatml

    text = chatml.render_conversation(messages, default_system)
    text = text[: -len("\n")]  # every ChatML turn ends "<|im_end|>\n"
    if end_token is not None and end_token != chatml.IM_END:
        text += end_token
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference(
    pairs: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None,
    end_token: str = "<|im_end|>",
    default_system: str | None = None,
    truncation_side: str = "left",
    report: DataReport | None = None,
) -> list[dict[str, Any]]:
    """Tokenise pairs for a reward model (`encode_scored` on prompt + chosen and prompt + rejected).

    Returns one dict per pair: ``chosen_ids``, ``rejected_ids``, ``margin`` (float or None),
    ``chosen_closed``/``rejected_closed`` (the sequence still ends with the end token) and
    ``chosen_len``/``rejected_len`` (response tokens: those after the shared prefix, before truncation).
    A sequence longer than ``max_length`` is cut: ``truncation_side="left"`` drops its oldest tokens (the
    response keeps its end token), ``"right"`` cuts the end (the response is then unclosed: flagged, and
    counted in ``report``, never scored at whatever token happens to be last).
    """
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    end_id = end_token_id(tokenizer, end_token)
    examples, lengths, response_lengths = [], [], []
    truncated = unclosed = 0
    for pair in pairs:
        ex: dict[str, Any] = {"margin": pair.get("margin")}
        ids = {
            side: encode_scored(
                [*pair["prompt"], *pair[side]], tokenizer, end_token=end_token, default_system=default_system
            )
            for side in ("chosen", "rejected")
        }
        shared = _common_prefix(ids["chosen"], ids["rejected"])
        cut = False
        for side, seq in ids.items():
            ex[f"{side}_len"] = len(seq) - shared
            if max_length is not None and len(seq) > max_length:
                cut = True
                seq = seq[-max_length:] if truncation_side == "left" else seq[:max_length]
            ex[f"{side}_ids"] = seq
            ex[f"{side}_closed"] = seq[-1] == end_id
            lengths.append(len(seq))
            response_lengths.append(min(ex[f"{side}_len"], len(seq)))
        truncated += cut
        unclosed += not (ex["chosen_closed"] and ex["rejected_closed"])
        examples.append(ex)
    if report is not None:
        if report.read == 0:
            report.read = report.used = len(pairs)
        report.truncated += truncated
        report.max_length = max_length
        if unclosed:
            report.notes[UNCLOSED_NOTE] = report.notes.get(UNCLOSED_NOTE, 0) + unclosed
        report.tokens = TokenStats.from_lengths(lengths, response_lengths)
    return examples


# --------------------------------------------------------------------------------------------------
# CLI


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
        values, report = load_records(
            args.files, kind=args.kind, skip_bad=True, rejects_path=args.rejects, format=args.format
        )
        if tokenizer is not None and args.kind == "sft":
            tokenize_sft(values, tokenizer, max_length=args.max_length, train_on=args.train_on, report=report)
        elif args.kind == "preference":
            pairs = [pair for pairs_of_record in values for pair in pairs_of_record]
            if len(pairs) != report.used:
                report.notes[OASST_PAIRS_NOTE] = len(pairs)
            if tokenizer is not None:
                tokenize_preference(pairs, tokenizer, max_length=args.max_length, report=report)
    except DataSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for a user's data; say what failed and exit as usage error
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_bad=args.show))
    return 1 if report.skipped else 0


if __name__ == "__main__":
    # Keep the logger's "skipped N bad records" warning out of the CLI: the summary already lists them.
    logging.disable(logging.WARNING)
    sys.exit(main())
