"""Dataclass configs: defaults < YAML file < `key=value` overrides.

Every stage has one dataclass whose fields carry their documentation in `metadata["help"]`. Loading is
strict: an unknown key or a value of the wrong type is a `ConfigError` that names the key, because a
typo in a sweep (`kl_coeff=0.1`) that silently does nothing wastes a whole run. Values are parsed with
`yaml.safe_load` only; nothing from a config is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Keys every training recipe shares, under the same names."""

    model_name_or_path: str = doc(
        "smollm2-135m-instruct",
        "Local model directory, or `smollm2-135m-instruct` (the real model the project ships offline).",
    )
    dataset: str = doc(
        "embedded",
        "A JSONL/JSON file, a directory, a saved `datasets` dataset, or `embedded` (generated tasks).",
    )
    dataset_format: str | None = doc(
        None, "Force a record format (messages, sharegpt, alpaca, hh); default: detect."
    )
    skip_bad: bool = doc(
        False, "Skip malformed records (counted and written to rejects.jsonl) instead of stopping."
    )
    output_dir: str = doc("outputs/sft", "Where checkpoints, metrics.jsonl, TensorBoard logs and final/ go.")
    overwrite: bool = doc(False, "Allow an output_dir that already holds files this tool did not write.")
    max_steps: int = doc(-1, "Optimiser steps to run; -1 derives them from num_epochs.")
    num_epochs: float = doc(1.0, "Passes over the data when max_steps is -1.")
    save_steps: int = doc(50, "Write a checkpoint every N optimiser steps (0: only at the end).")
    save_total_limit: int = doc(2, "Keep at most this many checkpoints (the oldest are removed).")
    logging_steps: int = doc(1, "Log metrics every N optimiser steps.")
    seed: int = doc(42, "Seed for model init of new heads, data order and dropout.")
    resume: str = doc(
        "auto", "`auto`: continue from the latest good checkpoint; `never`; or a checkpoint path."
    )
    max_length: int = doc(2048, "Longest sequence in tokens; longer conversations are truncated and counted.")
    learning_rate: float = doc(2e-6, "Peak learning rate.")
    batch_size: int = doc(128, "Global batch per optimiser step, in sequences (packed rows when packing).")
    micro_batch_size: int = doc(4, "Sequences per device per forward pass; accumulation is derived.")
    adam_beta1: float = doc(0.9, "AdamW beta1.")
    adam_beta2: float = doc(0.95, "AdamW beta2.")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay (not applied to biases and norms).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc(
        "constant", "Shape after warm-up: constant, cosine or linear decay to min_lr_ratio * lr."
    )
    warmup_steps: int = doc(0, "Linear warm-up steps from 0 to the peak learning rate.")
    min_lr_ratio: float = doc(0.0, "Final learning rate of cosine/linear decay, as a fraction of the peak.")
    max_grad_norm: float = doc(1.0, "Clip the global gradient norm to this (0 disables).")
    on_nonfinite: Literal["skip", "stop"] = doc(
        "skip",
        "A non-finite loss or gradient: `skip` the update and count it, or `stop` with a checkpoint.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "auto", "Compute precision: auto = bf16 autocast on GPU with fp32 master weights, fp32 on CPU."
    )
    attn_implementation: str = doc(
        "sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."
    )
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    dropout: float | None = doc(None, "Set attention/hidden dropout in the model config (Qwen SFT: 0.1).")
    trust_remote_code: bool = doc(False, "Let transformers run model code shipped with a checkpoint.")
    use_lora: bool = doc(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = doc(16, "LoRA rank.")
    lora_alpha: int = doc(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = doc(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = doc(
        ["all-linear"], "Modules to adapt; `all-linear` adapts every Linear."
    )
    report_to: list[str] = doc(["tensorboard"], "Metric sinks besides metrics.jsonl: tensorboard, wandb.")
    progress: bool = doc(True, "Show a progress bar.")


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on ChatML conversations. Defaults = the embedded default job."""

    output_dir: str = doc("outputs/sft", "Where checkpoints, metrics.jsonl, TensorBoard logs and final/ go.")
    train_on: Literal["all_assistant", "last_assistant"] = doc(
        "all_assistant", "Which assistant turns carry loss: all of them, or only the last."
    )
    default_system: str | None = doc(None, "System prompt inserted when a conversation has none.")
    add_chatml_tokens: bool = doc(
        False, "Add <|im_start|>/<|im_end|> to a tokenizer that lacks them and resize the embeddings."
    )
    packing: bool = doc(True, "Pack several conversations per row (attention kept within each).")
    # The embedded default: a few minutes on 2 CPU cores with SmolLM2-135M-Instruct.
    max_length: int = doc(128, "Longest sequence in tokens; longer conversations are truncated and counted.")
    max_steps: int = doc(40, "Optimiser steps to run; -1 derives them from num_epochs.")
    learning_rate: float = doc(1e-4, "Peak learning rate.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc(
        "cosine", "Shape after warm-up: constant, cosine or linear decay to min_lr_ratio * lr."
    )
    warmup_steps: int = doc(4, "Linear warm-up steps from 0 to the peak learning rate.")
    min_lr_ratio: float = doc(0.1, "Final learning rate of cosine/linear decay, as a fraction of the peak.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    batch_size: int = doc(4, "Global batch per optimiser step, in sequences (packed rows when packing).")
    micro_batch_size: int = doc(2, "Sequences per device per forward pass; accumulation is derived.")
    save_steps: int = doc(20, "Write a checkpoint every N optimiser steps (0: only at the end).")
    embedded_train_tasks: int = doc(
        400, "With dataset=embedded: how many training conversations to generate."
    )
    eval_tasks: int = doc(
        48, "Held-out generated tasks whose gold-verifier accuracy is reported before and after (0: skip)."
    )
    eval_max_new_tokens: int = doc(24, "Generation budget per held-out task.")


C = TypeVar("C")


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its documentation line, for `--help` output."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string; users write it so
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # `dataset=123` from YAML
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        # YAML scalars: 1e-4, true, null, [a, b]. safe_load never constructs Python objects.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make `cls` from a mapping, refusing unknown keys and wrong types with the key named."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")
        kwargs[key] = _coerce(f"{source}: {key}", value, hints[key])
    return cls(**kwargs)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Defaults, then the YAML file (if any), then `key=value` overrides, strictly checked."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with path.open(encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        build_config(cls, loaded, source=str(path))  # name the file in errors before merging
        values.update(loaded)
    for item in overrides:
        key, value = _parse_override(item)
        build_config(cls, {key: value}, source="command line")
        values[key] = value
    return build_config(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_cli(cls: type[C], argv: Sequence[str], prog: str) -> C:
    """`[--config FILE] [key=value ...]`, with `--help` listing every key and its meaning."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(cls.__doc__ or "")
        + "\n\nkeys (override with key=value):\n"
        + "\n".join(f"  {k:<26} {h}" for k, h in field_help(cls).items()),
    )
    parser.add_argument("--config", help="YAML file with key: value pairs")
    parser.add_argument("overrides", nargs="*", help="key=value pairs applied after the file")
    args = parser.parse_args(list(argv))
    return load_config(cls, args.config, args.overrides)


@dataclasses.dataclass
class RMConfig(TrainConfig):
    """Reward model training: preference-model pre-training (PMP) on large, noisier comparisons, then RM
    fine-tuning on fewer, better ones; the reward is read at the end token. Defaults = the embedded
    default job (both stages on generated comparisons)."""

    stage: Literal["pmp", "rm", "pmp+rm"] = doc(
        "pmp+rm",
        "pmp or rm: one training run as configured; pmp+rm: PMP on `dataset` into output_dir/pmp, then RM "
        "on `rm_dataset` into output_dir/rm starting from the PMP model (head included).",
    )
    model_name_or_path: str = doc(
        "auto",
        "Backbone (a causal LM; its LM head is dropped) when init_from is unset: a local directory, "
        "`smollm2-135m-instruct`, or `auto` = outputs/sft/final (the SFT default's output) if it exists, "
        "else smollm2-135m-instruct.",
    )
    init_from: str | None = doc(
        None,
        "A reward model directory to start from, head included (the RM stage: the PMP stage's final/); "
        "overrides model_name_or_path.",
    )
    dataset: str = doc(
        "embedded",
        "Preference pairs: a JSONL/JSON file, a directory, a saved `datasets` dataset, or `embedded` "
        "(generated comparisons: large with label noise for pmp, smaller and clean for rm).",
    )
    dataset_format: str | None = doc(
        None, "Force a preference record format (pair, hh, sharegpt, oasst); default: detect per record."
    )
    rm_dataset: str = doc("embedded", "With stage=pmp+rm: the data of the RM stage (`dataset` feeds PMP).")
    eval_dataset: str | None = doc(
        None,
        "Held-out pairs scored before training, after each epoch and at the end; `embedded`: generated "
        "held-out pairs (the default when dataset=embedded). Without it, see eval_fraction.",
    )
    eval_fraction: float = doc(
        0.0, "Without eval_dataset: hold out this fraction of the training pairs (seeded) for evaluation."
    )
    output_dir: str = doc("outputs/rm", "Where checkpoints, metrics.jsonl, TensorBoard logs and final/ go.")
    default_system: str | None = doc(None, "System prompt inserted when a conversation has none.")
    end_token: str = doc(
        "<|im_end|>",
        "The token whose hidden state is scored: the <|im_end|> closing the last assistant turn, or "
        "another single token appended after it (e.g. <|endoftext|>).",
    )
    truncation_side: Literal["left", "right"] = doc(
        "left",
        "A sequence longer than max_length loses its oldest tokens (left: the response keeps its end "
        "token) or its end (right: the response is unclosed, counted, and its pair not trained on).",
    )
    unclosed_reward: float = doc(
        -10.0,
        "The score of a response whose end token is missing (truncated, or a generation that never closed).",
    )
    use_margin: bool = doc(True, "Subtract each pair's `margin` field (where the data has one) in the loss.")
    center_rewards_coef: float = doc(
        0.0, "Reward centring: add coef * (r_chosen + r_rejected)^2 per pair (0 disables; 0.01 is common)."
    )
    packing: bool = doc(
        True,
        "Run a micro-batch's chosen and rejected sequences as one padding-free packed row (else one padded "
        "batch); either way both sides of every pair share one forward pass.",
    )
    eval_before: bool = doc(True, "Also score the held-out pairs before training.")
    eval_micro_batch_size: int = doc(16, "Pairs per forward pass when scoring held-out pairs.")
    embedded_pmp_pairs: int = doc(256, "With dataset=embedded, stage pmp: generated comparisons.")
    embedded_rm_pairs: int = doc(96, "With dataset=embedded, stage rm: generated comparisons.")
    embedded_eval_pairs: int = doc(128, "With eval_dataset=embedded: generated held-out comparisons.")
    embedded_label_noise: float = doc(
        0.15, "With dataset=embedded, stage pmp: share of pairs whose chosen and rejected are swapped."
    )
    embedded_format_error_rate: float = doc(
        0.3, "With dataset=embedded: share of rejected replies that are the right value in the wrong format."
    )
    # The embedded default: a few minutes on 2 CPU cores with SmolLM2-135M-Instruct.
    max_length: int = doc(128, "Longest sequence in tokens; longer ones are cut per truncation_side.")
    learning_rate: float = doc(2e-5, "Peak learning rate.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc(
        "constant", "Shape after warm-up: constant, cosine or linear decay to min_lr_ratio * lr."
    )
    warmup_steps: int = doc(2, "Linear warm-up steps from 0 to the peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    batch_size: int = doc(16, "Global batch per optimiser step, in preference pairs.")
    micro_batch_size: int = doc(
        8, "Pairs per device per forward pass (2x as many sequences); accumulation is derived."
    )
    max_steps: int = doc(-1, "Optimiser steps to run; -1 derives them from num_epochs.")
    num_epochs: float = doc(1.0, "Passes over the pairs when max_steps is -1.")
    save_steps: int = doc(10, "Write a checkpoint every N optimiser steps (0: only at the end).")


@dataclasses.dataclass
class PPOConfig(TrainConfig):
    """PPO with four models (policy, reference, reward, value), the Qwen way. Defaults = the embedded job.

    `batch_size` counts queries per PPO iteration (each gets `samples_per_query` responses);
    `micro_batch_size` counts responses per forward pass and device.
    """

    model_name_or_path: str = doc(
        "outputs/sft/final", "The policy to start from (an SFT output); the reference is a frozen copy of it."
    )
    reward_model_path: str = doc(
        "outputs/rm/rm/final", "The reward model (a directory saved by recipes/rm.py)."
    )
    value_model_path: str | None = doc(None, "The value model's starting point; default: the reward model.")
    dataset: str = doc(
        "embedded",
        "Prompts: JSONL of {messages} (a trailing assistant turn is dropped) or {prompt}; embedded.",
    )
    output_dir: str = doc("outputs/ppo", "Where checkpoints, metrics.jsonl, rollouts.jsonl and final/ go.")
    train_missing_stages: bool = doc(
        True, "With the embedded defaults: train the SFT and RM defaults first when their outputs are absent."
    )
    default_system: str | None = doc(None, "System prompt inserted when a prompt has none.")
    max_length: int = doc(256, "Longest prompt in tokens (longer prompts are refused at load).")
    max_steps: int = doc(8, "PPO iterations (rollout + update); -1 derives them from num_epochs.")
    batch_size: int = doc(4, "Queries per PPO iteration (global).")
    micro_batch_size: int = doc(8, "Responses per forward pass and device.")
    save_steps: int = doc(4, "Write a checkpoint every N iterations (0: only at the end).")
    policy_lr: float | None = doc(2e-5, "Policy learning rate (Qwen: 1e-6); None: learning_rate.")
    value_lr: float = doc(5e-5, "Value model learning rate (Qwen: 5e-6).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc("constant", "Shape after warm-up.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    kl_coef: float = doc(0.04, "Weight of the per-token KL penalty to the reference (Qwen: 0.04).")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k1", "KL estimator in the per-token reward.")
    samples_per_query: int = doc(2, "Responses sampled per query; all are trained on (Qwen: 2).")
    value_warmup_steps: int = doc(2, "Iterations at the start that train only the value model (Qwen: 50).")
    top_p: float = doc(0.9, "Nucleus sampling mass (Qwen: 0.9).")
    temperature: float = doc(1.0, "Sampling temperature (log-probs use the same).")
    max_new_tokens: int = doc(24, "Response budget; a response that never emits <|im_end|> is penalised.")
    missing_eos_penalty: float = doc(
        -1.0, "Score given (after normalisation) to a response that never closed."
    )
    reward_norm: Literal["running_mean", "running_mean_std", "none"] = doc(
        "running_mean",
        "Normalise the RM score by a running mean (and std) kept across steps and checkpoints.",
    )
    value_clip: float = doc(0.15, "Value-loss clip range around the rollout-time values (Qwen: 0.15).")
    clip_eps: float = doc(0.2, "PPO ratio clip range.")
    gamma: float = doc(1.0, "GAE discount.")
    lam: float = doc(0.95, "GAE lambda.")
    whiten_advantages: bool = doc(True, "Whiten advantages over the batch's response tokens.")
    ppo_epochs: int = doc(2, "Passes over each rollout batch.")
    num_mini_batches: int = doc(
        1, "Optimiser steps per PPO epoch (the rollout batch is split this many ways)."
    )
    ptx_coef: float = doc(0.5, "Weight of the pre-training LM loss mixed into the policy loss (0: off).")
    ptx_dataset: str = doc("embedded", "Pre-training text: JSONL of {text}, a .txt file, or embedded.")
    ptx_batch_size: int = doc(2, "Pre-training rows per mini-batch.")
    ptx_max_length: int = doc(64, "Tokens per pre-training row.")
    rollout_engine: Literal["hf", "manual", "static", "vllm"] = doc(
        "hf", "Generation backend: hf, manual, static (fixed shapes, refilling), vllm (align/rollout.py)."
    )
    ref_dtype: Literal["float32", "bfloat16"] = doc(
        "float32", "Precision of the frozen reference and reward models (bfloat16 halves their memory)."
    )
    offload_frozen: bool = doc(
        False, "Keep the reference and reward models on the CPU except while they score (saves GPU memory)."
    )
    log_rollouts: int = doc(4, "Rollouts per step written to rollouts.jsonl (prompt, response, scores).")


@dataclasses.dataclass
class DPOConfig(TrainConfig):
    """Offline DPO on preference pairs (Qwen2/2.5): chosen and rejected in one padding-free forward pass,
    reference log-probs computed once and cached on disk. Defaults = the embedded default job."""

    model_name_or_path: str = doc(
        "auto",
        "The policy to start from: a local directory, `smollm2-135m-instruct`, or `auto` = outputs/sft/final "
        "(the SFT default's output) if it exists, else smollm2-135m-instruct.",
    )
    ref_model_path: str | None = doc(
        None,
        "The frozen reference; default: the starting policy (with use_lora: the adapter-disabled policy).",
    )
    dataset: str = doc(
        "embedded",
        "Preference pairs (the reward model's formats: pair, hh, sharegpt, oasst): a JSONL/JSON file, a "
        "directory, a saved `datasets` dataset, or `embedded` (generated comparisons).",
    )
    dataset_format: str | None = doc(
        None, "Force a preference record format (pair, hh, sharegpt, oasst); default: detect per record."
    )
    output_dir: str = doc(
        "outputs/dpo", "Where checkpoints, metrics.jsonl, the reference cache and final/ go."
    )
    default_system: str | None = doc(None, "System prompt inserted when a conversation has none.")
    beta: float = doc(0.1, "DPO inverse temperature (Qwen2.5: 0.1).")
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = doc(
        "sigmoid",
        "sigmoid (DPO), robust (robust DPO), hinge (SLiC) or ipo (IPO, on per-token mean log-probs).",
    )
    label_smoothing: float = doc(0.0, "Assumed rate of flipped labels (cDPO with sigmoid, robust DPO).")
    rpo_alpha: float = doc(
        1.0, "Weight of an NLL term on the chosen responses (RPO), token-mean over the global batch (0: off)."
    )
    ref_cache_dir: str | None = doc(
        None,
        "Where reference log-probs are cached, keyed by a fingerprint of the reference weights/config and the "
        "tokenised pairs; default: output_dir/ref_cache.",
    )
    ref_dtype: Literal["float32", "bfloat16"] = doc("float32", "Precision of the reference pass.")
    ref_batch_size: int = doc(16, "Pairs per forward pass when computing the reference log-probs.")
    # The embedded default: a few minutes on 2 CPU cores with SmolLM2-135M-Instruct.
    max_length: int = doc(
        128, "Longest prompt + response in tokens; longer pairs are skipped and counted (never truncated)."
    )
    learning_rate: float = doc(2e-5, "Peak learning rate (Qwen2.5: 7e-7 over ~150k pairs).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc(
        "constant", "Shape after warm-up: constant, cosine or linear decay to min_lr_ratio * lr."
    )
    warmup_steps: int = doc(2, "Linear warm-up steps from 0 to the peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    batch_size: int = doc(8, "Global batch per optimiser step, in preference pairs.")
    micro_batch_size: int = doc(
        4,
        "Pairs per device per forward pass (2x as many sequences, one packed row); accumulation is derived.",
    )
    max_steps: int = doc(-1, "Optimiser steps to run; -1 derives them from num_epochs.")
    num_epochs: float = doc(1.0, "Passes over the pairs when max_steps is -1 (Qwen2.5: one epoch).")
    save_steps: int = doc(8, "Write a checkpoint every N optimiser steps (0: only at the end).")
    embedded_pairs: int = doc(256, "With dataset=embedded: how many generated comparisons to train on.")
    embedded_format_error_rate: float = doc(
        0.3, "With dataset=embedded: share of rejected replies that are the right value in the wrong format."
    )
    eval_tasks: int = doc(
        48, "Held-out generated tasks whose gold-verifier accuracy is reported before and after (0: skip)."
    )
    eval_max_new_tokens: int = doc(24, "Generation budget per held-out task.")


@dataclasses.dataclass
class OnlineConfig(TrainConfig):
    """What online DPO and GRPO share: prompts, sampling, reward, reference. `batch_size` counts queries
    per iteration (each gets `samples_per_query` responses); `micro_batch_size` counts responses per
    forward pass and device."""

    model_name_or_path: str = doc(
        "auto",
        "The policy to start from (also the reference): a local directory, `smollm2-135m-instruct`, or "
        "`auto` = outputs/sft/final if it exists, else smollm2-135m-instruct.",
    )
    reward: Literal["auto", "model", "verifier"] = doc(
        "auto",
        "model: the reward model at reward_model_path; verifier: the gold verifier of the embedded tasks "
        "(a rule-based 0/1 reward); auto: the model if reward_model_path exists, else the verifier.",
    )
    reward_model_path: str = doc(
        "outputs/rm/rm/final", "The reward model (a directory saved by recipes/rm.py)."
    )
    dataset: str = doc(
        "embedded",
        "Prompts: JSONL of {messages} (a trailing assistant turn is dropped) or {prompt}; embedded.",
    )
    embedded_prompts: int = doc(24, "With dataset=embedded: how many generated training prompts.")
    default_system: str | None = doc(None, "System prompt inserted when a prompt has none.")
    max_length: int = doc(256, "Longest prompt in tokens (longer prompts are refused at load).")
    samples_per_query: int = doc(4, "Responses sampled per query.")
    top_p: float = doc(1.0, "Nucleus sampling mass.")
    temperature: float = doc(1.0, "Sampling temperature (log-probs use the same).")
    max_new_tokens: int = doc(24, "Response budget.")
    missing_eos_penalty: float | None = doc(
        None, "Score given to a response that never emitted <|im_end|> (None: score it as it is)."
    )
    rollout_engine: Literal["hf", "manual", "static", "vllm"] = doc(
        "hf", "Generation backend: hf, manual, static (fixed shapes, refilling), vllm (align/rollout.py)."
    )
    ref_dtype: Literal["float32", "bfloat16"] = doc(
        "float32", "Precision of the frozen reference and reward models (bfloat16 halves their memory)."
    )
    batch_size: int = doc(4, "Queries per iteration (global).")
    micro_batch_size: int = doc(8, "Responses per forward pass and device.")
    max_steps: int = doc(6, "Iterations (sample + update); -1 derives them from num_epochs over the prompts.")
    save_steps: int = doc(4, "Write a checkpoint every N iterations (0: only at the end).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc("constant", "Shape after warm-up.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    log_rollouts: int = doc(4, "Rollouts per step written to rollouts.jsonl (prompt, response, score).")
    eval_tasks: int = doc(
        32, "With embedded prompts: held-out tasks whose gold-verifier accuracy is reported before and after."
    )
    eval_max_new_tokens: int = doc(24, "Generation budget per held-out task.")


@dataclasses.dataclass
class OnlineDPOConfig(OnlineConfig):
    """Online DPO (Qwen2): each iteration samples k responses per prompt from the current policy, the reward
    picks the best and the worst (all-tied groups are skipped and counted), and one DPO step is taken
    against the initial policy as reference. Defaults = the embedded default job."""

    output_dir: str = doc(
        "outputs/online_dpo", "Where checkpoints, metrics.jsonl, rollouts.jsonl and final/ go."
    )
    beta: float = doc(0.1, "DPO inverse temperature.")
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = doc("sigmoid", "DPO loss variant.")
    label_smoothing: float = doc(0.0, "Assumed rate of flipped labels (sigmoid/robust).")
    learning_rate: float = doc(1e-5, "Peak learning rate.")


@dataclasses.dataclass
class GRPOConfig(OnlineConfig):
    """GRPO (Qwen2.5): G samples per query, advantages normalised within each group, PPO's clipped
    objective, optional k3 KL to the reference, and queries with larger reward variance trained first.
    Defaults = the embedded default job."""

    output_dir: str = doc("outputs/grpo", "Where checkpoints, metrics.jsonl, rollouts.jsonl and final/ go.")
    samples_per_query: int = doc(8, "G, responses sampled per query (Qwen2.5: 8).")
    batch_size: int = doc(2, "Queries per iteration (global).")
    embedded_prompts: int = doc(8, "With dataset=embedded: how many generated training prompts.")
    max_steps: int = doc(4, "Iterations (sample + update); -1 derives them from num_epochs over the prompts.")
    learning_rate: float = doc(1e-5, "Peak learning rate.")
    clip_eps: float = doc(0.2, "Ratio clip range of the surrogate objective.")
    kl_coef: float = doc(0.04, "Weight of the k3 KL to the reference, token-mean (0: no reference model).")
    scale_rewards: bool = doc(
        True, "Divide group-centred rewards by the group's std (GRPO); false: centre only (Dr. GRPO)."
    )
    variance_order: bool = doc(
        True,
        "Qwen2.5 ordering: a scoring pass samples every query before training and the queries with larger "
        "reward variance are trained first; false: a seeded random order.",
    )
    ppo_epochs: int = doc(1, "Passes over each rollout batch (1: the ratio is 1 and clipping is inactive).")
    num_mini_batches: int = doc(1, "Optimiser steps per pass (the rollout batch is split this many ways).")
    skip_zero_variance_groups: bool = doc(
        False,
        "Leave groups whose rewards all tie (advantage 0) out of the update: same policy gradient, less "
        "compute; their KL term is dropped too. One process only (ignored with data parallelism).",
    )


@dataclasses.dataclass
class PipelineConfig:
    """The whole chain: SFT -> PMP -> RM -> PPO, and SFT -> DPO, each stage's output feeding the next,
    then an evaluation of the aligned policies against the SFT model and one report.

    Per-stage settings are nested mappings validated against that stage's config class before anything
    runs (`ppo: {kl_coef: 0.1}` in the file; `ppo.kl_coef=0.1` on the command line). The wiring keys
    (output_dir, the model paths fed from earlier stages) are set by the pipeline.
    """

    output_dir: str = doc(
        "outputs/pipeline",
        "Root of the run: stages go to <output_dir>/sft, /rm, /ppo, /dpo; eval/ and report.md.",
    )
    stages: list[Literal["sft", "rm", "ppo", "dpo"]] = doc(
        ["sft", "rm", "ppo", "dpo"],
        "Stages to run, of sft, rm (PMP then RM), ppo, dpo; a stage left out must already be complete if a "
        "later one needs its output.",
    )
    overwrite: bool = doc(
        False,
        "Re-run a stage whose config (or an earlier stage's) changed since it ran, deleting its old outputs; "
        "without it such a stage is refused.",
    )
    sft: Any = doc({}, "SFTConfig keys for the SFT stage (a mapping), e.g. {learning_rate: 5e-5}.")
    rm: Any = doc({}, "RMConfig keys for the reward model stage (PMP then RM), e.g. {embedded_rm_pairs: 64}.")
    ppo: Any = doc({}, "PPOConfig keys for the PPO stage, e.g. {kl_coef: 0.1, ptx_coef: 0.5}.")
    dpo: Any = doc({}, "DPOConfig keys for the DPO stage, e.g. {beta: 0.1}.")
    keep_checkpoints: bool = doc(
        False,
        "Keep a completed stage's checkpoints/ (only needed to resume that stage; later stages read its "
        "final/). Off: deleted once the stage completes, which saves ~1.6 GB per SmolLM2-135M checkpoint.",
    )
    evaluate: bool = doc(
        True, "At the end, compare PPO and DPO policies with the SFT model (eval/<policy>/)."
    )
    eval_num_prompts: int = doc(48, "Held-out prompts per policy comparison.")
    eval_max_new_tokens: int = doc(32, "Generation budget per response in the comparison.")
    eval_batch_size: int = doc(16, "Prompts per generation batch in the comparison.")
    eval_seed: int = doc(0, "Seed of the comparison's prompts and sampling.")
    eval_tax_text: str = doc("embedded", "Pre-training-style text for the alignment-tax perplexity.")
    eval_tax_max_rows: int = doc(64, "Rows of tax text scored per model.")
