"""Document-masked attention for packed, padding-free rows, without a (T, T) mask.

A packed row holds several documents back to back, ``position_ids`` restarting at 0 for each. Under the
stock ``sdpa``/``eager`` kernels transformers turns those positions into a dense block-diagonal (T, T) mask:
no flash kernel, K/V repeated per query group, T^2 work per layer. Here the row is described by cumulative
document lengths (``cu_seq_lens_q/k``, ``max_length_q/k``, transformers' own names for the varlen kwargs)
and attention runs per document:

* CUDA (compute capability >= 8.0), bf16/fp16, head size <= 256 and a multiple of 8, no attention dropout:
  torch's FlashAttention-2 varlen kernel (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10),
  grouped K/V passed unrepeated. The gate is :func:`varlen_kernel_refusal`, a pure function.
* otherwise (CPU, fp32, an older GPU, another head size, attention dropout in training): causal SDPA per
  document, exact, which is also the reference the tests check. :func:`packed_attention_plan` says at a
  run's setup which of the two its packed rows take, and why.

Registered with transformers as :data:`DOC_ATTENTION` (the name must not contain "flash": transformers
switches on flash-attn-only code for such names). Its mask function returns no mask when the call has no
padding and no cache (causal or packed; the documents come from the kwargs or from ``position_ids``), and
the ``sdpa`` mask otherwise, so padded batches and KV-cache decoding run as under ``sdpa``.

Pass :func:`document_kwargs` (computed once per batch, e.g. from the packing metadata) to the model: without
them each layer re-derives the documents from ``position_ids`` (exact, but on CUDA a host sync per layer).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DOC_ATTENTION = "align_varlen"
# `attn_implementation` values: ours by default, transformers' own kernels on request.
AUTO = "auto"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch: the per-document path serves every device
    _varlen_attn = None
    _VARLEN_PARAMS = set()


def document_kwargs(seq_lens: Sequence[int], device: torch.device | str) -> dict[str, Any]:
    """Varlen kwargs for one flattened row made of documents of ``seq_lens`` tokens (no host sync).

    Returns ``cu_seq_lens_q``/``cu_seq_lens_k`` (D + 1,) int32 (0, then the cumulative lengths) and
    ``max_length_q``/``max_length_k`` (int), to pass to the model alongside ``position_ids``.
    """
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"document lengths must be positive, got {list(seq_lens)[:8]}")
    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + int(n))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    longest = max(int(n) for n in seq_lens)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


def lengths_from_positions(positions: Sequence[int]) -> list[int]:
    """Document lengths of one packed row's positions (a document starts where the position does not
    go up by one), e.g. [0, 1, 2, 0, 1] -> [3, 2]."""
    lengths: list[int] = []
    for i, p in enumerate(positions):
        if i == 0 or p != positions[i - 1] + 1:
            lengths.append(0)
        lengths[-1] += 1
    return lengths


def document_kwargs_from_positions(position_ids: torch.Tensor) -> dict[str, Any]:
    """Varlen kwargs for (B, T) ``position_ids`` flattened to B * T tokens.

    A document starts at each row start and wherever the position does not go up by one (transformers'
    rule, ``masking_utils.find_packed_sequence_indices``). One host sync (the longest document) on CUDA.
    """
    batch, width = position_ids.shape
    flat = position_ids.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    start[::width] = True
    cu = torch.cat([start.nonzero().squeeze(1), flat.new_tensor([batch * width])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def check_no_mask_on_packed_rows(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> None:
    """Refuse an attention mask over a packed row (positions restarting between two real tokens).

    With a 2D mask transformers skips the document detection, so an all-ones mask silently lets packed
    documents attend to each other under ``sdpa``/``eager``. Left/right padding with positions counted over
    real tokens passes. One host sync on CUDA.
    """
    if (
        attention_mask is None
        or position_ids is None
        or attention_mask.ndim != 2
        or position_ids.shape[-1] < 2
        or position_ids.shape[-1] != attention_mask.shape[-1]  # a KV cache: the mask covers past tokens too
    ):
        return
    real = attention_mask.bool()
    both_real = real[:, 1:] & real[:, :-1]
    restart = position_ids[..., 1:] != position_ids[..., :-1] + 1
    if bool((both_real & restart).any()):
        raise ValueError(
            "attention_mask given with packed rows (position_ids restart between real tokens): the mask "
            "disables document separation. Pass packed rows without attention_mask."
        )


# Every layer of one forward pass gets the same position_ids tensor: derive its documents once.
# Key: the tensor, its version and the batch size (a (1, T) tensor expanded to another batch is another row
# layout); value: the kwargs, or None for rows of one document each.
_derived: tuple[Any, int, int, dict[str, Any] | None] | None = None


def _documents_of(position_ids: torch.Tensor, batch: int) -> dict[str, Any] | None:
    """`document_kwargs_from_positions` of (1 or B, T) positions expanded to ``batch`` rows, or None when
    every row is one document; cached per tensor and batch size."""
    global _derived
    # Inference tensors (made under torch.inference_mode, as in evaluation) have no version counter to
    # tell an in-place change: derive theirs anew in every layer rather than trust a stale cache.
    cacheable = not position_ids.is_inference()
    if (
        cacheable
        and _derived is not None
        and _derived[0]() is position_ids
        and _derived[1] == position_ids._version
        and _derived[2] == batch
    ):
        return _derived[3]
    found: dict[str, Any] | None = document_kwargs_from_positions(position_ids.expand(batch, -1))
    if found["cu_seq_lens_q"].numel() == batch + 1:
        found = None
    if cacheable:
        _derived = (weakref.ref(position_ids), position_ids._version, batch, found)
    return found


def _check_documents_cover(cu: torch.Tensor, tokens: int, *, sync: bool) -> None:
    """The documents must end where the batch ends: tokens past ``cu[-1]`` would be left uninitialised.

    ``sync`` (CPU tensors): checked on the host, a ValueError. Else (CUDA) without a host sync, by
    ``torch._assert_async``: a mismatch stops the run at a later kernel launch instead of training on
    garbage rows.
    """
    if sync:
        if int(cu[-1]) != tokens:
            raise ValueError(
                f"{DOC_ATTENTION}: cu_seq_lens_q ends at {int(cu[-1])}, the batch has {tokens} tokens"
            )
    else:
        torch._assert_async(
            cu[-1] == tokens, f"{DOC_ATTENTION}: cu_seq_lens_q does not end at {tokens} tokens"
        )


def _kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype sdpa would compute in: autocast's where active (rotary may have promoted q to fp32)."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype


def varlen_kernel_refusal(
    *,
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    dropout: float,
    scaling: float | None = None,
    params: Collection[str] | None = None,
) -> str | None:
    """Why FlashAttention-2 varlen cannot run a call described by these facts, or None when it can.

    A pure function of the facts (no tensor, no GPU needed), so the gate is tested on the CPU. The kernel
    needs CUDA with compute capability >= 8.0 (Ampere), bf16/fp16, a head size <= 256 and a multiple of 8,
    no attention dropout (it has none), and an installed signature that can say "causal" and the scale
    (``params``, read with inspect: the arguments changed between torch 2.10 and 2.12; default: the
    installed kernel's). Where it says no, per-document SDPA runs: exact, slower.
    """
    params = _VARLEN_PARAMS if params is None else params
    if not params:
        return "torch has no varlen_attn (torch < 2.10)"
    if device_type != "cuda":
        return f"device {device_type}, not CUDA"
    if capability is None or tuple(capability) < (8, 0):
        return f"compute capability {capability}, FlashAttention-2 needs >= (8, 0)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} compute, the kernel takes bf16/fp16 only"
    if head_dim > 256 or head_dim % 8:
        return f"head size {head_dim}, the kernel takes <= 256 and a multiple of 8"
    if dropout != 0.0:
        return f"attention dropout {dropout}, the kernel has none"
    if "window_size" not in params and "is_causal" not in params:
        return "this torch's varlen_attn cannot say causal"
    if "scale" not in params and not (scaling is None or abs(scaling - head_dim**-0.5) < 1e-9):
        return f"scale {scaling} is not 1/sqrt(head size), and this torch's varlen_attn takes no scale"
    return None


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device, asked once (a per-layer call is then a dict look-up)."""
    return torch.cuda.get_device_capability(device)


def _device_facts(t: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """(device type, CUDA compute capability or None) of the tensor the kernel would get."""
    return t.device.type, _capability(t.device) if t.is_cuda else None


def _use_varlen_kernel(q: torch.Tensor, dtype: torch.dtype, dropout: float, scaling: float | None) -> bool:
    """:func:`varlen_kernel_refusal` of this call: q (N, H, D) in the kernel's ``dtype``."""
    device_type, capability = _device_facts(q)
    refusal = varlen_kernel_refusal(
        device_type=device_type,
        capability=capability,
        dtype=dtype,
        head_dim=q.shape[-1],
        dropout=dropout,
        scaling=scaling,
    )
    return _varlen_attn is not None and refusal is None


def _varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scaling) -> torch.Tensor:
    """FlashAttention-2 varlen: q (N, H, D), k/v (N, Hkv, D) -> (N, H, D); causal within each document."""
    kwargs: dict[str, Any] = {"scale": scaling} if "scale" in _VARLEN_PARAMS else {}
    if "window_size" in _VARLEN_PARAMS:  # newer torch: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:  # a kernel without GQA needs the K/V heads repeated
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _per_document_sdpa(q, k, v, cu: list[int], scaling, dropout: float) -> torch.Tensor:
    """Causal SDPA per document: q (N, H, D), k/v (N, Hkv, D) -> (N, H, D). Work is the sum of each
    document's length squared, not the row's; documents of one length run as one batch."""
    out = q.new_empty(q.shape)
    gqa = k.shape[1] != q.shape[1]
    by_len: dict[int, list[int]] = {}
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        if e > s:
            by_len.setdefault(e - s, []).append(s)
    for n, starts in by_len.items():
        if len(starts) == 1:
            idx: Any = slice(starts[0], starts[0] + n)
            qd, kd, vd = (x[idx].transpose(0, 1)[None] for x in (q, k, v))
        else:
            idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(
                -1
            )
            qd, kd, vd = (
                x[idx].view(len(starts), n, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v)
            )
        o = F.scaled_dot_product_attention(
            qd, kd, vd, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )  # (docs, H, n, D)
        out[idx] = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return out


def document_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key/value (B, Hkv, S, D) -> (B, T, H, D).

    Packed (varlen kwargs given, or no mask, no cache and restarting ``position_ids``): per-document causal
    attention over the B * T flattened tokens. Anything else (padding mask, KV cache): ``sdpa``.
    """
    batch, heads, q_len, head_dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is not None:
        raise ValueError(f"{DOC_ATTENTION}: packed rows (cu_seq_lens_q) must come without an attention mask")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"{DOC_ATTENTION} has no sliding-window attention; load with attn_implementation=sdpa"
        )
    if cu is None and attention_mask is None and q_len == key.shape[2] and q_len > 1:
        positions = kwargs.get("position_ids")
        if positions is not None:
            found = _documents_of(positions, batch)
            if found is not None:
                cu, kwargs = found["cu_seq_lens_q"], {**kwargs, **found}
    if cu is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _check_documents_cover(cu, batch * q_len, sync=cu.device.type == "cpu")
    dtype = _kernel_dtype(query)
    # (B, H, T, D) -> (B * T, H, D): the varlen layout, one token per row.
    q, k, v = (x.to(dtype).transpose(1, 2).reshape(-1, x.shape[1], head_dim) for x in (query, key, value))
    if _use_varlen_kernel(q, dtype, dropout, scaling):
        out = _varlen_cuda(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu,
            kwargs.get("cu_seq_lens_k", cu),
            int(kwargs["max_length_q"]),
            int(kwargs.get("max_length_k", kwargs["max_length_q"])),
            scaling,
        )
    else:
        out = _per_document_sdpa(q, k, v, cu.tolist(), scaling, dropout)
    return out.view(batch, q_len, heads, head_dim), None


def document_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for :data:`DOC_ATTENTION`: none without padding and cache (the attention function
    separates the documents itself), else the ``sdpa`` mask. Never builds a (T, T) mask for packed rows."""
    no_cache = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if attention_mask is None and no_cache:
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> None:
    """Make :data:`DOC_ATTENTION` a valid ``attn_implementation`` (idempotent; done on import)."""
    AttentionInterface.register(DOC_ATTENTION, document_attention_forward)
    AttentionMaskInterface.register(DOC_ATTENTION, document_mask)


def resolve_attn_implementation(name: str | None, config: Any) -> str:
    """``auto`` (the default) -> :data:`DOC_ATTENTION`, or ``sdpa`` for models with sliding-window layers,
    which it does not implement; any other name is returned as given (sdpa, eager, flash_attention_2)."""
    if name not in (None, AUTO):
        return name
    sliding = getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or []
    )
    return "sdpa" if sliding else DOC_ATTENTION


# What packed rows run through under each implementation other than ours (see packed_attention_plan).
_BLOCK_MASK = "with transformers' block-diagonal (T, T) mask from position_ids (exact without a KV cache)"
_OTHER_PATHS = {
    "sdpa": f"sdpa {_BLOCK_MASK}",
    "eager": f"eager {_BLOCK_MASK}",
    "flash_attention_2": "transformers' flash_attention_2 varlen with the row's cu_seq_lens",
}


def attention_dropout_of(config: Any) -> float:
    """The dropout on attention probabilities a model config sets: ``attention_dropout`` (Llama, Qwen2,
    Phi3), ``attn_pdrop`` (GPT-2), ...; 0.0 where it has none."""
    for key, value in vars(config).items():
        if isinstance(value, float) and "drop" in key and ("attn" in key or "attention" in key):
            return value
    return 0.0


def packed_attention_plan(
    config: Any,
    *,
    device_type: str,
    compute_dtype: torch.dtype,
    capability: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Which attention a loaded model's packed rows take in training and in evaluation, and why.

    Returns ``attn_implementation`` and, per phase (``training``: the config's attention dropout applies;
    ``evaluation``: none), the path and, for :data:`DOC_ATTENTION`, the reason FlashAttention-2 varlen does
    not run (``*_reason``, None where it does). ``capability``: the CUDA compute capability (default: the
    current device's). For a run's setup line and summary: the kernel gate decides per call with the same
    :func:`varlen_kernel_refusal`.
    """
    name = getattr(config, "_attn_implementation", None)
    plan: dict[str, Any] = {"attn_implementation": name}
    if name != DOC_ATTENTION:
        path = _OTHER_PATHS.get(name, f"{name} (not checked to keep packed documents apart)")
        return {
            **plan,
            "training": path,
            "training_reason": None,
            "evaluation": path,
            "evaluation_reason": None,
        }
    if device_type == "cuda" and capability is None and torch.cuda.is_available():
        capability = _capability(torch.device("cuda", torch.cuda.current_device()))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    facts = {
        "device_type": device_type,
        "capability": capability,
        "dtype": compute_dtype,
        "head_dim": head_dim,
    }
    for phase, dropout in (("training", attention_dropout_of(config)), ("evaluation", 0.0)):
        why = varlen_kernel_refusal(**facts, dropout=dropout)
        plan[phase] = "FlashAttention-2 varlen" if why is None else "per-document sdpa (exact)"
        plan[f"{phase}_reason"] = why
    return plan


def describe_plan(plan: dict[str, Any]) -> str:
    """One line for a run's log: the attention of packed rows in training and evaluation, and why."""

    def phase(key: str) -> str:
        why = plan[f"{key}_reason"]
        return plan[key] + (f" ({why})" if why else "")

    both = phase("training") if plan["training"] == plan["evaluation"] else None
    where = (
        f"through {both}"
        if both
        else f"train through {phase('training')}, evaluate through {phase('evaluation')}"
    )
    return f"attention: attn_implementation={plan['attn_implementation']}, packed rows {where}"


register()
