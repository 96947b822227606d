"""Log-probs of several responses to one prompt, with the prompt run through the model once.

GRPO and online DPO sample G responses per prompt. Scored as G full sequences, every prompt token runs G
times; with short answers to long prompts (the embedded tasks: ~50 prompt tokens, ~4 response tokens; chat
prompts with a system prompt and tools) that is nearly all of the cost. Here each distinct prompt, less its
last token, runs once with a KV cache; the cache is gathered to the rows that share it, and only
[last prompt token, response] runs per row. Gradients flow back through the gathered keys and values into
the one prompt pass.

When it is the per-row pass: log-probs and gradients equal it to float rounding in eval mode, and in
training mode without dropout and without gradient checkpointing; for Qwen2, Llama, GPT-2 and Phi3, full
weights or LoRA, under attention align_varlen, sdpa and eager, fp64/fp32 and bf16 autocast, any padding and
micro-batch (tests/test_shared_prefix.py, tests/test_matrix_shared_prompt.py). The two training-mode
switches that break it are named by `shared_pass_inexact_reason`; `align.train.rl_common.rollout_logprobs`
then takes the per-row pass, and `shared_prompt_logprobs` refuses to run.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from align.fused_logprobs import lm_logprobs
from align.hf_compat import cache_kwargs, unwrap_data_parallel
from align.rollout.batch import RolloutBatch, left_padded, position_ids_from_mask


def shares_prompts(batch: RolloutBatch) -> bool:
    """True when some rows of `batch` answer the same prompt (the shared pass saves work)."""
    return int(torch.unique(batch.prompt_index).numel()) < len(batch)


def shared_pass_inexact_reason(model: torch.nn.Module) -> str | None:
    """Why the shared-prompt pass would not compute the per-row pass on `model` now; None when it does.

    Two switches break it, both only in training mode:
    * gradient checkpointing. transformers 5.24 drops the cache a model is handed when a module has
      ``gradient_checkpointing and training``: in `GradientCheckpointingLayer` when grad is also enabled,
      in the model-level layer loops of GPT-2 and others whatever the grad mode. Responses would be scored
      without their prompt, so any checkpointing module in training mode refuses, under no_grad too.
    * active dropout (an ``nn.Dropout`` with p > 0, or a float ``*dropout*`` rate a module passes to its
      attention kernel, e.g. LoRA dropout, ``attention_dropout``): the prompt pass draws one mask for all
      rows that share it, where the per-row pass draws one per row.
    A peft or data-parallel wrapper is seen through: `modules()` walks the model inside.
    """
    for module in _switch_modules(model):  # the switches themselves are read afresh on every call
        if not module.training:
            continue
        # An instance attribute where transformers enables it (set_gradient_checkpointing); read from
        # __dict__ because a missing-attribute lookup through nn.Module and peft's __getattr__ is slow.
        if vars(module).get("gradient_checkpointing") is True:
            where = _name(model, module)
            return f"gradient checkpointing in training mode ({where}) drops the prompt's KV cache"
        if _has_active_dropout(module):
            where = _name(model, module)
            return f"dropout in training mode ({where}) would share one mask across a prompt's rows"
    return None


# model -> (weak references to its modules when they were read, the indices of those that carry a switch).
# Reading every module's attributes took 1.0 ms per call on the 135M Qwen2 (idle 2-core CPU, train mode),
# and the check runs per micro-batch. So the modules that can hold a switch are found once per model and
# found again whenever its modules are not the very same objects as then (a module added, removed or
# swapped); their switches are read on every call: 0.4 ms, most of it listing the modules. (Counting
# registrations with torch's global module-registration hook would skip the listing, but a global hook
# makes torch.compile's guards fail: the static rollout engine recompiled on every call.)
# Weak references only: a strong one to the model (a candidate itself, in many architectures) from its own
# entry would keep the model alive forever.
_SWITCH_MODULES: weakref.WeakKeyDictionary[
    torch.nn.Module, tuple[tuple[weakref.ref, ...], tuple[int, ...]]
] = weakref.WeakKeyDictionary()


def _switch_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The modules whose state can break the shared pass: dropout layers, modules holding a float
    ``*dropout*`` rate (whatever its value now), and modules that can take transformers' checkpointing flag
    (`set_gradient_checkpointing` sets it only where the attribute already exists, on the instance or its
    class)."""
    modules = list(model.modules())
    cached = _SWITCH_MODULES.get(model)
    if (
        cached is not None
        and len(cached[0]) == len(modules)
        and all(ref() is m for ref, m in zip(cached[0], modules, strict=True))
    ):
        return tuple(modules[i] for i in cached[1])
    found = tuple(
        i
        for i, m in enumerate(modules)
        if isinstance(m, torch.nn.modules.dropout._DropoutNd)
        or "gradient_checkpointing" in vars(m)
        or hasattr(type(m), "gradient_checkpointing")
        or any(type(v) is float and _is_dropout_key(k) for k, v in vars(m).items())
    )
    _SWITCH_MODULES[model] = (tuple(weakref.ref(m) for m in modules), found)
    return tuple(modules[i] for i in found)


def _is_dropout_key(key: str) -> bool:
    return "dropout" in key or key.endswith("_pdrop")


def _has_active_dropout(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return module.p > 0
    return any(type(v) is float and v > 0 and _is_dropout_key(k) for k, v in vars(module).items())


def _name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module and n), type(module).__name__)


def shared_prompt_logprobs(
    model: Any, batch: RolloutBatch, temperature: float, with_entropy: bool = False, *, checked: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of `batch.response_ids` (and their entropy), each distinct prompt run once.

    Rows answer the same prompt when they have the same `batch.prompt_index` (a rollout batch, or rows
    `select`ed from one). Runs under the caller's grad mode: a training step backpropagates through the
    shared prompt pass. Positions past a response's end hold whatever the model gives; mask them.
    Raises ValueError where `shared_pass_inexact_reason` names a switch that makes it differ from the
    per-row pass (`rollout_logprobs` takes that pass instead). ``checked=True``: the caller has just found
    that reason to be None (`rollout_logprobs`, per micro-batch), so it is not looked up twice.
    """
    reason = None if checked else shared_pass_inexact_reason(model)
    if reason is not None:
        raise ValueError(f"shared-prompt pass refused: {reason}; use the per-row pass")
    device = batch.response_ids.device
    keys, inverse = torch.unique(batch.prompt_index, return_inverse=True)
    first: dict[int, int] = {}
    for row, k in enumerate(inverse.tolist()):
        first.setdefault(k, row)
    prompts = [batch.prompt_ids[first[k]] for k in range(len(keys))]
    heads, head_mask = left_padded([p[:-1] for p in prompts], batch.pad_id, device)
    inverse = inverse.to(device)
    cache_kw: dict[str, Any] = {}
    if heads.shape[1] > 0:  # one-token prompts have no prefix to share
        from transformers import DynamicCache

        # The prefix pass runs inside a data-parallel wrapper: DDP sees one forward (the step pass below),
        # and each parameter's gradient, summed over both passes by autograd, is reduced once.
        local = unwrap_data_parallel(model)
        cache = DynamicCache(config=local.config)
        cache_kw = cache_kwargs(local, cache)
        local(
            input_ids=heads,
            attention_mask=head_mask,
            position_ids=position_ids_from_mask(head_mask),
            use_cache=True,
            logits_to_keep=1,
            **cache_kw,
        )
        cache.batch_select_indices(inverse)  # row i attends to its prompt's keys and values
    width = batch.response_ids.shape[1]
    last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)[inverse]
    step_ids = torch.cat([last[:, None], batch.response_ids[:, : width - 1]], dim=1)
    step_mask = torch.cat(
        [head_mask[inverse], torch.ones_like(last[:, None]), batch.response_mask[:, : width - 1].long()],
        dim=1,
    )
    start = head_mask.sum(1)[inverse]  # position of each row's last prompt token
    positions = start[:, None] + torch.arange(width, device=device)[None, :]
    return lm_logprobs(
        model,
        batch.response_ids,
        temperature=temperature,
        with_entropy=with_entropy,
        input_ids=step_ids,
        attention_mask=step_mask,
        position_ids=positions,
        use_cache=bool(cache_kw),
        **cache_kw,
    )
