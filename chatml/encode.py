"""ChatML rendering and tokenisation with SFT loss masks.

A conversation renders through the tokenizer's own chat template (`chatml.render`; plain ChatML
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn when it has none), with the tool definitions of
the conversation, so the ids equal ``apply_chat_template(messages, tools=...)``. Labels (``-100`` = no loss):

* system, user and tool turns (Qwen2.5: ``<tool_response>`` blocks inside user turns): masked;
* assistant tool calls (Qwen2.5: the ``<tool_call>`` blocks) are part of the assistant turn: trained;
* assistant turns: the header ``<|im_start|>assistant\\n`` is masked; the content and the closing
  ``<|im_end|>`` are trained (so the model learns to stop); the ``\\n`` after ``<|im_end|>`` is masked.

The whole rendered string is tokenised **once** (byte-level BPE merges across segment boundaries, so
encoding the pieces separately and concatenating gives ids different from the chat template's), and
labels are assigned from character offsets.

Boundary rule: a token is trained when its character span overlaps a trained span (an assistant content
or its ``<|im_end|>``). ``<|im_start|>`` and ``<|im_end|>`` are added tokens, which are split off before
BPE, so they never straddle. The only straddle that occurs in practice is the header's final ``\\n``
merging with content that starts with newlines (content ``"\\nHi"`` gives the token ``"\\n\\n"`` right
after ``assistant``): that token is trained, because predicting it is the model choosing how its answer
starts; this is also what transformers' ``return_assistant_tokens_mask`` does (it maps the first content
character to its token). ``<|im_start|>`` is never trained, even if it appears inside assistant text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chatml.render import IM_END, IM_START, render_with_spans

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all_assistant", "last_assistant")


class Conversation(list):
    """A list of messages that also carries the tool definitions offered in it (``tools``: OpenAI-style
    ``{"type": "function", "function": {...}}`` dicts, or None). Being a list, it works wherever a plain
    message list does; `encode_conversation` and `encode_prompt` render its ``tools``."""

    def __init__(self, messages: Sequence[Mapping[str, Any]] = (), tools: Sequence[Mapping] | None = None):
        super().__init__(messages)
        self.tools = list(tools) if tools else None

    def __reduce__(self):  # keep ``tools`` through pickling (multiprocessing, data loaders)
        return (Conversation, (list(self), self.tools))


def tools_of(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None) -> list | None:
    """The tools to render: ``tools`` when given, else those the conversation carries."""
    return list(tools) if tools else getattr(messages, "tools", None)


def _validate(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages is empty: a conversation needs at least one turn")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.200}")
        if message["role"] not in ROLES:
            raise ValueError(
                f"message {i} has unknown role {message['role']!r}; allowed roles: {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(message['content']).__name__}")


def render_conversation(
    messages: Sequence[Mapping[str, Any]],
    default_system: str | None = None,
    add_generation_prompt: bool = False,
    tokenizer: Any = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Render messages as the tokenizer's chat template does (plain ChatML without a tokenizer or
    template); with ``add_generation_prompt`` end with ``<|im_start|>assistant\\n``.

    ``default_system`` is prepended as a system turn when the first message is not one (as the Qwen2
    template does with "You are a helpful assistant."); ``"template"`` keeps the template's own default.
    """
    _validate(messages)
    return render_with_spans(
        messages,
        tokenizer,
        tools=tools_of(messages, tools),
        default_system=default_system,
        add_generation_prompt=add_generation_prompt,
    )[0]


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id ``token`` encodes to when it is one token of the vocabulary, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return ids[0]


def chatml_token_ids(tokenizer: Any) -> tuple[int, int]:
    """``(id of <|im_start|>, id of <|im_end|>)``; ValueError naming the missing one and the fix."""
    found = {token: _single_token_id(tokenizer, token) for token in (IM_START, IM_END)}
    missing = [token for token, token_id in found.items() if token_id is None]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no single token for {' and '.join(missing)}, so ChatML turns cannot be "
            "delimited. Fix: call chatml.add_chatml_tokens(tokenizer, model) to add them as special tokens "
            "and resize the model's embeddings (the new rows are untrained, so fine-tune afterwards), or use "
            "a tokenizer that already has them (Qwen2/2.5: chatml.qwen_tokenizer(); SmolLM2-Instruct)."
        )
    return found[IM_START], found[IM_END]


def add_chatml_tokens(tokenizer: Any, model: Any | None = None) -> int:
    """Add ``<|im_start|>``/``<|im_end|>`` as special tokens where missing; return how many were added.

    With ``model``, its input (and untied output) embeddings are grown to ``len(tokenizer)`` when too small
    (never shrunk: Qwen2 checkpoints carry padding rows beyond the tokenizer).
    """
    missing = [token for token in (IM_START, IM_END) if _single_token_id(tokenizer, token) is None]
    added = 0
    if missing:
        try:  # transformers 4.x name of the keyword
            added = tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_additional_special_tokens=False
            )
        except TypeError:  # transformers 5 renamed it
            added = tokenizer.add_special_tokens(
                {"extra_special_tokens": missing}, replace_extra_special_tokens=False
            )
    if model is not None:
        embeddings = model.get_input_embeddings()
        if embeddings.num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    return added


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "encode_conversation needs a fast tokenizer (character offsets); load it with use_fast=True"
        )


def _encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    _require_fast(tokenizer)
    # Same call as apply_chat_template: special tokens in the text are parsed as added tokens, nothing added.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int | None = None,
    train_on: str = "all_assistant",
    default_system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Tokenise a conversation as ChatML with SFT labels.

    Returns ``{"input_ids": list[int], "labels": list[int], "truncated": bool, "num_trainable": int}``;
    ``labels`` is ``-100`` where no loss is taken (see the module docstring for the rule). ``train_on`` is
    ``"all_assistant"`` or ``"last_assistant"`` (only the final assistant turn is trained). ``max_length``
    truncates ids and labels together from the right. With the Qwen2 template and
    ``default_system="You are a helpful assistant."`` (or ``"template"``) the ids equal
    ``tokenizer.apply_chat_template(messages)``. ``tools`` (default: the conversation's own, see
    `Conversation`) are rendered as the template renders them.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    im_start_id, _ = chatml_token_ids(tokenizer)
    _require_fast(tokenizer)
    _validate(messages)
    text, spans = render_with_spans(
        messages, tokenizer, tools=tools_of(messages, tools), default_system=default_system
    )
    if train_on == "last_assistant":
        spans = spans[-1:]
    ids, offsets = _encode_text(tokenizer, text)

    # Character mask of the trained spans; a token is trained if its span overlaps it.
    mask = bytearray(len(text))
    for start, end in spans:
        mask[start:end] = b"\x01" * (end - start)
    labels = []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        # max(end, start + 1): a zero-width token (none are expected) takes the character it sits on.
        trained = token_id != im_start_id and mask.find(1, start, max(end, start + 1)) != -1
        labels.append(token_id if trained else IGNORE_INDEX)

    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids,
        "labels": labels,
        "truncated": truncated,
        "num_trainable": sum(label != IGNORE_INDEX for label in labels),
    }


def encode_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    default_system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the generation prompt: the conversation followed by ``<|im_start|>assistant\\n``.

    Equals ``apply_chat_template(messages, tools=tools, add_generation_prompt=True)`` (with the template's
    default system prompt when ``default_system`` is ``"template"``, or is that prompt). ``tools`` default
    to the conversation's own (see `Conversation`).
    """
    chatml_token_ids(tokenizer)
    _require_fast(tokenizer)
    _validate(messages)
    text, _ = render_with_spans(
        messages,
        tokenizer,
        tools=tools_of(messages, tools),
        default_system=default_system,
        add_generation_prompt=True,
    )
    return _encode_text(tokenizer, text)[0]
