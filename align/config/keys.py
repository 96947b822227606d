"""The parts stage configs are composed of: each is the keys one concern reads (model, data, batch,
optimisation, checkpointing, run, dropout, record files, gold evaluation), under the same names in every
stage that has it, and `doc`, the field helper with a one-line description (`metadata["help"]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------------------
# Parts: each is the keys one concern reads, under the same names in every stage that has it. A stage
# config is composed of the parts its loop reads, so a key it would ignore is an unknown key (an error).
# Dataclass fields come in reverse base order: a class lists its parts last-printed-first, so `--help`
# shows model, data, batch, optimisation, checkpointing and run keys in that order, then the parts the
# stage adds (dropout, record files, gold eval, RL sampling) and its own keys.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelKeys:
    """The model to train and how it is built."""

    model_name_or_path: str = doc(
        "smollm2-135m-instruct",
        "Local model directory, or `smollm2-135m-instruct` (the real model the project ships offline).",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "auto", "Compute precision: auto = bf16 autocast on GPU with fp32 master weights, fp32 on CPU."
    )
    attn_implementation: str = doc(
        "auto",
        "Attention kernel: auto = align's document-masked attention (align/attention.py: FlashAttention-2 "
        "varlen on CUDA, per-document SDPA on CPU; no (T, T) mask for packed rows), sdpa for models with "
        "sliding-window layers; or a transformers name (sdpa, eager, flash_attention_2).",
    )
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    compile_layers: bool = doc(
        False,
        "torch.compile each decoder layer (layer.compile(): fused norms, rotary and MLP; one compilation "
        "reused by every layer). Off by default: not yet measured on a GPU.",
    )
    trust_remote_code: bool = doc(False, "Let transformers run model code shipped with a checkpoint.")
    use_lora: bool = doc(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = doc(16, "LoRA rank.")
    lora_alpha: int = doc(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = doc(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = doc(
        ["all-linear"], "Modules to adapt; `all-linear` adapts every Linear."
    )


@dataclasses.dataclass
class DataKeys:
    """Where the training data comes from and how long a sequence may be."""

    dataset: str = doc(
        "embedded",
        "A JSONL/JSON file, a directory, a saved `datasets` dataset, or `embedded` (generated tasks).",
    )
    max_length: int = doc(2048, "Longest sequence in tokens; longer conversations are truncated and counted.")


@dataclasses.dataclass
class BatchKeys:
    """How many optimiser steps, and what each one trains on. Every stage redefines `batch_size` and
    `micro_batch_size` with its own unit (sequences, preference pairs, or queries and responses)."""

    batch_size: int = doc(128, "Global batch per optimiser step (the unit is the stage's).")
    micro_batch_size: int = doc(4, "Items per device per forward pass; accumulation is derived.")
    max_steps: int = doc(-1, "Optimiser steps to run; -1 derives them from num_epochs.")
    num_epochs: float = doc(1.0, "Passes over the data when max_steps is -1.")


@dataclasses.dataclass
class OptimKeys:
    """AdamW, the learning-rate schedule, gradient clipping and non-finite steps."""

    learning_rate: float = doc(2e-6, "Peak learning rate.")
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


@dataclasses.dataclass
class CheckpointKeys:
    """Checkpoints and exact resume."""

    save_steps: int = doc(50, "Write a checkpoint every N optimiser steps (0: only at the end).")
    save_total_limit: int = doc(2, "Keep at most this many checkpoints (the oldest are removed).")
    resume: str = doc(
        "auto", "`auto`: continue from the latest good checkpoint; `never`; or a checkpoint path."
    )


@dataclasses.dataclass
class RunKeys:
    """Where a run writes, its seed, and how it reports."""

    output_dir: str = doc("outputs/sft", "Where checkpoints, metrics.jsonl, TensorBoard logs and final/ go.")
    overwrite: bool = doc(False, "Allow an output_dir that already holds files this tool did not write.")
    seed: int = doc(42, "Seed for model init of new heads, data order and dropout.")
    logging_steps: int = doc(1, "Log metrics every N optimiser steps.")
    report_to: list[str] = doc(["tensorboard"], "Metric sinks besides metrics.jsonl: tensorboard, wandb.")
    progress: bool = doc(True, "Show a progress bar.")
    sharding: Literal["none", "fsdp"] = doc(
        "none",
        "fsdp: shard weights, gradients and AdamW state over the processes (FSDP2, one unit per decoder "
        "layer); every stage (RL: the frozen reference and reward model too; see rollout_sharded). Launching "
        "with accelerate_configs/fsdp.yaml implies it.",
    )


@dataclasses.dataclass
class TrainConfig(RunKeys, CheckpointKeys, OptimKeys, BatchKeys, DataKeys, ModelKeys):
    """Keys every training loop reads, under the same names (the shared run set-up is typed with it)."""


@dataclasses.dataclass
class DropoutKeys:
    """Dropout in the trained model; the RL stages have none (their log-prob ratios need it off)."""

    dropout: float | None = doc(None, "Set attention/hidden dropout in the model config (Qwen SFT: 0.1).")


@dataclasses.dataclass
class RecordFileKeys:
    """Reading records (conversations, preference pairs) from files: the stages trained on them."""

    dataset_format: str | None = doc(
        None, "Force a record format (messages, sharegpt, alpaca, hh); default: detect."
    )
    skip_bad: bool = doc(
        False, "Skip malformed records (counted and written to rejects.jsonl) instead of stopping."
    )


@dataclasses.dataclass
class GoldEvalKeys:
    """The held-out generated tasks whose gold-verifier accuracy is reported before and after training."""

    eval_tasks: int = doc(
        48, "Held-out generated tasks whose gold-verifier accuracy is reported before and after (0: skip)."
    )
    eval_max_new_tokens: int = doc(24, "Generation budget per held-out task.")


def _next_post_init(obj: Any, part: type) -> None:
    """Run the `__post_init__` of the part after `part` in the MRO: each part checks its own keys, and a
    stage composed of several parts runs them all."""
    after = getattr(super(part, obj), "__post_init__", None)
    if after is not None:
        after()
