"""Preference-pair formats (explicit pairs, HH-RLHF / message conversations sharing a prefix,
LLaMA-Factory ShareGPT pairs, OpenAssistant trees), and the prompt groups of pairs that carry a ``group``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from align.data.conversations import Turn, _hh_turns, _system_turns, check_conversation, message_turn
from align.data.records import (
    _SURROGATE,
    Parsed,
    RecordError,
    RecordFormat,
    _get,
    _json_type,
    _short,
    register_format,
)
from align.data.tools import parse_tools

# --------------------------------------------------------------------------------------------------
# Preference pairs: every format becomes {"prompt", "chosen", "rejected", "margin"}, where the prompt is
# the shared conversation (ending in a user turn, usually) and chosen/rejected are the response turns
# (ending in the assistant turn the reward model scores). A record may give several pairs (an
# OpenAssistant tree), so a parser's value is a list of pairs. A pair, hh or sharegpt record may carry a
# ``group`` (the prompt it was sampled for: `align.pipeline.sample_pairs` writes the prompt's index), kept on the
# pair as ``"group"`` only when present, so records without one load exactly as before.

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


def _group(rec: dict) -> int | str | None:
    """The optional ``group`` field: an integer or a string naming the prompt the pair belongs to."""
    g = rec.get("group")
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, int | str):
        raise RecordError(f"'group' must be an integer or a string, found {_json_type(g)}")
    return g


def _turns(value: Any, where: str, text_role: str) -> list[Turn]:
    """A prompt or a response: a string (one turn of ``text_role``), a message object, or a list of them."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise RecordError(f"'{where}' contains a lone surrogate (invalid Unicode)")
        return [Turn(text_role, value, where)]
    if isinstance(value, dict):
        return [message_turn(value, where)]
    if isinstance(value, list):
        if not value:
            raise RecordError(f"'{where}' is empty")
        return [message_turn(m, f"{where}[{i}]") for i, m in enumerate(value)]
    raise RecordError(f"'{where}' must be a string, an object or an array, found {_json_type(value)}")


def _messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    return [t.message() for t in turns]


def make_pair(
    prompt: Sequence[Turn],
    chosen: Sequence[Turn],
    rejected: Sequence[Turn],
    margin: float | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Check one comparison and return it as ``{"prompt", "chosen", "rejected", "margin"}`` messages
    (plus ``"tools"`` when the record defines tools; a reply may be a tool call).

    ``prompt``, ``chosen`` and ``rejected`` hold turns (`Turn`, or (role, content, where) tuples). Each
    response ends with the assistant turn that is scored; prompt + response must be a valid conversation
    (the rules of `check_conversation`, calls checked against ``tools``), except that the scored reply may
    be empty (saying nothing can be the better answer; such pairs are noted); the prompt has a user turn;
    chosen and rejected differ (beyond surrounding whitespace). Returns the pair and its notes.
    """
    prompt, chosen, rejected = ([Turn(*t) for t in turns] for turns in (prompt, chosen, rejected))
    if not any(t.role == "user" for t in prompt):
        raise RecordError("the prompt has no user turn")
    notes = []
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise RecordError(f"'{name}' is empty")
        last = response[-1]
        if last.role != "assistant":
            raise RecordError(
                f"'{last.where}': the {name} response must end with an assistant turn, found {last.role}"
            )
        if not last.content.strip() and not last.calls:
            notes.append(EMPTY_RESPONSE_NOTE)
            response = [*response[:-1], last._replace(content="(empty)")]  # the checker refuses empty replies
        check_conversation([*prompt, *response], tools)
    if [t.key() for t in chosen] == [t.key() for t in rejected]:
        raise RecordError(IDENTICAL_REASON)
    pair = {
        "prompt": _messages(prompt),
        "chosen": _messages(chosen),
        "rejected": _messages(rejected),
        "margin": margin,
    }
    if tools:
        pair["tools"] = tools
    return pair, tuple(dict.fromkeys(notes))


def _one_pair(
    prompt: list,
    chosen: list,
    rejected: list,
    margin: float | None,
    tools: list | None = None,
    group: int | str | None = None,
) -> Parsed:
    pair, notes = make_pair(prompt, chosen, rejected, margin, tools)
    if group is not None:
        pair["group"] = group
    return Parsed([pair], notes)


def _split_shared_prefix(chosen: list[Turn], rejected: list[Turn], what: str) -> tuple[list, list, list]:
    """Full conversations that share a prefix and differ in the last assistant turn -> (prompt, c, r)."""
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1].role != "assistant":
            raise RecordError(f"'{turns[-1].where}': the {name} {what} must end with an assistant turn")
    if len(chosen) != len(rejected):
        raise RecordError(
            f"the chosen and rejected {what}s have {len(chosen)} and {len(rejected)} turns; they must share "
            "every turn but the last assistant turn"
        )
    for k, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if c.key() != r.key():
            raise RecordError(
                f"the chosen and rejected {what}s differ at turn {k + 1} ({c.where}), before the last assistant "
                "turn; they must share every turn but the last"
            )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _parse_pref_explicit(rec: dict) -> Parsed:
    """``{prompt, chosen, rejected}``: prompt a string or messages, responses strings or messages."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"missing field '{key}'")
    prompt = _turns(rec["prompt"], "prompt", "user")
    if prompt[0].role != "system":
        prompt[:0] = _system_turns(rec)
    chosen = _turns(rec["chosen"], "chosen", "assistant")
    rejected = _turns(rec["rejected"], "rejected", "assistant")
    return _one_pair(prompt, chosen, rejected, _margin(rec), parse_tools(rec.get("tools")), _group(rec))


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
    if [x.key() for x in c] == [x.key() for x in r]:
        raise RecordError(IDENTICAL_REASON)
    prompt, c_last, r_last = _split_shared_prefix(c, r, what)
    return _one_pair(prompt, c_last, r_last, _margin(rec), parse_tools(rec.get("tools")), _group(rec))


def _parse_pref_sharegpt(rec: dict) -> Parsed:
    """ShareGPT pairs (LLaMA-Factory): ``conversations`` then ``chosen``/``rejected`` {from, value}."""
    convs = _get(rec, "conversations", "", list)
    if not convs:
        raise RecordError("'conversations' is empty")
    prompt = _system_turns(rec) + _turns(convs, "conversations", "user")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"missing field '{key}'")
    chosen = _turns(rec["chosen"], "chosen", "assistant")
    rejected = _turns(rec["rejected"], "rejected", "assistant")
    return _one_pair(prompt, chosen, rejected, _margin(rec), parse_tools(rec.get("tools")), _group(rec))


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _parse_oasst(rec: dict) -> Parsed:
    """An OpenAssistant message tree: for every message, each two ranked assistant replies (rank 0 =
    best) give a pair with the conversation up to that message as the prompt. Deleted messages (and
    what follows them) and replies failing review are left out; equal ranks are no preference."""
    root = _get(rec, "prompt", "", dict)
    pairs: list[dict[str, Any]] = []
    notes: set[str] = set()
    # (node, where, turns before it); iterative so a deep tree cannot exhaust the stack.
    stack: list[tuple[dict, str, list[Turn]]] = [(root, "prompt", [])]
    while stack:
        node, where, before = stack.pop()
        role = _get(node, "role", where, str)
        if role not in OASST_ROLES:
            raise RecordError(f"'{where}.role': unknown role {_short(role)} (expected prompter or assistant)")
        turns = [*before, Turn(OASST_ROLES[role], _get(node, "text", where, str), f"{where}.text")]
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
                chosen = [Turn("assistant", text_a, where_a)]
                rejected = [Turn("assistant", text_b, where_b)]
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
