"""What PPO and the online loops (online DPO, GRPO) share: prompts, the frozen models and the reward model's
settings, forward passes over rollouts, the scoring phase, and the end-of-iteration bookkeeping. The run
around them (output directory, engine, resume, logger, summary) is `align.train.rl_run`.

The phases of one RL iteration, named the same in both loops (`score_phase`, `advantages_phase`,
`update_phase` in align/train/ppo.py and align/train/online.py):
  rollout      the policy samples responses (`RLRun.rollout`, over `align.rollout_engines`);
  score        `score_rollouts`: reward-model scores (or a rule-based reward) and which responses closed;
  advantages   pure shaping in `align.rl_math` (PPO: `shape_scores` + `token_rewards` + `gae`;
               GRPO: `group_scores` + `group_advantages`; online DPO: `group_scores` + `best_worst_pairs`);
  update       the method's loss, then `align.train.optim_step.optimizer_step`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import chatml
from align.config import PPOConfig
from align.data import DataError, load_prompt_file
from align.fused_logprobs import lm_logprobs
from align.reward import RewardModel
from align.rollout import RolloutBatch, position_ids_from_mask, stop_token_ids
from align.shared_prefix import shared_pass_inexact_reason, shared_prompt_logprobs, shares_prompts
from align.train.optim_step import optimizer_step
from align.train.process import RunSetupError


def load_prompts(cfg: PPOConfig) -> tuple[list[list[dict[str, str]]], list[Any] | None]:
    """Prompt conversations (ending with a user turn) and, for embedded data, their verifiable tasks."""
    if cfg.dataset == "embedded":
        from align.tasks import generate_tasks

        tasks = generate_tasks(max(cfg.batch_size * 16, 64), seed=cfg.seed + 1, split="train")
        return [t.messages for t in tasks], tasks
    path = Path(cfg.dataset)
    if not path.is_file():
        raise DataError(f"{cfg.dataset}: no such prompt file")
    return load_prompt_file(path), None  # messages or prompt, optional tools; file:line errors


def load_frozen_lm(path: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    return model.eval()


def frozen_dtype(cfg: Any) -> torch.dtype:
    """The precision of the frozen reference and reward models (`ref_dtype`)."""
    return torch.bfloat16 if cfg.ref_dtype == "bfloat16" else torch.float32


def load_reference(cfg: Any, path: str, device: torch.device) -> torch.nn.Module | None:
    """The frozen reference policy from `path`, on `device`; None for a LoRA policy, whose reference is the
    same weights with the adapter off (no second copy)."""
    if cfg.use_lora:
        return None
    return load_frozen_lm(path, frozen_dtype(cfg), cfg.trust_remote_code).to(device)


def load_reward_model(cfg: Any, tokenizer: Any, device: torch.device) -> RewardModel:
    """The frozen reward model at `cfg.reward_model_path`, on `device`; refused when its vocabulary is not
    the policy's (it would score other tokens than those sampled)."""
    check_same_vocabulary(tokenizer, cfg.reward_model_path)
    reward_model = RewardModel.from_pretrained(cfg.reward_model_path, dtype=frozen_dtype(cfg))
    reward_model.requires_grad_(False)
    return reward_model.eval().to(device)


def check_same_vocabulary(tokenizer: Any, path: str) -> None:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(path)
    if other.get_vocab() != tokenizer.get_vocab():
        raise RunSetupError(
            f"{path} uses a different tokenizer from the policy; PPO needs one vocabulary for all four models"
        )


def response_logprobs(
    model: Any, seq: Any, response_ids: torch.Tensor, temperature: float, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of the response tokens (and their entropy) from one forward pass, computed in
    chunks from the last hidden states so the (B, R, V) logits are never built (`align.fused_logprobs`)."""
    return lm_logprobs(
        model,
        response_ids,
        temperature=temperature,
        with_entropy=with_entropy,
        drop_last=True,
        input_ids=seq.input_ids,
        attention_mask=seq.attention_mask,
        position_ids=position_ids_from_mask(seq.attention_mask),
        use_cache=False,
        logits_to_keep=response_ids.shape[1] + 1,
    )


def rollout_logprobs(
    model: Any, sub: RolloutBatch, temperature: float, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of a rollout (sub-)batch's responses: rows that answer the same prompt run it once
    (`align.shared_prefix`: GRPO's G samples, online DPO's pairs, PPO's 2 samples), else one left-padded
    pass (the reference computation). The shared pass is taken only where it equals that pass to float
    rounding, values and gradients: not in training mode with gradient checkpointing or active
    dropout (`shared_pass_inexact_reason`; tests/test_matrix_shared_prompt.py)."""
    if shares_prompts(sub) and shared_pass_inexact_reason(model) is None:
        return shared_prompt_logprobs(model, sub, temperature, with_entropy)
    return response_logprobs(model, sub.sequences(left_pad=True), sub.response_ids, temperature, with_entropy)


def scatter_rows(target: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    target[torch.tensor(rows, device=target.device), : values.shape[1]] = values.to(target.dtype)


def gold_score(tasks: list[Any], local: list[int], batch: RolloutBatch, texts: list[str]) -> float:
    """Share of responses that the gold verifier accepts (generated prompts only)."""
    from align.tasks import verify

    prompt_rows = batch.prompt_index.tolist()
    return sum(verify(tasks[local[p]], text) for p, text in zip(prompt_rows, texts, strict=True)) / len(texts)


def log_rl_step(
    cfg: Any,
    metrics: dict[str, Any],
    done: int,
    total: int,
    logger: Any,
    batch: RolloutBatch,
    texts: list[str],
    scores: torch.Tensor,
    timings: tuple[float, float, float],
    *,
    tasks: list[Any] | None,
    local: list[int],
    prompts: list[list[dict[str, str]]],
    rollout_log: Path,
    is_main: bool,
) -> None:
    """The end of an iteration of PPO or an online loop: response length, unclosed share and timings
    (rollout, scoring, training) added to `metrics`, the gold verifier's score on generated prompts, the
    metrics line every `logging_steps`, and the first `log_rollouts` responses to rollouts.jsonl."""
    t_rollout, t_score, t_train = timings
    lengths = batch.lengths.float()
    metrics.update(
        {
            "response_length": lengths.mean().item(),
            "no_eos_frac": 1.0 - batch.finished.float().mean().item(),
            "time_rollout": t_rollout,
            "time_scoring": t_score,
            "time_training": t_train,
            "response_tokens_per_s": lengths.sum().item() / max(t_rollout, 1e-9),
        }
    )
    if tasks is not None:
        metrics["gold_score"] = gold_score(tasks, local, batch, texts)
    if done % cfg.logging_steps == 0 or done == total:
        logger.log(metrics, step=done)
    if is_main and cfg.log_rollouts > 0:
        append_rollouts(rollout_log, done, batch, texts, local, prompts, scores, cfg.log_rollouts)


def append_rollouts(
    path: Path,
    step: int,
    batch: RolloutBatch,
    texts: list[str],
    local: list[int],
    prompts: list[list[dict[str, str]]],
    scores: torch.Tensor,
    limit: int,
) -> None:
    """Write the first `limit` responses of this step, with their scores, to rollouts.jsonl."""
    with path.open("a") as fh:
        for row in range(min(limit, len(texts))):
            query = local[int(batch.prompt_index[row])]
            record = {
                "step": step,
                "query": query,
                "prompt": prompts[query][-1]["content"],
                "response": texts[row],
                "score": scores[row].item(),
                "finished": bool(batch.finished[row]),
            }
            fh.write(json.dumps(record) + "\n")


def add_stats(acc: dict[str, list[float]], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        acc.setdefault(key, []).append(float(value))


def micro_slices(rows: list[int], size: int) -> list[list[int]]:
    """`rows` cut into consecutive slices of at most `size` (one forward pass each)."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def reward_model_settings(reward_model: Any, tokenizer: Any, default_system: str | None) -> str | None:
    """The prompt settings an RL stage must use with this reward model; refuses what cannot work.

    The RM saved the end token it pools at and the system prompt it was trained with
    (`reward_config.json`). The RL prompts must carry the same system prompt (SFT and the RM saw it), and the
    policy must be able to emit the RM's end token, or every response is unreadable to the RM and scores its
    `unclosed_reward` placeholder: a silent zero signal after normalisation.

    Returns the system prompt to use: the RM's when `default_system` is the stage default ``"template"``,
    else `default_system` resolved, when it equals the RM's. Raises RunSetupError on a different system prompt, on an end token
    the policy's tokenizer spells with another id, and on an end token the rollouts never stop on.
    """
    rm_cfg = reward_model.config
    ids = tokenizer.convert_tokens_to_ids(rm_cfg.end_token)
    if ids != rm_cfg.end_token_id:
        raise RunSetupError(
            f"the reward model reads its score at {rm_cfg.end_token!r} = id {rm_cfg.end_token_id}, but the policy's "
            f"tokenizer gives that token id {ids}: they do not share a tokenizer"
        )
    stops = stop_token_ids(tokenizer)
    if rm_cfg.end_token_id not in stops:
        raise RunSetupError(
            f"the reward model reads its score at {rm_cfg.end_token!r} (id {rm_cfg.end_token_id}), but rollouts stop "
            f"only on ids {stops}: no response would ever be scored; retrain the RM with end_token=<|im_end|>"
        )
    # Compared as the prompts they resolve to ('template' -> the template's own default, none -> None).
    rm_system = chatml.resolve_default_system(rm_cfg.default_system, tokenizer)
    if default_system == chatml.TEMPLATE_SYSTEM:
        return rm_system  # the stage default: follow the reward model
    wanted = chatml.resolve_default_system(default_system, tokenizer)
    if wanted != rm_system:
        raise RunSetupError(
            f"default_system={default_system!r} but the reward model was trained with {rm_system!r}; "
            f"leave default_system at {chatml.TEMPLATE_SYSTEM!r} to use the reward model's"
        )
    return wanted


def rl_default_system(cfg: Any, reward_model: RewardModel | None, tokenizer: Any) -> str | None:
    """The system prompt the RL prompts get: the reward model's when there is one (`reward_model_settings`,
    which also refuses an RM the policy cannot be scored by), else `cfg.default_system`."""
    if reward_model is None:
        return cfg.default_system
    return reward_model_settings(reward_model, tokenizer, cfg.default_system)


def score_rollouts(
    batch: RolloutBatch,
    texts: list[str],
    *,
    reward_model: Any = None,
    reward_fn: Callable[[RolloutBatch, list[str]], Any] | None = None,
    micro_batch_size: int = 8,
    autocast: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The score phase: raw (B,) fp32 scores, (B,) bool `closed` (stopped, and readable to the scorer) and
    (B,) bool `readable` (the score is a judgement: an RM found its end token; a rule reads any text).

    With a reward model, a response the RM could not read (its end token missing: cut by the budget, or
    stopped on another stop id) is not closed; its raw score is the RM's placeholder and must not be used
    as a judgement (`align.rl_math.shape_scores`, `group_scores`). A rule-based `reward_fn` reads any text,
    so closed = finished.
    """
    device = batch.response_ids.device
    if reward_model is None:
        if reward_fn is None:
            raise ValueError("score_rollouts needs a reward_model or a reward_fn")
        raw = torch.as_tensor(reward_fn(batch, texts), dtype=torch.float32, device=device)
        return raw, batch.finished.bool().clone(), torch.ones_like(batch.finished, dtype=torch.bool)
    raw = torch.zeros(len(texts), device=device)
    found = torch.zeros(len(texts), dtype=torch.bool, device=device)
    with torch.no_grad():
        for rows in micro_slices(list(range(len(texts))), micro_batch_size):
            seq = batch.select(rows).sequences(left_pad=True)
            ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                out = reward_model(seq.input_ids.to(device), seq.attention_mask.to(device))
            index = torch.tensor(rows, device=device)
            raw[index] = out.rewards.float().to(device)
            found[index] = out.found.to(device)
    return raw, batch.finished.bool() & found, found


@dataclasses.dataclass
class PolicyTrainer:
    """What an update phase needs of the run: the policy (wrapped and unwrapped), its frozen reference
    (None: a LoRA policy with its adapter off), optimiser, checkpointer and the run's counters."""

    cfg: Any
    accelerator: Any
    policy: Any
    policy_u: Any
    reference: Any
    optimizer: Any
    checkpointer: Any
    counts: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def reference_logprobs(self, sub: RolloutBatch) -> torch.Tensor:
        """(B, R) reference log-probs of a rollout (sub-)batch's response tokens, no grad."""
        with torch.no_grad():
            if self.reference is not None:
                return rollout_logprobs(self.reference, sub, self.cfg.temperature)
            with self.policy_u.disable_adapter():
                return rollout_logprobs(self.policy_u, sub, self.cfg.temperature)

    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights, optimisers and schedules (the loop's counters)."""
        return self.counts

    def optimizer_step(self, step: int, what: str = "gradient") -> float:
        """`optimizer_step` on the policy (the schedule is stepped once per iteration by the loop)."""
        return optimizer_step(
            self.accelerator, self.policy, self.optimizer, max_grad_norm=self.cfg.max_grad_norm,
            counts=self.counts, checkpointer=self.checkpointer, step=step, what=what,
        )  # fmt: skip
