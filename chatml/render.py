"""Rendering through the tokenizer's own chat template, with the character spans of the assistant replies.

The text is the template's (``apply_chat_template(messages, tools=..., tokenize=False)``), so the ids equal
``apply_chat_template(messages, tools=...)`` for any template that renders conversations prefix by prefix,
without code per template: tool definitions, tool calls and tool results come out exactly as the model's
template writes them (Qwen2.5: a ``# Tools`` system block, ``<tool_call>`` blocks in assistant turns,
``<tool_response>`` blocks in user turns).

The trained span of assistant turn *i* is found by rendering prefixes: the conversation before it with
the generation prompt (``...<|im_start|>assistant\\n``) ends where the reply starts, and the conversation
through it ends at the reply's ``<|im_end|>`` (the template's ``\\n`` after it is not part of the span).
A template for which these prefixes are not prefixes of the whole text is refused rather than guessed at.

Cost, measured on 2 cores (400 MedicalGPT ShareGPT conversations, 393k tokens, Qwen2 template): 211k
tokens/s against 280k for the hand-written ChatML renderer this replaced, with identical ids. Tokenising is
done once per data set and is ~2,000x faster than training here (and 3x an H100's SFT rate), so there is
no hand path.

A template that would drop part of a record (Qwen2-Instruct's renders neither ``tools`` nor tool calls)
is refused for such records: the model would be trained on a reply with the call left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# `default_system` value meaning "what the template does when a conversation has no system turn" (Qwen2.5:
# "You are Qwen, created by Alibaba Cloud. ..."; a template-less tokenizer: nothing). None or "none": no
# system prompt at all (the template's default system turn is left out, unless it carries tool definitions).
TEMPLATE_SYSTEM = "template"
NO_SYSTEM = ("none",)

# Tokenizers without a chat template render as plain ChatML (the Qwen2 template without its default system).
PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROBE = "\ue000probe\ue001"  # private-use text that no template writes itself


class TemplateError(ValueError):
    """The chat template cannot render this conversation faithfully (it drops tools or calls, or is not
    prefix-consistent)."""


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or plain ChatML when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else PLAIN_CHATML_TEMPLATE


def _render_raw(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, Any],
) -> str:
    # transformers' own renderer (the one apply_chat_template calls), so the text is the same by construction.
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as apply_chat_template does
    rendered, _ = render_jinja_template(
        conversations=[chat],
        tools=list(tools) if tools else None,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **special_tokens,
    )
    return rendered[0]


_FACTS: dict[tuple[str, str], tuple[str, bool, bool]] = {}


def _template_facts(template: str, special: Mapping[str, Any]) -> tuple[str, bool, bool]:
    """(the text the template puts before the first user turn when there is no system turn, whether it
    renders ``tools``, whether it renders tool calls); found once per template by rendering probes."""
    key = (template, repr(sorted(special.items())))
    if key in _FACTS:
        return _FACTS[key]
    text = _render_raw(template, [{"role": "user", "content": _PROBE}], None, False, special)
    auto_system = text[: text.index(f"{IM_START}user")] if f"{IM_START}user" in text else ""
    tool = {"type": "function", "function": {"name": _PROBE, "parameters": {}}}
    try:
        renders_tools = _PROBE in _render_raw(
            template, [{"role": "user", "content": "q"}], [tool], False, special
        )
    except Exception:  # a template that cannot take tools at all
        renders_tools = False
    call = {"type": "function", "function": {"name": _PROBE, "arguments": {}}}
    try:
        with_call = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        renders_calls = _PROBE in _render_raw(template, with_call, None, False, special)
    except Exception:  # e.g. a template that concatenates content and fails on a call-only turn
        renders_calls = False
    _FACTS[key] = (auto_system, renders_tools, renders_calls)
    return _FACTS[key]


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    # apply_chat_template passes the special tokens (bos_token, eos_token, ...) to the template.
    return dict(getattr(tokenizer, "special_tokens_map", None) or {})


def template_default_system(tokenizer: Any) -> str | None:
    """The system prompt the tokenizer's template adds to a conversation that has none (read off a
    rendering of a one-turn conversation), or None when it adds none."""
    auto_system, _, _ = _template_facts(chat_template_of(tokenizer), _special_tokens(tokenizer))
    head, tail = f"{IM_START}system\n", f"{IM_END}\n"
    if auto_system.startswith(head) and auto_system.endswith(tail):
        return auto_system[len(head) : -len(tail)]
    return None


def resolve_default_system(default_system: str | None, tokenizer: Any) -> str | None:
    """A ``default_system`` setting as a prompt: ``"template"`` -> the template's own default (may be
    None), None or ``"none"`` -> None, any other string -> itself."""
    if default_system is None or default_system.strip().lower() in NO_SYSTEM:
        return None
    if default_system == TEMPLATE_SYSTEM:
        return template_default_system(tokenizer)
    return default_system


def render_with_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    default_system: str | None = None,
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for ``messages`` and the character span [reply start, end of its <|im_end|>)
    of every assistant turn. ``default_system``: see `resolve_default_system`; inserted as a system turn
    when the conversation has none."""
    template = chat_template_of(tokenizer)
    special = _special_tokens(tokenizer)
    auto_system, renders_tools, renders_calls = _template_facts(template, special)
    if tools and not renders_tools:
        raise TemplateError(
            "this tokenizer's chat template does not render tool definitions (Qwen2-Instruct's does not), so "
            "the model would be trained without seeing the tools; use a template that does "
            "(chatml.qwen_tokenizer(template='qwen2.5'))"
        )
    if not renders_calls and any(m.get("tool_calls") for m in messages):
        raise TemplateError(
            "this tokenizer's chat template does not render tool calls (Qwen2-Instruct's does not): the calls "
            "would be trained as empty replies; use a template that does (chatml.qwen_tokenizer(template='qwen2.5'))"
        )
    msgs = list(messages)
    has_system = bool(msgs) and msgs[0]["role"] == "system"
    system = default_system
    if system == TEMPLATE_SYSTEM:
        system = None  # the template adds its own default: nothing to insert, nothing to strip
        strip = ""
    else:
        system = resolve_default_system(system, tokenizer)
        # "No system prompt": leave out the default system turn the template inserts by itself, unless that
        # turn is where the template writes the tool definitions.
        strip = auto_system if system is None and not has_system and not tools else ""
    if system is not None and not has_system:
        msgs.insert(0, {"role": "system", "content": system})

    def render(part: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
        text = _render_raw(template, part, tools, generation_prompt, special)
        return text[len(strip) :] if strip and text.startswith(strip) else text

    text = render(msgs, add_generation_prompt)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:i], True)
        through = render(msgs[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError(
                f"the chat template does not render message {i} as a continuation of the messages before it, "
                "so its reply cannot be located; render this conversation with a template that does"
            )
        end = through.rfind(IM_END)
        end = len(through) if end < len(before) else end + len(IM_END)
        spans.append((len(before), end))
    return text, spans
