"""Preference-pair formats (explicit pairs, HH-RLHF / message conversations sharing a prefix,
LLaMA-Factory ShareGPT pairs, OpenAssistant trees)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from align.data.conversations import SHAREGPT_ROLES, _hh_turns, _text_content, check_conversation
from align.data.records import (
    _SURROGATE,
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
