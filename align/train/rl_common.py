"""What PPO and the online loops (online DPO, GRPO) share: prompts, the frozen models and the reward model's
settings, forward passes over rollouts, the scoring phase, and the end-of-iteration bookkeeping. The run
around them (output directory, engine, resume, logger, summary) is `align.train.rl_run`.

The phases of one RL iteration, named the same in both loops (`score_phase`, `advantages_phase`,
`update_phase` in align/train/ppo.py and align/train/online.py):
  rollout      the policy samples responses (`RLRun.rollout`, over `align.rollout.engines`);
  score        `score_rollouts`: reward-model scores (or a rule-based reward) and which responses closed;
               then `guard_scores`, the over-optimisation guards both loops share (`RewardGuards`:
               ensemble -> clip -> anchor, all off by default);
  advantages   pure shaping in `align.rl_math` (PPO: `shape_scores` + `token_rewards` + `gae`;
               GRPO: `group_scores` + `group_advantages`; online DPO: `group_scores` + `best_worst_pairs`);
  update       the method's loss, then `align.train.optim_step.optimizer_step`; the adaptive KL controller
               (`adapt_kl`) moves the KL coefficient for the next iteration.

The embedded query set both loops train on is `load_prompts` (`query_count`, `query_seed`, `query_kinds`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import chatml
from align.config import OnlineConfig, PPOConfig
from align.config_loader import ConfigError
from align.data import DataError, load_prompt_file
from align.fused_logprobs import lm_logprobs
from align.reward import RewardModel
from align.rl_math import AdaptiveKLController, ensemble_and_clip, guarded_scores
from align.rollout.batch import RolloutBatch, position_ids_from_mask, stop_token_ids
from align.rollout.shared_prefix import shared_pass_inexact_reason, shared_prompt_logprobs, shares_prompts
from align.train.optim_step import optimizer_step
from align.train.process import RunSetupError
from align.train.sharding import full_weights, is_sharded, resharded_after


def query_count(cfg: PPOConfig | OnlineConfig) -> int:
    """How many embedded queries: `query_count`, or (None) max(16 x batch_size, 64), PPO's count before it
    was a key."""
    return cfg.query_count if cfg.query_count is not None else max(cfg.batch_size * 16, 64)


def query_seed(cfg: PPOConfig | OnlineConfig) -> int:
    """The embedded queries' generate_tasks seed: `query_seed`, or (None) seed + 1, as before it was a key."""
    return cfg.query_seed if cfg.query_seed is not None else cfg.seed + 1


def query_set(count: int, seed: int, kinds: Sequence[str] | None = None) -> list[Any]:
    """The embedded query set: `count` generated tasks of the train split with `seed`, of which only those of
    `kinds` are kept (None: all). The one definition PPO and the online loops train on, and the one the
    RM's on-policy pairs should be sampled on (recipes/sample_pairs.py with the same count and seed) so the
    RM's queries are the RL queries (Qwen2.5): filtering keeps them a subset. Held-out problems
    (`align.tasks.split_of_key`) are never in it, whatever the seed."""
    from align.tasks import generate_tasks

    tasks = generate_tasks(count, seed=seed, split="train")
    if kinds is None:
        return tasks
    kept = [t for t in tasks if t.kind in kinds]
    if not kept:
        raise ConfigError(
            f"query_kinds {list(kinds)}: none of the {count} queries of seed {seed} is of these kinds"
        )
    return kept


def load_prompts(cfg: PPOConfig | OnlineConfig) -> tuple[list[list[dict[str, str]]], list[Any] | None]:
    """Prompt conversations (ending with a user turn) and, for embedded data, their verifiable tasks (the
    query set of `query_count`, `query_seed` and `query_kinds`; resume refuses another set, as the run's
    checkpointer fingerprints the encoded prompts)."""
    if cfg.dataset == "embedded":
        tasks = query_set(query_count(cfg), query_seed(cfg), cfg.query_kinds)
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
    (`align.rollout.shared_prefix`: GRPO's G samples, online DPO's pairs, PPO's 2 samples), else one left-padded
    pass (the reference computation). The shared pass is taken only where it equals that pass to float
    rounding, values and gradients: not in training mode with gradient checkpointing or active
    dropout (`shared_pass_inexact_reason`; tests/test_matrix_shared_prompt.py), and not on a sharded model."""
    # Not for a sharded model: the step pass reads the prompt pass's cache straight from its k/v
    # projections, past FSDP's backward hooks (the weights would be freed shards in backward), and whether a
    # slice shares prompts differs per rank, so the ranks' forward counts (all-gathers) would too.
    if shares_prompts(sub) and shared_pass_inexact_reason(model) is None and not is_sharded(model):
        return shared_prompt_logprobs(model, sub, temperature, with_entropy, checked=True)
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
    so closed = finished. An ensemble RM's raw score is its heads' mean (`score_members` gives each head's).
    """
    members, closed, readable = score_members(
        batch, texts, reward_model=reward_model, reward_fn=reward_fn, micro_batch_size=micro_batch_size,
        autocast=autocast,
    )  # fmt: skip
    raw = members[:, 0] if members.shape[1] == 1 else members.mean(dim=1)
    return raw, closed, readable


def score_members(
    batch: RolloutBatch,
    texts: list[str],
    *,
    reward_model: Any = None,
    reward_fn: Callable[[RolloutBatch, list[str]], Any] | None = None,
    micro_batch_size: int = 8,
    autocast: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`score_rollouts` with every reward head's score: (B, K) fp32 (K = the RM's `num_heads`; 1 for a
    one-head RM or a rule-based reward), (B,) bool closed and (B,) bool readable."""
    device = batch.response_ids.device
    if reward_model is None:
        if reward_fn is None:
            raise ValueError("score_rollouts needs a reward_model or a reward_fn")
        raw = torch.as_tensor(reward_fn(batch, texts), dtype=torch.float32, device=device)
        readable = torch.ones_like(batch.finished, dtype=torch.bool)
        return raw.reshape(-1, 1), batch.finished.bool().clone(), readable
    members = torch.zeros(len(texts), reward_model.config.num_heads, device=device)
    found = torch.zeros(len(texts), dtype=torch.bool, device=device)
    with torch.no_grad():
        for rows in micro_slices(list(range(len(texts))), micro_batch_size):
            seq = batch.select(rows).sequences(left_pad=True)
            ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                out = reward_model(seq.input_ids.to(device), seq.attention_mask.to(device))
            index = torch.tensor(rows, device=device)
            members[index] = out.member_rewards.float().to(device)
            found[index] = out.found.to(device)
    return members, batch.finished.bool() & found, found


# ---------------------------------------------------------------------------------------------------
# Over-optimisation guards (`RewardGuardKeys`, `AdaptiveKLKeys` in align/config/rl.py): the run state they
# keep, applied in the score phase of PPO and the online loops alike.


@dataclasses.dataclass
class Scored:
    """The score phase over B responses: `scores` are what the stage's shaping reads (after the guards;
    the raw scores when every guard is off), `rm_scores` the scorer's own (an ensemble RM's heads' mean)."""

    scores: torch.Tensor  # (B,) fp32, guarded
    rm_scores: torch.Tensor  # (B,) fp32, as scored
    closed: torch.Tensor  # (B,) bool: stopped and readable to the scorer
    readable: torch.Tensor  # (B,) bool: the score is a judgement
    stats: dict[str, float]  # what each guard did (`guarded_scores`)


@dataclasses.dataclass
class RewardGuards:
    """One run's over-optimisation guards: the settings read from its config once, the PAR anchors (each
    query's reference answer's score, `reference_anchors`) and the adaptive KL controller. The anchors and
    the controller are run state, checkpointed with the trainer state (`state_dict`)."""

    objective: str = "mean"
    penalty: float = 0.0
    clip: float | None = None
    anchor: bool = False
    anchors: list[float] | None = None  # per query (an index into the run's prompts); set before training
    kl: AdaptiveKLController | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> RewardGuards:
        """The guards of `cfg`; refuses a penalty that would do nothing (ConfigError, naming the key)."""
        if cfg.rm_ensemble_penalty and cfg.rm_ensemble_objective != "uncertainty":
            raise ConfigError(
                f"rm_ensemble_penalty={cfg.rm_ensemble_penalty} is only read with "
                f"rm_ensemble_objective=uncertainty (it is {cfg.rm_ensemble_objective})"
            )
        target = getattr(cfg, "kl_target", None)  # online DPO has no KL coefficient to adapt
        return cls(
            objective=cfg.rm_ensemble_objective,
            penalty=cfg.rm_ensemble_penalty,
            clip=cfg.reward_clip,
            anchor=cfg.reward_anchor == "reference",
            kl=AdaptiveKLController(cfg.kl_coef, target, cfg.kl_horizon) if target is not None else None,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.anchor:
            state["reward_anchors"] = self.anchors
        if self.kl is not None:
            state["kl_controller"] = self.kl.state_dict()
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore from a checkpoint's trainer state. A checkpoint without anchors (the run started with
        reward_anchor=none) is refused: the starting policy that must answer is gone. One without a
        controller state starts the controller at kl_coef."""
        if self.anchor:
            if saved.get("reward_anchors") is None:
                raise RunSetupError(
                    "reward_anchor=reference, but the checkpoint has no reference scores (the run started "
                    "without it) and the starting policy is no longer there to answer; use a new output_dir"
                )
            self.anchors = [float(x) for x in saved["reward_anchors"]]
        if self.kl is not None and "kl_controller" in saved:
            self.kl.load_state_dict(saved["kl_controller"])

    def check_scorer(self, reward_model: Any) -> None:
        """Refuse an ensemble objective that would do nothing: min and uncertainty need K > 1 heads."""
        heads = reward_model.config.num_heads if reward_model is not None else 1
        if self.objective != "mean" and heads < 2:
            what = f"a reward model with {heads} head" if reward_model is not None else "a rule-based reward"
            raise RunSetupError(
                f"rm_ensemble_objective={self.objective} needs a reward model of several heads (num_heads in "
                f"reward_config.json); the run is scored by {what}"
            )

    def kl_coef(self, fixed: float) -> float:
        """The KL coefficient of this iteration: the controller's, else the config's `fixed` one."""
        return self.kl.coef if self.kl is not None else fixed

    def apply(
        self, members: torch.Tensor, readable: torch.Tensor, queries: list[int], batch: RolloutBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`guarded_scores` of a batch whose prompt i is query `queries[i]`: (B,) scores and statistics."""
        reference = None
        if self.anchor:
            if self.anchors is None:
                raise RuntimeError("reward_anchor=reference: reference_anchors must run before scoring")
            rows = [queries[int(p)] for p in batch.prompt_index.tolist()]
            reference = torch.tensor([self.anchors[q] for q in rows], device=members.device)
        return guarded_scores(
            members, readable, objective=self.objective, penalty=self.penalty, clip=self.clip,
            reference=reference,
        )  # fmt: skip


def guard_scores(
    guards: RewardGuards,
    batch: RolloutBatch,
    texts: list[str],
    queries: list[int],
    *,
    reward_model: Any = None,
    reward_fn: Callable[[RolloutBatch, list[str]], Any] | None = None,
    micro_batch_size: int = 8,
    autocast: Any = None,
) -> Scored:
    """The score phase PPO and the online loops share: `score_members`, then the guards (ensemble -> clip
    -> anchor) on readable rows; prompt i of `batch` is query `queries[i]`."""
    members, closed, readable = score_members(
        batch, texts, reward_model=reward_model, reward_fn=reward_fn, micro_batch_size=micro_batch_size,
        autocast=autocast,
    )  # fmt: skip
    scores, stats = guards.apply(members, readable, queries, batch)
    rm_scores = members[:, 0] if members.shape[1] == 1 else members.mean(dim=1)
    return Scored(scores, rm_scores, closed, readable, stats)


def rollout_weights(engine: Any) -> Any:
    """The block a rollout runs in: the engine's model gathered whole when it is sharded (`full_weights`:
    every rank enters, then each decodes its own rows to their own lengths; resharded on exit, so the next
    optimiser step updates what the next rollout reads), or with `rollout_sharded: lockstep` left sharded
    while the engine decodes in step with the other ranks (`resharded_after`). An engine without a torch
    model passes through."""
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        return nullcontext()
    return resharded_after(model) if getattr(engine, "lockstep", False) else full_weights(model)


def reference_anchors(
    run: Any,
    guards: RewardGuards,
    score: Callable[[RolloutBatch, list[str], list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> list[float]:
    """PAR's anchors: the policy's greedy answer to every query of `run` (call it before any update, so the
    policy is the starting one), scored once by `score(batch, texts, queries) -> score_members' triple`,
    then ensembled and clipped like every score. A reference answer the scorer could not read (it never
    closed) gets the mean of the readable ones' scores. Every process computes all of them (greedy
    decoding: the same on each). The main process writes them to reference_answers.jsonl."""
    cfg, accelerator = run.cfg, run.accelerator
    # vLLM decodes its own bf16 copy of the weights: no autocast of ours there (as RLRun.sample).
    autocast = nullcontext if cfg.rollout_engine == "vllm" else accelerator.autocast
    n = len(run.prompt_ids)
    anchors: list[float | None] = []
    records = []
    for start in range(0, n, cfg.batch_size):
        queries = list(range(start, min(start + cfg.batch_size, n)))
        with autocast(), torch.no_grad(), rollout_weights(run.engine):
            batch = run.engine.generate(
                [run.prompt_ids[q] for q in queries], n=1, max_new_tokens=cfg.max_new_tokens,
                temperature=0.0, top_p=1.0, seed=cfg.seed,
            ).to(accelerator.device)  # fmt: skip
        texts = batch.texts(run.tokenizer)
        members, _, readable = score(batch, texts, queries)
        base = ensemble_and_clip(members, guards.objective, guards.penalty, guards.clip)
        for q, text, value, ok in zip(queries, texts, base.tolist(), readable.tolist(), strict=True):
            anchors.append(value if ok else None)
            records.append({"query": q, "response": text, "score": value if ok else None})
    known = [a for a in anchors if a is not None]
    if not known:
        raise RunSetupError(
            f"reward_anchor=reference: no greedy reference answer closed within max_new_tokens="
            f"{cfg.max_new_tokens}, so none could be scored"
        )
    fill = sum(known) / len(known)
    if run.is_main:
        with (run.out / "reference_answers.jsonl").open("w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
    accelerator.print(
        f"reward_anchor: {n} greedy reference answers scored, mean {fill:.3f}; {n - len(known)} unreadable "
        "take that mean"
    )
    return [a if a is not None else fill for a in anchors]


def adapt_kl(trainer: PolicyTrainer, kl: float | None, responses: int) -> dict[str, float]:
    """After an iteration that used `trainer.kl_coef`: that coefficient (the `kl_coef` metric), then the
    adaptive controller's move for the next iteration from the iteration's `kl` (averaged over processes,
    so every process keeps the same coefficient) over the global batch's `responses`. `kl` None: no KL
    was measured (nothing trained), the coefficient stays."""
    used = trainer.kl_coef
    controller = trainer.guards.kl
    if controller is not None and kl is not None:
        accelerator = trainer.accelerator
        if accelerator.num_processes > 1:
            kl = accelerator.reduce(torch.tensor(kl, device=trainer.device), reduction="mean").item()
        controller.update(kl, responses)
    return {"kl_coef": used}


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
    # keyword-only, so the subclasses' own fields keep their positions
    guards: RewardGuards = dataclasses.field(default_factory=RewardGuards, kw_only=True)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def kl_coef(self) -> float:
        """The KL coefficient this iteration's loss uses: the adaptive controller's (kl_target), else
        the config's kl_coef."""
        return self.guards.kl_coef(self.cfg.kl_coef)

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
        """What a checkpoint keeps besides the weights, optimisers and schedules: the loop's counters and
        the guards' state (PAR anchors, the KL controller)."""
        return {**self.counts, **self.guards.state_dict()}

    def optimizer_step(self, step: int, what: str = "gradient") -> float:
        """`optimizer_step` on the policy (the schedule is stepped once per iteration by the loop)."""
        return optimizer_step(
            self.accelerator, self.policy, self.optimizer, max_grad_norm=self.cfg.max_grad_norm,
            counts=self.counts, checkpointer=self.checkpointer, step=step, what=what,
        )  # fmt: skip
