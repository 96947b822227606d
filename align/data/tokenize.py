"""Tokenisation of loaded data: SFT conversations with ChatML loss masks, preference pairs as the
sequences a reward model scores."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from align.data.records import DataReport, TokenStats

# Above this many records tokenisation shows a progress bar.
PROGRESS_MIN_RECORDS = 2000


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
