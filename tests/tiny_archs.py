"""Tiny causal LMs of several architectures, built from config, for the fast-path switch matrix.

Each differs where a fast path could go wrong: Qwen2 (grouped K/V, QKV bias, untied head), Llama (grouped
K/V, tied head), GPT-2 (learned positions, fused QKV Conv1D, no grouped K/V), Phi3 (fused QKV projection).
Under sdpa/eager transformers separates packed documents only when the call passes ``use_cache=False``
(with the config's cache on it skips its packed-row detection: 0.1-0.3 logit errors).
"""

from __future__ import annotations

from typing import Any

import torch

ARCHITECTURES = ("qwen2", "llama", "gpt2", "phi3")


def tiny_config(arch: str, vocab: int = 128, dropout: float = 0.0) -> Any:
    """The config of a 2-layer model of `arch` with hidden size 32 and `vocab` ids; `dropout` on every
    dropout the config has (attention, hidden, embeddings)."""
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            attention_dropout=dropout, **common,
        )  # fmt: skip
    if arch == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            attention_dropout=dropout, **common,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, **common,
        )  # fmt: skip
    if arch == "phi3":
        return Phi3Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
            attention_dropout=dropout, resid_pdrop=dropout, embd_pdrop=dropout, **common,
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHITECTURES}")


def tiny_causal_lm(
    arch: str,
    vocab: int = 128,
    *,
    attn_implementation: str = "align_varlen",
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A seeded tiny `arch` causal LM in eval mode, with the given attention implementation."""
    from transformers import AutoModelForCausalLM

    import align.attention  # noqa: F401  (registers align_varlen)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab, dropout), attn_implementation=attn_implementation
    )
    return model.to(dtype).eval()
