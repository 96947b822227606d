"""Prompt files for PPO and the online methods: JSONL of ``{"messages": [...]}`` or ``{"prompt": "..."}``,
optionally with ``tools`` (the tool definitions the policy may call, rendered into the prompt as the chat
template does). A prompt ends with a user turn or a tool result; a full conversation's trailing assistant
turns are dropped (its last reply is generated anew). There is no skip mode: a bad line is a `DataError`
naming it as ``file:line: reason``."""

from __future__ import annotations

from pathlib import Path

from align.data.conversations import check_turns, message_turn
from align.data.records import DataError, RecordError
from align.data.sources import iter_jsonl_values
from align.data.tools import parse_tools
from chatml.encode import Conversation

SHAPE_REASON = "expected 'messages' or 'prompt' with role/content turns"


def load_prompt_file(path: str | Path) -> list[Conversation]:
    """The prompts of a JSONL file, each a `chatml.Conversation` (carrying its ``tools``)."""
    prompts = []
    for lineno, record in iter_jsonl_values(path):  # invalid UTF-8/JSON, empty file: file:line errors
        try:
            prompts.append(_prompt(record))
        except RecordError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return prompts


def _prompt(record: object) -> Conversation:
    if not isinstance(record, dict):
        raise RecordError(SHAPE_REASON)
    messages = record.get("messages")
    if messages is None and "prompt" in record:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages:
        raise RecordError(SHAPE_REASON)
    turns = [message_turn(m, f"messages[{i}]") for i, m in enumerate(messages)]
    while turns and turns[-1].role == "assistant":
        turns.pop()  # a full conversation: generate its last reply anew
    if not turns or turns[-1].role not in ("user", "tool"):
        raise RecordError("a prompt must end with a user (or tool) turn")
    tools = parse_tools(record.get("tools"))
    check_turns(turns, tools)
    return Conversation([t.message() for t in turns], tools)
