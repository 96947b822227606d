"""The offline stages' configs: SFT, the reward model (PMP, RM) and DPO."""

from __future__ import annotations

import dataclasses
from typing import Literal

from align.config.keys import DropoutKeys, GoldEvalKeys, RecordFileKeys, TrainConfig, _next_post_init, doc
from align.config_loader import ConfigError


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
    rm_num_epochs: float | None = doc(
        None,
        "With stage=pmp+rm: passes of the RM stage over rm_dataset when max_steps is -1; none: num_epochs "
        "(which PMP reads).",
    )
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
    num_heads: int = doc(
        1,
        "K >= 1 scalar reward heads on the backbone. K > 1: an ensemble (the RL stages score with "
        "rm_ensemble_objective: mean, min or mean - lambda x std): each head is trained on its own loss and "
        "its own bootstrap weighting of the data (head_bootstrap), and held-out accuracy is reported per head, "
        "of the mean and of the min, with the heads' disagreement. A new head layer draws K independent rows; "
        "an init_from model of one head (a PMP model) is widened to K (head_init_noise), one of K heads "
        "continues as it is, any other count is refused. stage=pmp+rm trains one head in PMP, K in RM.",
    )
    head_bootstrap: Literal["poisson", "bernoulli", "none"] = doc(
        "poisson",
        "With num_heads > 1, how each head sees different data: every training item (a pair; a prompt's "
        "group under pair_grouping=prompt) weighs a count drawn from (seed, head, item) alone, the same each "
        "epoch, on resume and under any micro-batch split: poisson = Poisson(1) (the online bootstrap), "
        "bernoulli = 0 or 1 with probability 1/2, none = 1 (the heads differ by their start only). Each "
        "head's loss is its weighted mean over the global batch (align.losses.ensemble_pairwise_loss).",
    )
    head_init_noise: float = doc(
        1.0,
        "With init_from a one-head model and num_heads K > 1: head k starts as that head plus Gaussian noise "
        "of std head_init_noise / sqrt(hidden + 1) (a new head's init scale) seeded by (seed, k); 0: K exact "
        "copies, so only head_bootstrap separates them.",
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

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"num_heads: must be >= 1, got {self.num_heads}")
        if self.head_init_noise < 0:
            raise ConfigError(f"head_init_noise: must be >= 0, got {self.head_init_noise}")
        _next_post_init(self, RMConfig)


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
