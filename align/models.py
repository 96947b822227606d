"""Loading models for training: the causal LM (policy), its tokenizer, LoRA, and saving the result."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import chatml
from align.assets import resolve_model
from align.attention import describe_plan, packed_attention_plan, resolve_attn_implementation
from align.config import TrainConfig


def check_chatml_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None, add: bool
) -> None:
    """Make sure `<|im_start|>`/`<|im_end|>` are single tokens; add them (and resize) only when asked."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (chatml.IM_START, chatml.IM_END) if t not in vocab]
    if not missing:
        return
    if not add:
        raise ValueError(
            f"tokenizer has no single token for {', '.join(missing)}; ChatML training needs them. "
            "Set add_chatml_tokens=true to add them and resize the embeddings (new rows start untrained)."
        )
    chatml.add_chatml_tokens(tokenizer, model)


def set_dropout(config: Any, p: float) -> list[str]:
    """Set every dropout probability the architecture's config exposes; return the names set.

    Attention dropout included, deliberately: on Qwen2 and Llama it is the only dropout the config has,
    so a `dropout` limited to hidden/residual dropout would make the Qwen recipe's 0.1 do nothing there.
    Its cost: FlashAttention-2 varlen has no dropout, so packed rows train through per-document SDPA
    (exact, slower); `announce_attention` says so at every run's setup."""
    names = [
        k
        for k, v in vars(config).items()
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop")) and "lora" not in k
    ]
    for name in names:
        setattr(config, name, p)
    if not names:
        raise ValueError(f"dropout={p}: the {type(config).__name__} has no dropout setting to change")
    return names


def announce_attention(
    model_config: Any,
    cfg: Any,
    *,
    device: torch.device | str,
    mixed_precision: str,
    say: Callable[[str], Any] = print,
    warn: bool = True,
) -> dict[str, Any]:
    """Say at a run's setup which attention its packed rows take in training and evaluation, and why
    (`align.attention.packed_attention_plan`); return that plan for the run's summary.

    Warns (once) where attention dropout alone keeps training off the FlashAttention-2 varlen kernel: a
    config choice (`dropout`) that costs speed, not numbers. ``mixed_precision``: accelerate's ("bf16",
    "fp16" or "no"), the dtype the kernel would see. ``warn``: False on all processes but the main one.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision), torch.float32)
    plan = packed_attention_plan(model_config, device_type=torch.device(device).type, compute_dtype=dtype)
    say(describe_plan(plan))
    if warn and plan["training_reason"] is not None and plan["evaluation_reason"] is None:
        warnings.warn(
            f"dropout={getattr(cfg, 'dropout', None)} sets attention dropout, which the FlashAttention-2 "
            f"varlen kernel of attn_implementation={cfg.attn_implementation} has not: packed rows train "
            "through per-document SDPA (exact; slower: a host sync and one SDPA call per distinct document "
            "length per layer). Set dropout: 0 to train through the kernel.",
            stacklevel=2,
        )
    return plan


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding never reaches the loss (labels -100, and pooling locates end tokens from the ids).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: TrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trainable causal LM described by `cfg`, in fp32 master weights, with LoRA if asked.

    A config without a `dropout` key (PPO, online DPO, GRPO) gets dropout off: those loops need the
    training forward pass to give the log-probs the rollout scored (ratio 1 on the rollout's own data)."""
    path = resolve_model(cfg.model_name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    dropout = getattr(cfg, "dropout", 0.0)
    if dropout is not None:
        set_dropout(config, dropout)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=torch.float32,  # master weights; bf16 comes from autocast on GPU
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, config),
        trust_remote_code=cfg.trust_remote_code,
    )
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    check_chatml_tokenizer(tokenizer, model, getattr(cfg, "add_chatml_tokens", False))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.use_lora:
        model = apply_lora(model, cfg)
    if getattr(cfg, "compile_layers", False):
        compile_decoder_layers(model)
    return model, tokenizer


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """``layer.compile()`` on every decoder layer (the ModuleList named ``layers``); returns how many.

    Layers, not the whole model: each layer has the same code and shapes, so one compilation serves them
    all, and the model's Python-level glue (masks, caches, our chunked head) stays eager."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            for layer in module:
                layer.compile()
                count += 1
    if count == 0:
        raise ValueError(f"compile_layers: found no decoder layers in {type(model).__name__}")
    return count


def apply_lora(model: PreTrainedModel, cfg: TrainConfig) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's own switch: every Linear except the output head
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes; frozen ones are rebuilt from the base model on resume."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved trainable parameters back, refusing a checkpoint that does not fit the model."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(
            f"checkpoint does not fit this model: {len(missing)} trainable tensors missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); was it saved with other "
            "settings (use_lora, model)?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def save_final_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    state_dict: dict | None = None,
) -> Path:
    """Save a `from_pretrained`-loadable model (LoRA merged; the adapter kept in `adapter/`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
        state_dict = None
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return out_dir
