"""The RL stages' configs (PPO, online DPO, GRPO) and the parts only they have: rollout sampling, the query
set, over-optimisation guards and the adaptive KL controller."""

from __future__ import annotations

import dataclasses
from typing import Literal

from align.config.keys import GoldEvalKeys, TrainConfig, _next_post_init, doc
from align.config_loader import ConfigError


@dataclasses.dataclass
class SamplingKeys:
    """Sampling responses from a policy: the keys every sampling stage shares, with one meaning (the RL
    stages through RolloutKeys, and recipes/sample_pairs.py)."""

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
    temperature: float = doc(
        1.0, "Sampling temperature (the RL stages' log-probs use the same; sample_pairs takes 0 as greedy)."
    )
    max_new_tokens: int = doc(24, "Response budget.")
    rollout_engine: Literal["hf", "manual", "static", "vllm"] = doc(
        "hf",
        "Generation backend: hf, manual, static (fixed shapes, refilling), vllm (experimental, untested); "
        "see align/rollout/engines.py.",
    )
    rollout_compile: Literal["auto", "on", "off"] = doc(
        "auto",
        "CUDA-graph decoding for rollout_engine=static: the whole decoding step (forward, top-p, sampling, stop "
        "test) captured once per batch-size bucket; auto = on for CUDA, off on CPU; on = also on CPU "
        "(torch.compile without graphs); fails loudly if the graphs do not engage. Not yet measured on a GPU. "
        "Other engines run eager (on is an error there).",
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        _next_post_init(self, SamplingKeys)


@dataclasses.dataclass
class RolloutKeys(SamplingKeys):
    """Sampling responses from the policy in the RL stages (PPO, online DPO, GRPO): SamplingKeys plus
    sharded decoding, the frozen models' precision and rollout logging."""

    def __post_init__(self) -> None:
        # Greedy rollouts would give every sample of a query one answer, and the training pass divides the
        # logits by the temperature (0 would make them infinite): the RL losses need a distribution.
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature: the RL stages sample, so it must be > 0 (got {self.temperature}); "
                "greedy decoding is for evaluation and sample_pairs"
            )
        _next_post_init(self, RolloutKeys)

    rollout_sharded: Literal["unshard", "lockstep"] = doc(
        "unshard",
        "With sharding=fsdp, how the policy's shards are decoded: unshard = gather the whole weights once per "
        "rollout, then each rank decodes on its own (fast; the whole model must fit next to the shards); "
        "lockstep = keep the weights sharded, every rank runs a forward per decoding step (each gathering "
        "the weights layer by layer) until every rank's rows have stopped: for a model that does not fit "
        "unsharded. Same samples either way; lockstep needs rollout_engine=manual or hf.",
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
    query_kinds: list[str] | None = doc(
        None,
        "With dataset=embedded: keep only these task kinds of the query_count queries (the same problems, "
        "filtered, so the RM's query set still holds every RL query); None: all. Pick them with the "
        "per-kind best-of-n gate (eval/best_of_n.py: the kinds where the RM's favourite reaches greedy).",
    )

    def __post_init__(self) -> None:
        if self.query_count is not None and self.query_count < 1:
            raise ConfigError(f"query_count: must be >= 1 (or none), got {self.query_count}")
        if self.query_kinds is not None:
            from align.tasks import KINDS

            if getattr(self, "dataset", "embedded") != "embedded":
                raise ConfigError(f"query_kinds filters the embedded queries; dataset is {self.dataset}")
            unknown = [k for k in self.query_kinds if k not in KINDS]
            if unknown or not self.query_kinds or len(set(self.query_kinds)) != len(self.query_kinds):
                raise ConfigError(
                    f"query_kinds: a non-empty list of distinct kinds from {', '.join(KINDS)} (or none), got "
                    f"{self.query_kinds}"
                )
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


# The RL loops train with dropout off: the model's own by load_causal_lm, LoRA's by this default.
RL_LORA_DROPOUT_HELP = (
    "Dropout on the LoRA branch. 0 in the RL loops, which train with dropout off: the first update's "
    "log-probs then equal those the rollout scored (ratio 1), and the update can use the shared-prompt "
    "pass (with dropout it takes the slower per-row pass: align/rollout/shared_prefix.py)."
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
