"""SFT conversation formats (OpenAI messages, ShareGPT, Alpaca, HH-RLHF transcripts): each record
becomes a checked list of ``{"role", "content"}`` turns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from align.data.records import (
    ROLES,
    Parsed,
    RecordError,
    RecordFormat,
    _get,
    _json_type,
    _short,
    register_format,
)

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
