"""Compare an aligned policy with its baseline (normally the SFT model): win rates, KL, length, alignment tax.

The pure pieces (win counting with ties, the Wilson interval, token-weighted LM loss, per-sequence KL) are
small functions tested on worked numbers; ``compare_policies`` strings them together on real models and
writes ``eval.json`` and ``eval.md``.

What is greedy and what is sampled:
* the responses that are judged (gold verifier, reward model, win rates) and measured (length) are greedy,
  for both models: that is what a user gets at temperature 0, and greedy accuracy has no sampling noise,
  so a difference between the two models is a difference between the models;
* the KL is measured on one *sampled* response per prompt from the policy (temperature 1, no top-p):
  ``KL(pi || pi_base) = E_{y ~ pi}[log pi(y) - log pi_base(y)]`` is an expectation over the policy's own
  distribution, and a greedy response is not a sample of it (its log-ratio would be biased upwards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import chatml
from align.rl_math import kl_estimate, masked_sum, token_logprobs
from align.rollout.batch import HFRolloutEngine, RolloutBatch, teacher_forced_logprobs
from align.tasks import Task, generate_tasks, verify, write_jsonl

__all__ = [
    "add_cli_args",
    "check_cli_args",
    "compare_policies",
    "format_markdown",
    "format_win_rate",
    "lm_loss",
    "mcnemar_exact",
    "paired_accuracy",
    "paired_by_prompt",
    "conversation_id",
    "per_task_records",
    "portable_path",
    "load_lm",
    "sequence_kl",
    "tax_rows",
    "win_counts",
    "win_rate",
    "wilson_interval",
]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def win_counts(
    policy_scores: Sequence[float], baseline_scores: Sequence[float], tol: float = 0.0
) -> tuple[int, int, int]:
    """(wins, ties, losses) of the policy over paired scores; |difference| <= ``tol`` is a tie."""
    if len(policy_scores) != len(baseline_scores):
        raise ValueError(f"unpaired scores: {len(policy_scores)} policy vs {len(baseline_scores)} baseline")
    wins = ties = losses = 0
    for p, b in zip(policy_scores, baseline_scores, strict=True):
        if abs(p - b) <= tol:
            ties += 1
        elif p > b:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (successes may be fractional: half ties).

    Why Wilson and not a paired bootstrap: it is closed-form and deterministic (a report and a test give the
    same numbers every time), it stays inside [0, 1] and keeps its coverage at the small n (32-64 prompts)
    and near-0/near-1 rates an evaluation on a CPU sees, where the Wald interval collapses to a point.
    Counting a tie as half a win shrinks the true variance, so the interval is, if anything, conservative.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under "no change", each of the gained + lost discordant tasks (wrong
    before and right after, or the reverse) is a fair coin. p = P(|Binomial(n, 1/2) - n/2| >= |observed|),
    capped at 1. Concordant tasks carry no information about the change and do not enter."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_accuracy(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> dict[str, Any]:
    """Gold accuracy of the same tasks before and after training, with the paired test.

    Returns ``{n, before, before_lo, before_hi, after, after_lo, after_hi, gained, lost, delta, delta_lo,
    delta_hi, p_mcnemar}``: Wilson 95% intervals for each accuracy; the change ``delta = (gained - lost) / n``
    with its paired (Wald) interval ``z * sqrt(gained + lost - (gained - lost)^2 / n) / n``; the exact
    McNemar p-value. Paired because the two accuracies share the tasks: their difference has far less
    variance than two independent samples would suggest, and treating them as independent wastes power.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_accuracy: {len(before)} before vs {len(after)} after results")
    n = len(before)
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n_before, n_after = sum(map(bool, before)), sum(map(bool, after))
    b_lo, b_hi = wilson_interval(n_before, n)
    a_lo, a_hi = wilson_interval(n_after, n)
    delta = (gained - lost) / n if n else 0.0
    half = z * math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n if n else 0.0
    return {"n": n, "before": n_before / n if n else 0.0, "before_lo": b_lo, "before_hi": b_hi,
            "after": n_after / n if n else 0.0, "after_lo": a_lo, "after_hi": a_hi, "gained": gained,
            "lost": lost, "delta": delta, "delta_lo": delta - half, "delta_hi": delta + half,
            "p_mcnemar": mcnemar_exact(gained, lost)}  # fmt: skip


def paired_by_prompt(
    prompt_ids: Sequence[str], before: Sequence[bool], after: Sequence[bool]
) -> dict[str, Any]:
    """The paired test with each distinct prompt counted once: ``{n, gained, lost, p_mcnemar, repeats,
    inconsistent}``. ``prompt_ids`` names each task's whole conversation (equal ids: the very same prompt).

    Why: a task list may ask the same prompt more than once (the 400 embedded evaluation tasks hold 270
    distinct prompts, because five task kinds have only 12-21 held-out problems). A greedy answer to a
    repeated prompt repeats, so a repeat adds weight but no evidence, and the per-task McNemar p overstates
    it. Each prompt keeps its first verdicts; ``repeats`` counts the tasks dropped, ``inconsistent`` the
    prompts whose repeats were judged differently (0 under greedy decoding).
    """
    if not len(prompt_ids) == len(before) == len(after):
        raise ValueError(
            f"paired_by_prompt: {len(prompt_ids)} prompts, {len(before)} before, {len(after)} after"
        )
    first: dict[str, tuple[bool, bool]] = {}
    inconsistent: set[str] = set()
    for pid, b, a in zip(prompt_ids, before, after, strict=True):
        if first.setdefault(pid, (bool(b), bool(a))) != (bool(b), bool(a)):
            inconsistent.add(pid)
    gained = sum(1 for b, a in first.values() if a and not b)
    lost = sum(1 for b, a in first.values() if b and not a)
    return {"n": len(first), "gained": gained, "lost": lost, "p_mcnemar": mcnemar_exact(gained, lost),
            "repeats": len(prompt_ids) - len(first), "inconsistent": len(inconsistent)}  # fmt: skip


def conversation_id(messages: Sequence[dict[str, str]]) -> str:
    """One string per conversation, equal exactly when the messages are (the identity `paired_by_prompt` uses)."""
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)


def win_rate(
    policy_scores: Sequence[float], baseline_scores: Sequence[float], tol: float = 0.0
) -> dict[str, Any]:
    """``{rate, lo, hi, wins, ties, losses, n}``: the policy's win rate (ties count half), 95% Wilson interval."""
    wins, ties, losses = win_counts(policy_scores, baseline_scores, tol)
    n = wins + ties + losses
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    return {"rate": score / n if n else float("nan"), "lo": lo, "hi": hi, "wins": wins, "ties": ties,
            "losses": losses, "n": n}  # fmt: skip


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL(pi || pi_ref) estimate from samples of pi: the sum over tokens of k1 = log pi - log pi_ref.

    logprobs, ref_logprobs, mask: (B, T); returns (B,). k1 summed over a sampled sequence is an unbiased
    estimate of the sequence-level KL (it can be negative for one sequence; its mean over many is not).
    """
    return masked_sum(kl_estimate(logprobs, ref_logprobs, "k1"), mask.to(torch.float32), dim=1)


@torch.no_grad()
def lm_loss(model: Any, rows: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, float]:
    """Token-weighted language-model loss of ``model`` on text rows: ``{loss, ppl, tokens}``.

    Every row of L tokens predicts its L - 1 next tokens; the loss is the mean negative log-likelihood over
    all predicted tokens of all rows (a long row weighs more than a short one), ppl = exp(loss). Rows of
    one batch are right-padded and masked, so the result does not depend on ``batch_size``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start : start + batch_size] if len(r) > 1]
        if not chunk:
            continue
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        logp = token_logprobs(logits, ids[:, 1:])
        target_mask = mask[:, 1:].to(torch.float32)
        total += float(-(logp * target_mask).sum())
        count += int(target_mask.sum())
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": math.exp(loss) if count else float("nan"), "tokens": count}


def tax_rows(
    tokenizer: Any, source: str = "embedded", max_rows: int = 64, length: int = 64
) -> list[list[int]]:
    """Held-out pre-training-style rows for the alignment tax: ``embedded`` = the held-out split of the
    standard-library docstrings (disjoint from the ptx training stream), or a user text file."""
    from align.ptx import chunk_tokens, load_text

    return chunk_tokens(load_text(source, split="heldout"), tokenizer, length)[:max_rows]


REPO_ROOT = Path(__file__).resolve().parents[2]  # align/evaluation/policy.py -> the repository


def portable_path(path: str | Path, out_dir: str | Path) -> str:
    """A path as a report records it, with no machine-specific prefix: relative to the repository root when
    it lies inside it (``outputs/sft/final``), else relative to ``out_dir``, the report's own directory,
    and then always starting with ``./`` or ``../``. A name that is not an existing path (a model alias such
    as ``smollm2-135m-instruct``) is kept as given."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    p = p.resolve()
    if p.is_relative_to(REPO_ROOT):
        return p.relative_to(REPO_ROOT).as_posix() or "."
    rel = Path(os.path.relpath(p, Path(out_dir).resolve())).as_posix()
    return rel if rel.startswith("..") else f"./{rel}"


def per_task_records(
    tasks: Sequence[Task], base: dict[str, Any], pol: dict[str, Any]
) -> list[dict[str, Any]]:
    """One record per evaluated task, enough to recompute the paired test: ``prompt`` (the final user turn),
    ``messages``, ``key``, ``kind``, ``answer``, both greedy responses and their gold verdicts, and with a
    reward model both scores. ``gained`` = count(policy_correct and not baseline_correct), ``lost`` the
    reverse; ``mcnemar_exact(gained, lost)`` is the report's p."""
    return [
        {
            "prompt": t.prompt,
            "messages": t.messages,
            "key": t.key,
            "kind": t.kind,
            "answer": t.answer,
            "baseline": base["texts"][i],
            "policy": pol["texts"][i],
            "baseline_correct": bool(base["gold"][i]),
            "policy_correct": bool(pol["gold"][i]),
            "baseline_rm": base["rm"][i] if base["rm"] is not None else None,
            "policy_rm": pol["rm"][i] if pol["rm"] is not None else None,
        }
        for i, t in enumerate(tasks)
    ]


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


def load_lm(path: str | Path, device: str) -> Any:
    """A causal LM for evaluation: float32, frozen, eval mode, on ``device`` (offline aliases resolved)."""
    from transformers import AutoModelForCausalLM

    from align.assets import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(path)), dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval().to(device)


def _greedy(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int,
            batch_size: int) -> RolloutBatch:  # fmt: skip
    engine = HFRolloutEngine(model, tokenizer, batch_size=batch_size, logprobs="none", show_progress=True)
    return engine.generate(prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0)


@torch.no_grad()
def _rm_scores(reward_model: Any, batch: RolloutBatch, batch_size: int) -> list[float]:
    """The reward model's score of every (prompt, response) row, read at its closing end token as in PPO
    (left-padded layout; an unclosed response gets the model's ``unclosed_reward``)."""
    device = next(reward_model.parameters()).device
    seq = batch.sequences(left_pad=True)
    scores: list[float] = []
    for start in range(0, len(batch), batch_size):
        ids = seq.input_ids[start : start + batch_size].to(device)
        mask = seq.attention_mask[start : start + batch_size].to(device)
        scores.extend(reward_model(ids, mask).rewards.float().tolist())
    return scores


def _cache_key(path: str | Path, extra: dict[str, Any]) -> str:
    """A key for a model directory's evaluation: its files' names, sizes and mtimes, plus the settings."""
    p = Path(path)
    files = sorted(
        (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()
    )
    blob = json.dumps([str(p.resolve()), files, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _side(
    model: Any,
    tokenizer: Any,
    tasks: list[Task],
    prompt_ids: list[list[int]],
    reward_model: Any,
    rows: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """One model's greedy responses, gold verdicts, RM scores and held-out LM loss."""
    batch = _greedy(model, tokenizer, prompt_ids, max_new_tokens, batch_size)
    texts = batch.texts(tokenizer)
    gold = [float(verify(t, r)) for t, r in zip(tasks, texts, strict=True)]
    return {
        "texts": texts,
        "gold": gold,
        "rm": _rm_scores(reward_model, batch, batch_size) if reward_model is not None else None,
        "lengths": batch.lengths.tolist(),
        "finished": batch.finished.tolist(),
        "lm": lm_loss(model, rows, batch_size=max(1, batch_size // 2)) if rows else None,
    }


def _tax(pol: dict[str, float] | None, base: dict[str, float] | None, acc_delta: float, text: str) -> dict:
    """The tax block of the result; the LM-loss numbers are None when no held-out text was scored."""
    lm = {
        "lm_loss_policy": pol["loss"] if pol else None,
        "lm_loss_baseline": base["loss"] if base else None,
        "ppl_policy": pol["ppl"] if pol else None,
        "ppl_baseline": base["ppl"] if base else None,
        "delta_lm_loss": pol["loss"] - base["loss"] if pol and base else None,
    }
    return {**lm, "accuracy_delta": acc_delta, "tokens": pol["tokens"] if pol else 0, "text": text}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def compare_policies(
    policy: str | Path,
    baseline: str | Path,
    *,
    reward_model: str | Path | None,
    out_dir: str | Path,
    num_prompts: int = 48,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    tax_text: str = "embedded",
    tax_max_rows: int = 64,
    device: str | None = None,
    prompts_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``policy`` against ``baseline`` on held-out prompts; write ``eval.json``, ``eval.md`` and
    ``per_task.jsonl`` (one line per task: `per_task_records`). Model paths in the result are recorded by
    `portable_path` (relative to the repository or to ``out_dir``).

    Prompts: ``num_prompts`` held-out tasks of ``align.tasks.generate_tasks(split="heldout", seed=seed)``
    (problems no embedded training stage saw), or the first ``num_prompts`` tasks of ``prompts_file``
    (a tasks JSONL from ``align.tasks.write_tasks_jsonl``). Both models answer greedily (see the module
    docstring); the KL uses one temperature-1 sample per prompt from the policy.

    Returns ``win_rate_rm`` (None without a reward model) and ``win_rate_gold``, each ``{rate, lo, hi, wins,
    ties, losses, n}`` (ties count half, 95% Wilson interval); ``gold_accuracy``, ``rm_score`` and
    ``response_length`` as ``{policy, baseline}``; ``kl_to_baseline`` (mean per-sequence k1 KL, nats);
    ``tax`` ``{lm_loss_policy, lm_loss_baseline, ppl_policy, ppl_baseline, delta_lm_loss, accuracy_delta}``
    on held-out text (``tax_text``: ``embedded`` = held-out standard-library docstrings, or a text file);
    plus ``samples`` and ``seconds``. ``cache_dir``: where the baseline's side (which does not change
    across the runs of a sweep) is cached, keyed by its files and these settings.
    """
    from align.models import load_tokenizer
    from align.reward import RewardModel

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if prompts_file is not None:
        from align.tasks import read_tasks_jsonl

        tasks = read_tasks_jsonl(prompts_file)[:num_prompts]
    else:
        tasks = generate_tasks(num_prompts, seed=seed, split="heldout")
    if not tasks:
        raise ValueError("no prompts to evaluate on (num_prompts must be >= 1)")

    from align.assets import resolve_model

    policy_dir, baseline_dir = resolve_model(str(policy)), resolve_model(str(baseline))
    tokenizer = load_tokenizer(policy_dir)
    # Loading a tokenizer is slow (a 151k vocabulary); the same directory needs no check.
    same_dir = Path(baseline_dir).resolve() == Path(policy_dir).resolve()
    if not same_dir and load_tokenizer(baseline_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{baseline} and {policy} use different tokenizers; the KL needs one vocabulary")
    rm = None
    if reward_model is not None:
        rm = RewardModel.from_pretrained(reward_model, dtype=torch.float32).eval().to(device)
        rm.requires_grad_(False)
    # The prompt the policy was trained on: the RM's (reward_config.json), else the chat template's own default.
    default_system = rm.config.default_system if rm is not None else chatml.TEMPLATE_SYSTEM
    prompt_ids = [chatml.encode_prompt(t.messages, tokenizer, default_system=default_system) for t in tasks]
    # tax_max_rows=0 skips the LM-loss part of the tax (eval/win_rate.py): its numbers come out as None.
    rows = tax_rows(tokenizer, tax_text, tax_max_rows) if tax_max_rows > 0 else []

    settings = {"tasks": [t.key for t in tasks], "reward_model": str(reward_model), "max_new_tokens": max_new_tokens,
                "tax_text": tax_text, "tax_rows": len(rows), "device": device}  # fmt: skip
    base_model = load_lm(baseline_dir, device)
    cache_file = None
    if cache_dir is not None:
        rm_key = _cache_key(reward_model, {}) if reward_model is not None else None
        key = _cache_key(baseline_dir, {**settings, "rm_files": rm_key})
        cache_file = Path(cache_dir) / f"baseline-{key}.json"
    if cache_file is not None and cache_file.is_file():
        base = json.loads(cache_file.read_text())
    else:
        base = _side(base_model, tokenizer, tasks, prompt_ids, rm, rows, max_new_tokens, batch_size)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: runs of a sweep evaluating at the same time never read half a file.
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(base))
            tmp.replace(cache_file)
    pol_model = load_lm(policy_dir, device)
    pol = _side(pol_model, tokenizer, tasks, prompt_ids, rm, rows, max_new_tokens, batch_size)

    # KL on the policy's own samples: both log-probs teacher-forced, so both come from the same code path.
    engine = HFRolloutEngine(pol_model, tokenizer, batch_size=batch_size, logprobs="none")
    sampled = engine.generate(prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    with torch.no_grad():
        lp_pol = teacher_forced_logprobs(pol_model, sampled, temperature=1.0)
        lp_base = teacher_forced_logprobs(base_model, sampled, temperature=1.0)
    kl = sequence_kl(lp_pol, lp_base, sampled.response_mask.to(lp_pol.device))

    acc_p, acc_b = _mean(pol["gold"]), _mean(base["gold"])
    # Paths relative to the repository or to out/: a committed report holds no machine paths.
    result: dict[str, Any] = {
        "policy": portable_path(policy, out),
        "baseline": portable_path(baseline, out),
        "reward_model": portable_path(reward_model, out) if reward_model is not None else None,
        "num_prompts": len(tasks),
        "win_rate_rm": win_rate(pol["rm"], base["rm"]) if rm is not None else None,
        "win_rate_gold": win_rate(pol["gold"], base["gold"]),
        "gold_accuracy": {"policy": acc_p, "baseline": acc_b},
        # Same tasks on both sides: the paired test (McNemar exact) and intervals, baseline = "before".
        "gold_paired": paired_accuracy([g > 0 for g in base["gold"]], [g > 0 for g in pol["gold"]]),
        "gold_paired_by_prompt": paired_by_prompt(
            [conversation_id(t.messages) for t in tasks],
            [g > 0 for g in base["gold"]],
            [g > 0 for g in pol["gold"]],
        ),
        "rm_score": {"policy": _mean(pol["rm"]), "baseline": _mean(base["rm"])} if rm is not None else None,
        "kl_to_baseline": float(kl.mean()),
        "kl_to_baseline_std": float(kl.std()) if len(kl) > 1 else 0.0,
        "response_length": {"policy": _mean(pol["lengths"]), "baseline": _mean(base["lengths"])},
        "unfinished": {"policy": 1 - _mean(pol["finished"]), "baseline": 1 - _mean(base["finished"])},
        "tax": _tax(pol["lm"], base["lm"], acc_p - acc_b, tax_text),
        "samples": [
            {
                "prompt": t.prompt,
                "answer": t.answer,
                "policy": pol["texts"][i],
                "baseline": base["texts"][i],
                "policy_rm": pol["rm"][i] if rm is not None else None,
                "baseline_rm": base["rm"][i] if rm is not None else None,
            }
            for i, t in enumerate(tasks[:8])
        ],  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(out, "eval", result, format_markdown(result))
    # Beside eval.json: every task's two answers and verdicts, so anyone can recompute the paired test.
    write_jsonl(out / "per_task.jsonl", per_task_records(tasks, base, pol))
    return result


# --------------------------------------------------------------------------------------------------------
# Command-line arguments shared by eval/policy.py, eval/win_rate.py and eval/alignment_tax.py
# --------------------------------------------------------------------------------------------------------


def add_cli_args(parser: Any, *, reward: bool = True) -> None:
    """The arguments every policy-evaluation command shares (eval/policy.py, win_rate.py, alignment_tax.py)."""
    parser.add_argument("--policy", required=True, help="the aligned model (a run's final/)")
    parser.add_argument(
        "--baseline", required=True, help="the model it started from (e.g. outputs/sft/final)"
    )
    if reward:
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--reward-model", help="a reward model directory (judge and RM score)")
        group.add_argument("--no-reward-model", action="store_true", help="judge with the gold verifier only")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the JSON and Markdown reports go")
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts (default 48)")
    parser.add_argument(
        "--prompts", default=None, metavar="FILE", help="a tasks JSONL instead of generated ones"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the held-out tasks and of the KL samples"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def check_cli_args(args: Any) -> str | None:
    """A one-line reason the arguments cannot work, or None."""
    for name in ("policy", "baseline", "reward_model", "prompts"):
        value = getattr(args, name, None)
        if value and not Path(value).exists() and value.lower() not in ("smollm2", "smollm2-135m-instruct"):
            return f"--{name.replace('_', '-')} {value}: no such file or directory"
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        return "--num-prompts, --max-new-tokens and --batch-size must be >= 1"
    return None


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_win_rate(w: dict[str, Any] | None) -> str:
    if w is None:
        return "-"
    return (f"{100 * w['rate']:.1f}% [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}] "
            f"({w['wins']} W / {w['ties']} T / {w['losses']} L of {w['n']})")  # fmt: skip


def format_markdown(r: dict[str, Any]) -> str:
    """The Markdown report of a ``compare_policies`` result."""
    tax = r["tax"]
    rm = r.get("rm_score")
    lines = [
        f"# {r['policy']} vs {r['baseline']}",
        "",
        f"{r['num_prompts']} held-out prompts, greedy responses; reward model: {r.get('reward_model') or '-'}. "
        "Win rates count ties as half; brackets are 95% Wilson intervals.",
        "",
        "| metric | policy | baseline |",
        "|---|---|---|",
        f"| gold accuracy | {100 * r['gold_accuracy']['policy']:.1f}% | {100 * r['gold_accuracy']['baseline']:.1f}% |",
        f"| mean RM score | {rm['policy']:.3f} | {rm['baseline']:.3f} |" if rm else "| mean RM score | - | - |",
        f"| response length (tokens) | {r['response_length']['policy']:.1f} | {r['response_length']['baseline']:.1f} |",
        f"| held-out LM loss | {_num(tax['lm_loss_policy'], '.4f')} | {_num(tax['lm_loss_baseline'], '.4f')} |",
        f"| held-out perplexity | {_num(tax['ppl_policy'], '.2f')} | {_num(tax['ppl_baseline'], '.2f')} |",
        "",
        f"- win rate, reward model: {format_win_rate(r.get('win_rate_rm'))}",
        f"- win rate, gold verifier: {format_win_rate(r['win_rate_gold'])}",
        f"- KL(policy || baseline), mean over sampled responses: {r['kl_to_baseline']:.4f} nats",
        f"- alignment tax: LM loss {_num(tax['delta_lm_loss'], '+.4f')} nats/token on {tax['tokens']} held-out tokens "
        f"({tax['text']}), accuracy {100 * tax['accuracy_delta']:+.1f} points",
        "",
        "## Samples",
        "",
        "| prompt | answer | policy | baseline |",
        "|---|---|---|---|",
    ]  # fmt: skip

    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")[:80]

    for s in r.get("samples", []):
        lines.append(
            f"| {cell(s['prompt'])} | {cell(s['answer'])} | {cell(s['policy'])} | {cell(s['baseline'])} |"
        )
    t = r.get("gold_paired")
    if t:
        lines += ["", f"Gold accuracy, paired over {t['n']} tasks: baseline {t['before']:.1%} "
                  f"[{t['before_lo']:.1%}, {t['before_hi']:.1%}] -> policy {t['after']:.1%} "
                  f"[{t['after_lo']:.1%}, {t['after_hi']:.1%}]; change {t['delta']:+.1%} "
                  f"[{t['delta_lo']:+.1%}, {t['delta_hi']:+.1%}] ({t['gained']} gained, {t['lost']} lost), "
                  f"McNemar exact p = {t['p_mcnemar']:.3g}."]  # fmt: skip
    u = r.get("gold_paired_by_prompt")
    if t and u and u["repeats"]:
        lines += ["", f"The {t['n']} tasks ask {u['n']} distinct prompts ({u['repeats']} repeats). Each prompt "
                  f"counted once: {u['gained']} gained, {u['lost']} lost, McNemar exact p = {u['p_mcnemar']:.3g}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, stem: str, result: dict[str, Any], markdown: str) -> Path:
    """Write ``<stem>.json`` (the result) and ``<stem>.md`` (its report) into ``out``, created if missing;
    returns the Markdown file's path. One layout for eval/policy.py, win_rate.py and alignment_tax.py."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out / f"{stem}.md"
