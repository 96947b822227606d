"""Token log-probs straight from the last hidden states, without the full-vocabulary logits.

A causal LM's loss only needs, per trained position, log p(target) = z[target] - logsumexp(z) with
z = h W^T (+ b). Materialising z for N positions costs N x V floats: at Qwen's V = 151,936 and 16k
packed tokens that is ~10 GB in fp32, more than the rest of a 0.5B model's activations. Here z is
computed in chunks of positions; the forward pass keeps only logsumexp (N,), and the backward pass
recomputes each chunk's z to form its gradient, so peak extra memory is one (chunk, V) block.

`lm_logprobs` runs a Hugging Face causal LM with its output head swapped for the identity (so the
model returns hidden states where it would return logits) and applies the chunked head itself. It
falls back to the plain path (full logits, `align.rl_math.token_logprobs`) when the head is not a
plain `nn.Linear` (e.g. a LoRA-wrapped head), when the model post-processes logits (soft-capping,
logit scales), or under FSDP, whose sharded parameters only exist inside the wrapped forward pass.
The two paths agree to float rounding (tests/test_fast_paths.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from align.attention import check_no_mask_on_packed_rows
from align.hf_compat import unwrap_data_parallel
from align.rl_math import entropy_from_logits, token_logprobs

# One (chunk, V) fp32 block of logits is at most this many bytes (256 MiB) and this many positions: with a
# small vocabulary the byte bound alone let the block grow with the row (8,192 positions x 8,192 words),
# and a packed step's per-token cost with it (CPU: 1.2-1.6x at rows of 8,192 vs 1,024 tokens, from fresh
# 256 MiB blocks; the same within noise with 1,024-position blocks). Qwen's vocabulary gives 441 anyway.
CHUNK_BYTES = 1 << 28
CHUNK_POSITIONS = 1024


def default_chunk(vocab_size: int) -> int:
    """Positions per chunk: one fp32 (chunk, V) block within CHUNK_BYTES and CHUNK_POSITIONS."""
    return max(1, min(CHUNK_POSITIONS, CHUNK_BYTES // (4 * vocab_size)))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the plain path's head matmul would run in: autocast's if active, else the input's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, temperature: float
) -> torch.Tensor:
    """fp32 (c, V) logits / temperature of one chunk, the head matmul run in `dtype` like the plain path."""
    z = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    return z / temperature if temperature != 1.0 else z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] / T, chunked over positions; see `chunked_token_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):  # type: ignore[override]
        dtype = _compute_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                z = _chunk_logits(hidden[s : s + chunk], weight, bias, dtype, temperature)
                lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
                out[s : s + chunk] = (
                    z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
                )
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.temperature, ctx.chunk = dtype, temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, temperature, chunk = ctx.dtype, ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]
                z = _chunk_logits(h, weight, bias, dtype, temperature)
                # d logp[t] / dz = onehot(t) - softmax(z), times the incoming gradient g and 1/T;
                # built in place in z's buffer (one (chunk, V) block, no temporaries).
                g = (grad_out[s : s + chunk] / temperature)[:, None]
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)
                dz.scatter_add_(-1, targets[s : s + chunk, None], g.to(dz.dtype))
                if need_h:
                    grad_h[s : s + chunk] = (dz.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
                if need_w:
                    grad_w += (dz.to(dtype).T @ h.to(dtype)).float()
                if need_b:
                    grad_b += dz.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """log p(target) under softmax((h W^T + b) / temperature), never holding all (N, V) logits.

    Args:
        hidden: (N, H) last hidden states at the positions that predict `targets`.
        weight: (V, H) output-head weight; bias: (V,) or None.
        targets: (N,) token ids.
        chunk: positions per block (default: `default_chunk(V)`).
    Returns:
        (N,) fp32 log-probs, differentiable w.r.t. hidden, weight and bias.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_token_logprobs: expected hidden (N, H), targets (N,), got "
            f"{tuple(hidden.shape)} {tuple(targets.shape)}"
        )
    chunk = chunk or default_chunk(weight.shape[0])
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), chunk)


@torch.no_grad()
def chunked_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Entropy of softmax(h W^T + b) per position, (N, H) -> (N,) fp32, chunked (no gradient)."""
    chunk = chunk or default_chunk(weight.shape[0])
    dtype = _compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            out[s : s + chunk] = entropy_from_logits(
                _chunk_logits(hidden[s : s + chunk], weight, bias, dtype, 1.0)
            )
    return out


def _fast_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, head) when the chunked path is exact for this model, else None."""
    if type(model).__name__ == "FullyShardedDataParallel" or hasattr(model, "_fsdp_wrapped_module"):
        return None
    inner = unwrap_data_parallel(model)
    config = getattr(inner, "config", None)
    if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or any(p.__class__.__name__ == "DTensor" for p in head.parameters()):
        return None
    for name, module in inner.named_modules():
        if module is head and name:
            parent_name, _, attr = name.rpartition(".")
            return inner.get_submodule(parent_name), attr, head
    return None


@contextmanager
def _head_as_identity(parent: nn.Module, attr: str, head: nn.Linear) -> Iterator[None]:
    """Within the block the model returns hidden states in place of logits."""
    setattr(parent, attr, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attr, head)


def lm_logprobs(
    model: Any,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    drop_last: bool = False,
    fast: bool = True,
    **forward_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` from one forward pass of a causal LM, chunked where that is exact.

    Args:
        model: a Hugging Face causal LM, possibly wrapped (DDP, accelerate, peft).
        targets: token ids, the shape of the model's logits without the vocabulary axis (after
            dropping the last position when `drop_last`), e.g. (N,) with a boolean `logits_to_keep`
            or (B, R) with `logits_to_keep=R + 1, drop_last=True`.
        with_entropy: also return the entropy of softmax(logits) (at temperature 1, as
            `entropy_from_logits`), computed without gradient.
        fast: False forces the plain path (full logits); the two agree to float rounding.
        forward_kwargs: passed to `model(...)` (input_ids, position_ids, logits_to_keep, ...).
    Returns:
        fp32 log-probs of `targets`' shape (and the entropy, same shape, when `with_entropy`).
    """
    # Packed rows under a mask would silently attend across documents: refuse them.
    check_no_mask_on_packed_rows(forward_kwargs.get("attention_mask"), forward_kwargs.get("position_ids"))
    found = _fast_head(model) if fast else None
    if found is None:
        logits = model(**forward_kwargs).logits
        if drop_last:
            logits = logits[:, :-1]
        logps = token_logprobs(logits, targets, temperature)
        return (logps, entropy_from_logits(logits.detach())) if with_entropy else logps
    parent, attr, head = found
    with _head_as_identity(parent, attr, head):
        hidden = model(**forward_kwargs).logits
    if drop_last:
        hidden = hidden[:, :-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    logps = chunked_token_logprobs(flat, head.weight, targets.reshape(-1), head.bias, temperature)
    logps = logps.reshape(targets.shape)
    if with_entropy:
        return logps, chunked_entropy(flat.detach(), head.weight, head.bias).reshape(targets.shape)
    return logps
