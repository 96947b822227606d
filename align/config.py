"""The stage configs: each stage's keys, defaults and documentation (`metadata["help"]`).

A stage config is composed of parts, one per concern (model, data, batch, optimisation, checkpointing,
run, RL sampling, ...), holding exactly the keys that stage's loop reads; a key it would not read is not
a field, so setting it is an unknown-key error. Loading (defaults < YAML file < `key=value` overrides,
strictly checked) is in `align.config_loader`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from align.config_loader import ConfigError


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
        "layer); SFT and DPO so far. Launching with accelerate_configs/fsdp.yaml implies it.",
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


@dataclasses.dataclass
class RolloutKeys:
    """Sampling responses from the policy (PPO, online DPO, GRPO)."""

    default_system: str | None = doc(
        "template",
        "System prompt inserted when a prompt has none: 'template' = the chat template's own default "
        "(as apply_chat_template serves it), or, with a reward model, the one it was trained with "
        "(reward_config.json); none = no system prompt; other text = that prompt (refused if the reward "
        "model was trained with another).",
    )
    max_length: int = doc(256, "Longest prompt in tokens (longer prompts are refused at load).")
    samples_per_query: int = doc(4, "Responses sampled per query.")
    top_p: float = doc(1.0, "Nucleus sampling mass.")
    temperature: float = doc(1.0, "Sampling temperature (log-probs use the same).")
    max_new_tokens: int = doc(24, "Response budget.")
    rollout_engine: Literal["hf", "manual", "static", "vllm"] = doc(
        "hf",
        "Generation backend: hf, manual, static (fixed shapes, refilling), vllm (experimental, untested); "
        "see align/rollout_engines.py.",
    )
    rollout_compile: Literal["auto", "on", "off"] = doc(
        "auto",
        "CUDA-graph decoding for rollout_engine=static: the whole decoding step (forward, top-p, sampling, stop "
        "test) captured once per batch-size bucket; auto = on for CUDA, off on CPU; on = also on CPU "
        "(torch.compile without graphs); fails loudly if the graphs do not engage. Not yet measured on a GPU. "
        "Other engines run eager (on is an error there).",
    )
    ref_dtype: Literal["float32", "bfloat16"] = doc(
        "float32", "Precision of the frozen reference and reward models (bfloat16 halves their memory)."
    )
    log_rollouts: int = doc(4, "Rollouts per step written to rollouts.jsonl (prompt, response, score).")


@dataclasses.dataclass
class QueryKeys:
    """The embedded query set an RL stage trains on: `generate_tasks(query_count, seed=query_seed,
    split="train")` (align/tasks.py). A problem's split is a hash of its key (`split_of_key`), so no
    held-out problem (split `heldout`, where the gold evaluations draw from) is ever in it, whatever the
    count or seed. Qwen2.5 makes the reward model's query set the RL query set: sample the RM's on-policy
    pairs (recipes/sample_pairs.py) with the same query_count and query_seed."""

    query_count: int | None = doc(
        None,
        "With dataset=embedded: how many generated training queries; None: max(16 x batch_size, 64).",
    )
    query_seed: int | None = doc(
        None,
        "With dataset=embedded: the generate_tasks seed of the queries; None: seed + 1. Sample the RM's "
        "on-policy pairs on the same count and seed (the RM's query set is the RL query set).",
    )

    def __post_init__(self) -> None:
        if self.query_count is not None and self.query_count < 1:
            raise ConfigError(f"query_count: must be >= 1 (or none), got {self.query_count}")
        _next_post_init(self, QueryKeys)


@dataclasses.dataclass
class RewardGuardKeys:
    """Over-optimisation guards on the reward (align/rl_math.py; ../shared/research/rm_overopt.md), each off
    by default (Qwen used none). The score phase applies them in this order: ensemble -> clip -> anchor,
    then the stage's own normalisation and unclosed-response penalty. A response the scorer could not read
    (an RM's placeholder score) is left out of every guard and keeps the stage's treatment of it."""

    rm_ensemble_objective: Literal["mean", "min", "uncertainty"] = doc(
        "mean",
        "With a reward model of K > 1 heads (num_heads in its reward_config.json), the one score taken from "
        "the K: mean; min (worst case); uncertainty = mean - rm_ensemble_penalty x std over the heads. min "
        "and uncertainty need such a reward model (refused otherwise).",
    )
    rm_ensemble_penalty: float = doc(
        0.0, "lambda of rm_ensemble_objective=uncertainty (>= 0; only read there)."
    )
    reward_clip: float | None = doc(
        None, "Clamp scores to [-reward_clip, reward_clip] (DeepSpeed-Chat: 5, OpenRLHF: 10); None: off."
    )
    reward_anchor: Literal["none", "reference"] = doc(
        "none",
        "reference: PAR, each score becomes sigmoid(score - the score of the prompt's reference answer), the "
        "reference answer being the starting policy's greedy answer, generated and scored (ensemble and "
        "clip applied) once per query before training (one the scorer cannot read takes the readable ones' "
        "mean); kept in checkpoints (resume reads it, never regenerates it) and written to "
        "reference_answers.jsonl.",
    )

    def __post_init__(self) -> None:
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ConfigError(f"reward_clip: must be positive (or none), got {self.reward_clip}")
        if self.rm_ensemble_penalty < 0:
            raise ConfigError(f"rm_ensemble_penalty: must be >= 0, got {self.rm_ensemble_penalty}")
        # (A penalty without objective=uncertainty is refused when the run starts, not here: the loader
        # checks each key=value override on its own, against the other keys' defaults.)
        _next_post_init(self, RewardGuardKeys)


@dataclasses.dataclass
class AdaptiveKLKeys:
    """The adaptive KL controller (Ziegler et al. 2019; TRL's adap_kl_ctrl) of the stages with a KL
    coefficient to the reference (PPO, GRPO)."""

    kl_target: float | None = doc(
        None,
        "Steer the KL coefficient (starting at kl_coef) so that the iteration's `kl` metric (PPO: summed "
        "over a response's tokens; GRPO: the k3 token mean) approaches this; the coefficient used is logged "
        "as kl_coef and checkpointed. None: kl_coef fixed.",
    )
    kl_horizon: int = doc(
        10000,
        "With kl_target: after each iteration coef *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) x responses / "
        "kl_horizon, responses = batch_size x samples_per_query (TRL: 10000). Not during PPO's value warm-up.",
    )

    def __post_init__(self) -> None:
        if self.kl_target is not None:
            if self.kl_target <= 0:
                raise ConfigError(f"kl_target: must be positive (or none), got {self.kl_target}")
            if getattr(self, "kl_coef", 0.0) <= 0:
                raise ConfigError(
                    f"kl_target={self.kl_target} needs kl_coef > 0: the controller scales kl_coef, and 0 "
                    "stays 0"
                )
        if self.kl_horizon < 1:
            raise ConfigError(f"kl_horizon: must be >= 1, got {self.kl_horizon}")
        _next_post_init(self, AdaptiveKLKeys)


def _next_post_init(obj: Any, part: type) -> None:
    """Run the `__post_init__` of the part after `part` in the MRO: each part checks its own keys, and a
    stage composed of several parts runs them all."""
    after = getattr(super(part, obj), "__post_init__", None)
    if after is not None:
        after()


@dataclasses.dataclass
class SFTConfig(GoldEvalKeys, RecordFileKeys, DropoutKeys, TrainConfig):
    """Supervised fine-tuning on ChatML conversations. Defaults = the embedded default job."""

    output_dir: str = doc("outputs/sft", "Where checkpoints, metrics.jsonl, TensorBoard logs and final/ go.")
    train_on: Literal["all_assistant", "last_assistant"] = doc(
        "all_assistant", "Which assistant turns carry loss: all of them, or only the last."
    )
    default_system: str | None = doc(
        "template",
        "System prompt inserted when a conversation has none: 'template' = the chat template's own default "
        "(as apply_chat_template serves it), none = no system prompt, other text = that prompt.",
    )
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
    batch_size: int = doc(
        4,
        "Global batch per optimiser step, in sequences: training rows of up to max_length tokens (packed "
        "rows of several conversations when packing).",
    )
    micro_batch_size: int = doc(2, "Sequences per device per forward pass; accumulation is derived.")
    save_steps: int = doc(20, "Write a checkpoint every N optimiser steps (0: only at the end).")
    embedded_train_tasks: int = doc(
        400, "With dataset=embedded: how many training conversations to generate."
    )


@dataclasses.dataclass
class RMConfig(RecordFileKeys, DropoutKeys, TrainConfig):
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
    default_system: str | None = doc(
        "template",
        "System prompt inserted when a conversation has none: 'template' = the chat template's own default "
        "(as apply_chat_template serves it), none = no system prompt, other text = that prompt.",
    )
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
    pair_grouping: Literal["pairs", "prompt"] = doc(
        "pairs",
        "pairs: each pair is a batch item, both responses scored. prompt: InstructGPT's grouped comparisons: "
        "the pairs with one `group` id (sample_pairs writes one per prompt; a pair without one is its own "
        "group) are one batch item whose distinct responses are scored once each, loss = mean over its "
        "comparisons, so each prompt counts once (align.losses.grouped_pairwise_loss); batch_size and "
        "micro_batch_size then count groups (never split), and eval_fraction holds out whole groups.",
    )
    eval_datasets: list[str] = doc(
        [],
        "More held-out pair sets, each `name=path` or a path (named by its file name), scored with the "
        "held-out pairs (before training, each epoch, the end) and reported by name in eval/report.json "
        "and eval/accuracy.png; e.g. onpolicy=<recipes/sample_pairs.py output on held-out prompts>/pairs.jsonl.",
    )
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
    warmup_steps: int = doc(2, "Linear warm-up steps from 0 to the peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    batch_size: int = doc(16, "Global batch per optimiser step, in preference pairs.")
    micro_batch_size: int = doc(
        8, "Pairs per device per forward pass (2x as many sequences); accumulation is derived."
    )
    num_epochs: float = doc(1.0, "Passes over the pairs when max_steps is -1.")
    save_steps: int = doc(10, "Write a checkpoint every N optimiser steps (0: only at the end).")


# The RL loops train with dropout off: the model's own by load_causal_lm, LoRA's by this default.
RL_LORA_DROPOUT_HELP = (
    "Dropout on the LoRA branch. 0 in the RL loops, which train with dropout off: the first update's "
    "log-probs then equal those the rollout scored (ratio 1), and the update can use the shared-prompt "
    "pass (with dropout it takes the slower per-row pass: align/shared_prefix.py)."
)


@dataclasses.dataclass
class PPOConfig(AdaptiveKLKeys, RewardGuardKeys, QueryKeys, RolloutKeys, TrainConfig):
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
    max_steps: int = doc(8, "PPO iterations (rollout + update); -1 derives them from num_epochs.")
    batch_size: int = doc(
        4, "Global batch per PPO iteration, in queries (each gets samples_per_query responses)."
    )
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
    offload_frozen: bool = doc(
        False, "Keep the reference and reward models on the CPU except while they score (saves GPU memory)."
    )
    lora_dropout: float = doc(0.0, RL_LORA_DROPOUT_HELP)
    log_rollouts: int = doc(4, "Rollouts per step written to rollouts.jsonl (prompt, response, scores).")


@dataclasses.dataclass
class DPOConfig(GoldEvalKeys, RecordFileKeys, DropoutKeys, TrainConfig):
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
    default_system: str | None = doc(
        "template",
        "System prompt inserted when a conversation has none: 'template' = the chat template's own default "
        "(as apply_chat_template serves it), none = no system prompt, other text = that prompt.",
    )
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
    warmup_steps: int = doc(2, "Linear warm-up steps from 0 to the peak learning rate.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    batch_size: int = doc(8, "Global batch per optimiser step, in preference pairs.")
    micro_batch_size: int = doc(
        4,
        "Pairs per device per forward pass (2x as many sequences, one packed row); accumulation is derived.",
    )
    num_epochs: float = doc(1.0, "Passes over the pairs when max_steps is -1 (Qwen2.5: one epoch).")
    save_steps: int = doc(8, "Write a checkpoint every N optimiser steps (0: only at the end).")
    embedded_pairs: int = doc(256, "With dataset=embedded: how many generated comparisons to train on.")
    embedded_format_error_rate: float = doc(
        0.3, "With dataset=embedded: share of rejected replies that are the right value in the wrong format."
    )


@dataclasses.dataclass
class OnlineConfig(RewardGuardKeys, QueryKeys, GoldEvalKeys, RolloutKeys, TrainConfig):
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
    query_count: int | None = doc(
        24, "With dataset=embedded: how many generated training queries; None: max(16 x batch_size, 64)."
    )
    missing_eos_penalty: float | None = doc(
        None, "Score given to a response that never emitted <|im_end|> (None: score it as it is)."
    )
    batch_size: int = doc(
        4, "Global batch per iteration, in queries (each gets samples_per_query responses)."
    )
    micro_batch_size: int = doc(8, "Responses per forward pass and device.")
    max_steps: int = doc(6, "Iterations (sample + update); -1 derives them from num_epochs over the prompts.")
    save_steps: int = doc(4, "Write a checkpoint every N iterations (0: only at the end).")
    lr_scheduler: Literal["constant", "cosine", "linear"] = doc("constant", "Shape after warm-up.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay (not applied to biases and norms).")
    eval_tasks: int = doc(
        32, "With embedded prompts: held-out tasks whose gold-verifier accuracy is reported before and after."
    )
    lora_dropout: float = doc(0.0, RL_LORA_DROPOUT_HELP)


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
class GRPOConfig(AdaptiveKLKeys, OnlineConfig):
    """GRPO (Qwen2.5): G samples per query, advantages normalised within each group, PPO's clipped
    objective, optional k3 KL to the reference, and queries with larger reward variance trained first.
    Defaults = the embedded default job."""

    output_dir: str = doc("outputs/grpo", "Where checkpoints, metrics.jsonl, rollouts.jsonl and final/ go.")
    samples_per_query: int = doc(8, "G, responses sampled per query (Qwen2.5: 8).")
    batch_size: int = doc(
        2, "Global batch per iteration, in queries (each gets samples_per_query responses)."
    )
    query_count: int | None = doc(
        8, "With dataset=embedded: how many generated training queries; None: max(16 x batch_size, 64)."
    )
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
