"""SFT conversation formats (OpenAI messages, ShareGPT, Alpaca, HH-RLHF transcripts): each record
becomes a checked list of ``{"role", "content"}`` turns (plus ``tool_calls`` on an assistant turn that
calls tools), a `chatml.Conversation` that carries the record's ``tools``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

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
from align.data.tools import parse_calls, parse_tools, tool_names
from chatml.encode import Conversation

# --------------------------------------------------------------------------------------------------
# SFT conversations: every format becomes turns and goes through one checker.

TRAILING_NOTE = "conversations with trailing unanswered turns removed"


class Turn(NamedTuple):
    """One turn of a record: ``where`` names it in the record (for messages); ``calls`` holds the tool
    calls of an assistant turn (normalised, see `align.data.tools`)."""

    role: str
    content: str
    where: str
    calls: tuple[dict[str, Any], ...] = ()

    def message(self) -> dict[str, Any]:
        m: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.calls:
            m["tool_calls"] = list(self.calls)
        return m

    def key(self) -> tuple:
        """What makes two turns the same reply (surrounding whitespace aside)."""
        return (self.role, self.content.strip(), json.dumps(self.calls, sort_keys=True))


def check_conversation(turns: Sequence[Turn], tools: list[dict[str, Any]] | None = None) -> Parsed:
    """Check turn order and contents; return the normalised conversation (a `chatml.Conversation`
    carrying ``tools``).

    Rules: a system turn only comes first; the first other turn is a user turn; no two user or two
    assistant turns in a row; a tool turn (a tool result) follows an assistant turn that made a call, or
    another tool turn, and is answered by the assistant, not by the user; a call names a function in
    ``tools``; an assistant turn is not empty unless it makes a call (an empty reply would teach the model
    to say nothing); at least one assistant turn. Turns after the last assistant turn train nothing and
    are removed (noted in the report).
    """
    turns = [Turn(*t) for t in turns]  # (role, content, where) tuples are turns without calls
    check_turns(turns, tools)
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last is None:
        raise RecordError("no assistant turn")
    messages = Conversation([t.message() for t in turns[: last + 1]], tools)
    return Parsed(messages, (TRAILING_NOTE,) if last + 1 < len(turns) else ())


def check_turns(turns: Sequence[Turn], tools: list[dict[str, Any]] | None = None) -> None:
    """The turn rules of `check_conversation` (order, empty replies, calls and tool results), which
    prompts (no assistant turn needed) share."""
    names = tool_names(tools)
    prev: Turn | None = None
    for turn in turns:
        role, where = turn.role, turn.where
        before = prev.role if prev else None
        if role == "system":
            if before is not None:
                raise RecordError(f"{where}: a system turn is only allowed first")
        elif role == "user":
            if before == "user":
                raise RecordError(f"{where}: two user turns in a row")
            if before == "tool":
                raise RecordError(f"{where}: a user turn follows a tool turn (the assistant must answer it)")
        elif role == "assistant":
            if before in (None, "system"):
                raise RecordError(f"{where}: the conversation starts with an assistant turn, expected user")
            if before == "assistant":
                raise RecordError(f"{where}: two assistant turns in a row")
            if not turn.content.strip() and not turn.calls:
                raise RecordError(f"{where}: empty assistant turn")
            for call in turn.calls:
                name = call["function"]["name"]
                if name not in names:
                    known = (
                        f"'tools' has {', '.join(map(repr, names))}" if names else "the record has no 'tools'"
                    )
                    raise RecordError(f"{where}: call to {_short(name)}, a function not in 'tools' ({known})")
        elif role == "tool":
            if before not in ("assistant", "tool"):
                raise RecordError(f"{where}: a tool turn must follow an assistant turn")
            if before == "assistant" and not prev.calls:
                raise RecordError(
                    f"{where}: a tool result with no preceding call (the assistant turn before it calls no function)"
                )
        else:  # parsers map roles first; this guards a parser bug, not user data
            raise RecordError(f"{where}: unknown role {_short(role)}")
        if role != "tool" or before != "tool":
            prev = turn  # a run of tool results answers the calls of the assistant turn before it


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


def message_turn(m: Any, where: str) -> Turn:
    """One message as an OpenAI ``{role, content, tool_calls}`` or a ShareGPT ``{from, value}`` object
    (``from: function_call``: the value is the call as JSON)."""
    if not isinstance(m, dict):
        raise RecordError(f"'{where}' must be an object, found {_json_type(m)}")
    if "role" in m:
        role = _get(m, "role", where, str)
        if role not in ROLES:
            raise RecordError(f"'{where}.role': unknown role {_short(role)} (expected {', '.join(ROLES)})")
        calls: tuple[dict[str, Any], ...] = ()
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise RecordError(f"'{where}': only an assistant turn makes tool calls, found role {role}")
            calls = parse_calls(_get(m, "tool_calls", where, list), f"{where}.tool_calls")
            if m.get("content") is None:  # a turn that only calls: the API sends content null
                return Turn(role, "", where, calls)
        return Turn(role, _text_content(_get(m, "content", where, (str, list)), where), where, calls)
    if "from" in m:
        who = _get(m, "from", where, str)
        if who not in SHAREGPT_ROLES:
            raise RecordError(
                f"'{where}.from': unknown role {_short(who)} (expected {', '.join(SHAREGPT_ROLES)})"
            )
        value = _get(m, "value", where, str)
        if who == "function_call":
            return Turn("assistant", "", where, parse_calls(value, f"{where}.value"))
        return Turn(SHAREGPT_ROLES[who], value, where)
    raise RecordError(f"'{where}' has neither 'role'/'content' nor 'from'/'value'")


def _record_tools(rec: dict) -> list[dict[str, Any]] | None:
    return parse_tools(rec.get("tools"))


def _system_turns(rec: dict) -> list[Turn]:
    system = _get(rec, "system", "", str, required=False)
    return [Turn("system", system, "system")] if system else []  # "" means "no system prompt"


def _parse_openai(rec: dict) -> Parsed:
    msgs = _get(rec, "messages", "", list)
    if not msgs:
        raise RecordError("'messages' is empty")
    turns = [message_turn(m, f"messages[{i}]") for i, m in enumerate(msgs)]
    return check_conversation(turns, _record_tools(rec))


def _parse_sharegpt(rec: dict) -> Parsed:
    convs = _get(rec, "conversations", "", list)
    if not convs:
        raise RecordError("'conversations' is empty")
    turns = _system_turns(rec)
    for i, t in enumerate(convs):
        where = f"conversations[{i}]"
        if isinstance(t, dict) and "from" not in t:
            _get(t, "from", where, str)  # ShareGPT turns name their speaker with 'from'
        turns.append(message_turn(t, where))
    return check_conversation(turns, _record_tools(rec))


def _parse_alpaca(rec: dict) -> Parsed:
    instruction = _get(rec, "instruction", "", str)
    inp = _get(rec, "input", "", str, required=False) or ""
    output = _get(rec, "output", "", str)
    turns = _system_turns(rec)
    history = _get(rec, "history", "", list, required=False) or []
    for j, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            found = f"an array of length {len(pair)}" if isinstance(pair, list) else _json_type(pair)
            raise RecordError(f"'history[{j}]' must be a [query, response] pair, found {found}")
        for k, (role, text) in enumerate(zip(("user", "assistant"), pair, strict=True)):
            if not isinstance(text, str):
                raise RecordError(f"'history[{j}][{k}]' must be a string, found {_json_type(text)}")
            turns.append(Turn(role, text, f"history[{j}][{k}]"))
    # The instruction, then the input (when there is one) after a blank line.
    user = "\n\n".join(p for p in (instruction, inp) if p.strip()) or instruction
    turns += [Turn("user", user, "instruction"), Turn("assistant", output, "output")]
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


def _hh_turns(text: str, key: str) -> list[Turn]:
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
        turns.append(Turn(role, text[m.end() : end].strip(), f"'{key}' turn {k + 1} ({m.group(1)})"))
    return turns
