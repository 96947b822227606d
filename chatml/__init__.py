"""ChatML rendering and tokenisation with SFT loss masks, and the real Qwen2/2.5 tokenizer built offline."""

from chatml.encode import (
    IGNORE_INDEX,
    IM_END,
    IM_START,
    ROLES,
    Conversation,
    add_chatml_tokens,
    chatml_token_ids,
    encode_conversation,
    encode_prompt,
    render_conversation,
    tools_of,
)
from chatml.qwen_tokenizer import qwen_tokenizer
from chatml.render import (
    TEMPLATE_SYSTEM,
    TemplateError,
    render_with_spans,
    resolve_default_system,
    template_default_system,
)
from chatml.templates import (
    QWEN2_5_CHAT_TEMPLATE,
    QWEN2_5_DEFAULT_SYSTEM,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_DEFAULT_SYSTEM,
)

__all__ = [
    "IGNORE_INDEX",
    "IM_END",
    "IM_START",
    "QWEN2_5_CHAT_TEMPLATE",
    "QWEN2_5_DEFAULT_SYSTEM",
    "QWEN2_CHAT_TEMPLATE",
    "QWEN2_DEFAULT_SYSTEM",
    "ROLES",
    "TEMPLATE_SYSTEM",
    "Conversation",
    "TemplateError",
    "add_chatml_tokens",
    "chatml_token_ids",
    "encode_conversation",
    "encode_prompt",
    "qwen_tokenizer",
    "render_conversation",
    "render_with_spans",
    "resolve_default_system",
    "template_default_system",
    "tools_of",
]
