"""The best-of-n gate: is a reward model worth optimising against? Measured in minutes, before any PPO.

On held-out tasks, ``n`` responses per prompt are sampled from the policy and scored by the reward model;
the gold verifier then says how often the RM's favourite is right. Reported, each with a 95% Wilson
interval and its mean RM score:

* greedy: the policy's temperature-0 answer;
* mean sample: the expected accuracy of one random sample (per prompt, the share of its n samples that are
  correct, averaged over prompts);
* best-of-k by the RM, k = 1, 2, 4, ..., n: per prompt the highest-scoring of the *first k* samples (the
  first on ties), so every k reads the same n samples and best-of-1 is simply the first sample;
* any-correct-of-k (oracle, pass@k): the ceiling a perfect reward model would reach with k samples;
* per task kind, greedy, the mean sample and best-of-n, and whether best-of-n reaches greedy there.

Every response is scored as eval/policy.py scores it: read at its closing end token, and a response that never
closed gets the RM's ``unclosed_reward`` (so best-of-n passes over unfinished replies where it can).

An RM whose best-of-n does not beat the mean sample cannot teach the policy more gold accuracy than the
samples already carry; one that does bounds what RL with it can reach at that KL (best-of-n's KL to the
policy is at most log n - (n - 1) / n nats).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import chatml
from align.evaluation.policy import REPO_ROOT, Z95, portable_path, wilson_interval
from align.tasks import Task, generate_tasks, verify, write_jsonl

# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def best_of_k(scores: Sequence[Sequence[float]], k: int) -> list[int]:
    """Per prompt, the index of the sample best-of-k picks: the highest score among the first k samples,
    the earliest on ties."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    picks = []
    for row in scores:
        if len(row) < k:
            raise ValueError(f"best-of-{k} needs {k} samples per prompt, a prompt has {len(row)}")
        first = list(row[:k])
        picks.append(first.index(max(first)))
    return picks


def ks_up_to(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, then n (8 -> [1, 2, 4, 8]; 6 -> [1, 2, 4, 6])."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _rate(successes: float, n: int) -> dict[str, float]:
    lo, hi = wilson_interval(successes, n)
    return {"accuracy": successes / n if n else float("nan"), "lo": lo, "hi": hi}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def best_of_n_table(
    scores: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    greedy_correct: Sequence[bool] | None = None,
    greedy_scores: Sequence[float] | None = None,
    z: float = Z95,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Gold accuracy and mean RM score of greedy, the mean sample and best-of-k (k from `ks_up_to(n)`), and
    any-correct-of-k, from per-prompt sample scores and verdicts (n samples each); with each prompt's task
    kind (and greedy verdicts), also ``by_kind`` (`best_of_n_by_kind`).

    The mean sample's interval is Wilson's with the summed per-prompt shares as successes over the prompts
    (a share varies less than one Bernoulli draw, so it is conservative). ``gain`` is best-of-n minus the mean
    sample in accuracy points, with a paired normal interval over the per-prompt differences
    d = correct(best-of-n pick) - share correct (the two read the same samples).
    """
    if len(scores) != len(correct) or any(len(s) != len(c) for s, c in zip(scores, correct, strict=True)):
        raise ValueError("scores and correct must have the same shape (prompts x samples)")
    prompts = len(scores)
    n = len(scores[0]) if prompts else 0
    if prompts == 0 or n == 0 or any(len(s) != n for s in scores):
        raise ValueError("need at least one prompt and the same number (>= 1) of samples for each")
    shares = [sum(map(bool, c)) / n for c in correct]
    result: dict[str, Any] = {"prompts": prompts, "n": n}
    if greedy_correct is not None:
        result["greedy"] = {
            **_rate(sum(map(bool, greedy_correct)), prompts),
            "rm_score": _mean(greedy_scores) if greedy_scores is not None else None,
        }
    result["mean_sample"] = {
        **_rate(sum(shares), prompts),
        "rm_score": _mean([x for s in scores for x in s]),
    }
    best, oracle = {}, {}
    for k in ks_up_to(n):
        picks = best_of_k(scores, k)
        hits = [bool(c[p]) for c, p in zip(correct, picks, strict=True)]
        best[str(k)] = {
            **_rate(sum(hits), prompts),
            "rm_score": _mean([s[p] for s, p in zip(scores, picks, strict=True)]),
        }
        oracle[str(k)] = _rate(sum(any(map(bool, c[:k])) for c in correct), prompts)
    result["best_of"], result["any_correct_of"] = best, oracle
    top = best_of_k(scores, n)
    diffs = [float(bool(c[p])) - share for c, p, share in zip(correct, top, shares, strict=True)]
    mean = _mean(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (prompts - 1)) if prompts > 1 else 0.0
    half = z * sd / math.sqrt(prompts)
    result["gain"] = {"k": n, "points": 100 * mean, "lo": 100 * (mean - half), "hi": 100 * (mean + half)}
    if kinds is not None and greedy_correct is not None:
        result["by_kind"] = best_of_n_by_kind(kinds, scores, correct, greedy_correct)
    return result


def kind_of(record: dict[str, Any]) -> str:
    """A gate record's task kind: its ``kind``, or (records written before kinds were) its key's prefix."""
    return record.get("kind") or str(record["key"]).split(":", 1)[0]


def best_of_n_by_kind(
    kinds: Sequence[str],
    scores: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    greedy_correct: Sequence[bool],
) -> dict[str, dict[str, Any]]:
    """Per task kind (in order of first appearance): prompts, and the gold accuracy of greedy, the mean
    sample and best-of-n by the RM (n = all samples), with ``rm_reaches_greedy`` = best-of-n >= greedy.

    A kind where the RM's favourite of n samples is right less often than the greedy answer is one where
    optimising against the RM moves the policy's answer away from gold: the query kinds worth RL with this
    RM are those where it reaches greedy (docs/rlhf-embedded/ppo-kind-gate/)."""
    if not (len(kinds) == len(scores) == len(correct) == len(greedy_correct)):
        raise ValueError("kinds, scores, correct and greedy_correct need one entry per prompt")
    rows: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        rows.setdefault(kind, []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for kind, idx in rows.items():
        t = best_of_n_table(
            [scores[i] for i in idx], [correct[i] for i in idx], [greedy_correct[i] for i in idx]
        )
        greedy, best = t["greedy"]["accuracy"], t["best_of"][str(t["n"])]["accuracy"]
        out[kind] = {
            "prompts": t["prompts"],
            "greedy": greedy,
            "mean_sample": t["mean_sample"]["accuracy"],
            "best_of_n": best,
            "rm_reaches_greedy": best >= greedy,
        }
    return out


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def format_markdown(r: dict[str, Any]) -> str:
    """The Markdown report of a `best_of_n_eval` result."""

    def row(name: str, x: dict[str, Any] | None) -> str:
        if x is None:
            return f"| {name} | - | - | - |"
        rm = x.get("rm_score")
        return (
            f"| {name} | {100 * x['accuracy']:.1f}% | [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}] | "
            f"{'-' if rm is None else format(rm, '.3f')} |"
        )

    g = r["gain"]
    lines = [
        f"# Best-of-n gate: {r['policy']} judged by {r['reward_model']}",
        "",
        f"{r['prompts']} held-out prompts, {r['n']} samples each (temperature {r['temperature']}, top-p "
        f"{r['top_p']}, {r['max_new_tokens']} new tokens); gold verifier accuracy with 95% Wilson intervals. "
        "Best-of-k takes the RM's favourite of the first k samples.",
        "",
        "| selection | gold accuracy | 95% CI | mean RM score |",
        "|---|---|---|---|",
        row("greedy", r.get("greedy")),
        row("mean sample", r["mean_sample"]),
        *(row(f"best-of-{k} by RM", x) for k, x in r["best_of"].items()),
        *(row(f"any correct of {k} (oracle)", x) for k, x in r["any_correct_of"].items()),
        "",
        f"Best-of-{g['k']} vs the mean sample: {g['points']:+.1f} points [{g['lo']:+.1f}, {g['hi']:+.1f}] "
        "(paired over prompts).",
    ]
    if r.get("by_kind"):
        lines += [
            "",
            f"Per kind: where best-of-{r['n']} by the RM does not reach greedy, optimising against the RM moves "
            "the answer away from gold.",
            "",
            f"| kind | prompts | greedy | mean sample | best-of-{r['n']} by RM | RM reaches greedy |",
            "|---|---|---|---|---|---|",
            *(
                f"| {kind} | {x['prompts']} | {100 * x['greedy']:.1f}% | {100 * x['mean_sample']:.1f}% | "
                f"{100 * x['best_of_n']:.1f}% | {'yes' if x['rm_reaches_greedy'] else 'no'} |"
                for kind, x in r["by_kind"].items()
            ),
        ]
    return "\n".join(lines) + "\n"


def plot_best_of_n(r: dict[str, Any], path: str | Path) -> Path:
    """Gold accuracy against n: best-of-n by the RM (Wilson bars), the oracle, the mean sample and greedy."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    ks = [int(k) for k in r["best_of"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    acc = [100 * x["accuracy"] for x in r["best_of"].values()]
    err = [
        [100 * (x["accuracy"] - x["lo"]) for x in r["best_of"].values()],
        [100 * (x["hi"] - x["accuracy"]) for x in r["best_of"].values()],
    ]
    ax.errorbar(ks, acc, yerr=err, marker="o", capsize=3, label="best-of-n by the RM")
    ax.plot(
        ks,
        [100 * x["accuracy"] for x in r["any_correct_of"].values()],
        "--",
        marker=".",
        label="any correct (oracle)",
    )
    mean = r["mean_sample"]
    ax.axhline(100 * mean["accuracy"], color="grey", label="mean sample")
    ax.axhspan(100 * mean["lo"], 100 * mean["hi"], color="grey", alpha=0.15)
    if r.get("greedy"):
        ax.axhline(100 * r["greedy"]["accuracy"], color="black", linestyle=":", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("n (samples per prompt)")
    ax.set_ylabel("gold accuracy (%)")
    ax.set_title(f"Best-of-n on {r['prompts']} held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# On models
# --------------------------------------------------------------------------------------------------------


def best_of_n_eval(
    policy: str | Path,
    reward_model: str | Path,
    *,
    out_dir: str | Path,
    num_prompts: int = 200,
    n: int = 8,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    device: str | None = None,
    prompts_file: str | Path | None = None,
) -> dict[str, Any]:
    """Sample ``n`` responses per held-out task from ``policy`` (plus one greedy), score them with the reward
    model, verify them; write ``best_of_n.json``, ``best_of_n.md``, ``best_of_n.png`` and ``samples.jsonl``
    (per prompt: its messages, the greedy answer and every sample with its verdict, score and token ids, so
    `rescore_best_of_n` can judge the same samples with another RM) into ``out_dir``.

    Prompts: ``generate_tasks(num_prompts, seed, split="heldout")`` (eval/policy.py's held-out tasks), or
    the first ``num_prompts`` of a tasks JSONL. The prompts carry the system prompt the RM was trained with.
    """
    from align.assets import resolve_model
    from align.evaluation.policy import load_lm
    from align.models import load_tokenizer
    from align.reward import RewardModel
    from align.rollout.batch import HFRolloutEngine
    from align.train.rl_common import check_same_vocabulary, score_rollouts

    t0 = time.perf_counter()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if prompts_file is not None:
        from align.tasks import read_tasks_jsonl

        tasks: list[Task] = read_tasks_jsonl(prompts_file)[:num_prompts]
    else:
        tasks = generate_tasks(num_prompts, seed=seed, split="heldout")
    if not tasks:
        raise ValueError("no prompts to evaluate on (num_prompts must be >= 1)")
    policy_dir = resolve_model(str(policy))
    tokenizer = load_tokenizer(policy_dir)
    check_same_vocabulary(tokenizer, str(reward_model))
    rm = RewardModel.from_pretrained(reward_model, dtype=torch.float32).eval().to(device)
    rm.requires_grad_(False)
    prompt_ids = [
        chatml.encode_prompt(t.messages, tokenizer, default_system=rm.config.default_system) for t in tasks
    ]
    model = load_lm(policy_dir, device)
    engine = HFRolloutEngine(model, tokenizer, batch_size=batch_size, logprobs="none", show_progress=True)

    def scored(batch: Any) -> tuple[list[str], list[float]]:
        texts = batch.texts(tokenizer)
        raw, _, _ = score_rollouts(batch, texts, reward_model=rm, micro_batch_size=batch_size)
        return texts, raw.tolist()

    greedy = engine.generate(prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    greedy_texts, greedy_scores = scored(greedy)
    greedy_finished, greedy_ids = greedy.finished.tolist(), greedy.responses()
    sampled = engine.generate(
        prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    texts, flat_scores = scored(sampled)
    finished, sample_ids = sampled.finished.tolist(), sampled.responses()
    rows = [range(i * n, (i + 1) * n) for i in range(len(tasks))]  # prompt i's samples: rows i*n .. i*n+n-1
    scores = [[flat_scores[j] for j in r] for r in rows]
    correct = [[verify(t, texts[j]) for j in r] for t, r in zip(tasks, rows, strict=True)]
    greedy_correct = [verify(t, g) for t, g in zip(tasks, greedy_texts, strict=True)]
    table = best_of_n_table(scores, correct, greedy_correct, greedy_scores, kinds=[t.kind for t in tasks])
    result = {
        "policy": portable_path(policy, out),
        "reward_model": portable_path(reward_model, out),
        **table,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "unclosed_share": 1 - sum(finished) / len(finished),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_reports(result, out)
    write_jsonl(
        out / "samples.jsonl",
        (
            {
                "prompt": t.prompt,
                "messages": t.messages,
                "key": t.key,
                "kind": t.kind,
                "answer": t.answer,
                "greedy": greedy_texts[i],
                "greedy_correct": greedy_correct[i],
                "greedy_score": greedy_scores[i],
                "greedy_finished": greedy_finished[i],
                "greedy_ids": greedy_ids[i],
                "samples": [texts[j] for j in rows[i]],
                "correct": correct[i],
                "scores": scores[i],
                "finished": [finished[j] for j in rows[i]],
                "sample_ids": [sample_ids[j] for j in rows[i]],
            }  # fmt: skip
            for i, t in enumerate(tasks)
        ),
    )
    return result


def _write_reports(result: dict[str, Any], out: Path) -> None:
    (out / "best_of_n.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "best_of_n.md").write_text(format_markdown(result))
    plot_best_of_n(result, out / "best_of_n.png")


def _recorded_path(recorded: str, report_dir: Path) -> str | Path:
    """A path as `portable_path` recorded it in a report in `report_dir`, usable from here."""
    if recorded.startswith(("./", "../")):
        return report_dir / recorded
    return REPO_ROOT / recorded if (REPO_ROOT / recorded).exists() else recorded


def _moved_record(recorded: str, report_dir: Path, out: Path) -> str:
    """A path recorded in a report in `report_dir`, as a report in `out` records it (relative to `out`
    when it was relative to its report, even if nothing is there any more)."""
    path = _recorded_path(recorded, report_dir)
    if isinstance(path, Path) and not path.exists():
        rel = Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
        return rel if rel.startswith("..") else f"./{rel}"
    return portable_path(path, out)


def _same_vocabulary(policy: str | Path, tokenizer: Any) -> bool:
    """Whether the tokenizer at `policy` exists and has `tokenizer`'s vocabulary (the recorded ids then mean
    the same tokens to the RM): the check PPO makes of its four models, as a yes or no."""
    from align.assets import AssetError, resolve_model
    from align.train.process import RunSetupError
    from align.train.rl_common import check_same_vocabulary

    try:
        policy = resolve_model(str(policy))  # a model alias (smollm2-135m-instruct) too
    except AssetError:
        return False
    if not (Path(policy) / "tokenizer_config.json").is_file():
        return False
    try:
        check_same_vocabulary(tokenizer, policy)
    except RunSetupError:
        return False
    return True


def rescore_best_of_n(
    gate_dir: str | Path,
    reward_model: str | Path,
    *,
    out_dir: str | Path,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """Judge an earlier gate's samples (``gate_dir``: its best_of_n.json and samples.jsonl) with another
    reward model: the same prompts, samples and gold verdicts, new scores, so two RMs are compared on
    identical samples (paired) in the time scoring takes, not sampling's. Writes the same four files into
    ``out_dir`` (samples.jsonl with the new scores); ``rescored_from`` names the gate.

    Each response is scored from its recorded token ids when the policy's tokenizer (found at the gate's
    recorded path) has the RM's vocabulary. Otherwise (a gate written before the ids were recorded, a
    policy no longer on disk, an RM with another vocabulary) the text is re-encoded by the RM's tokenizer
    (plus ``<|im_end|>`` where the sample closed; an old gate's greedy answer counts as closed), and
    ``response_ids`` says ``re-encoded``: a re-tokenised text can differ from the sampled ids, so scores by
    the gate's own RM can differ slightly from the gate's. Its prompts without ``messages`` are rebuilt from the
    gate's seed (``generate_tasks(prompts, seed, split="heldout")``) and must match the recorded keys.
    """
    from tqdm.auto import tqdm

    from align.data.sources import iter_jsonl_values
    from align.models import load_tokenizer
    from align.reward import RewardModel
    from align.rollout.batch import RolloutBatch
    from align.train.rl_common import score_rollouts

    t0 = time.perf_counter()
    gate = Path(gate_dir)
    for name in ("best_of_n.json", "samples.jsonl"):
        if not (gate / name).is_file():
            raise ValueError(f"{gate}: no {name} (not a best-of-n gate's output directory)")
    meta = json.loads((gate / "best_of_n.json").read_text())
    records = [record for _, record in iter_jsonl_values(gate / "samples.jsonl")]
    if not records:
        raise ValueError(f"{gate / 'samples.jsonl'}: no samples")
    if any("messages" not in r for r in records):
        tasks = generate_tasks(len(records), seed=meta["seed"], split="heldout")
        if [t.key for t in tasks] != [r["key"] for r in records]:
            raise ValueError(
                f"{gate / 'samples.jsonl'} records no messages and its keys are not the held-out tasks of "
                f"seed {meta['seed']} (a --prompts gate written before messages were recorded): rerun the gate"
            )
        for r, t in zip(records, tasks, strict=True):
            r.setdefault("messages", t.messages)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(str(reward_model))
    rm = RewardModel.from_pretrained(reward_model, dtype=torch.float32).eval().to(device)
    rm.requires_grad_(False)
    _, im_end = chatml.chatml_token_ids(tokenizer)
    stored = all("sample_ids" in r and "greedy_ids" in r for r in records) and _same_vocabulary(
        _recorded_path(meta["policy"], gate), tokenizer
    )

    def encoded(text: str, closed: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + ([im_end] if closed else [])

    prompts, responses, finished = [], [], []
    for r in records:
        prompt = chatml.encode_prompt(r["messages"], tokenizer, default_system=rm.config.default_system)
        closed = [r.get("greedy_finished", True), *r["finished"]]
        ids = [r["greedy_ids"], *r["sample_ids"]] if stored else [
            encoded(text, c) for text, c in zip([r["greedy"], *r["samples"]], closed, strict=True)
        ]  # fmt: skip
        prompts += [prompt] * len(ids)
        responses += ids
        finished += closed
    flat: list[float] = []
    for start in tqdm(range(0, len(responses), batch_size), desc="rescore", unit="batch"):
        rows = slice(start, start + batch_size)
        batch = RolloutBatch.from_responses(
            prompts[rows], responses[rows], finished[rows], tokenizer.pad_token_id or 0
        )
        raw, _, _ = score_rollouts(
            batch.to(device), [""] * len(batch), reward_model=rm, micro_batch_size=batch_size
        )
        flat += raw.tolist()
    start = 0
    for r in records:  # each record's rows: its greedy answer, then its samples
        r["greedy_score"], r["scores"] = flat[start], flat[start + 1 : start + 1 + len(r["samples"])]
        start += 1 + len(r["samples"])
    table = best_of_n_table(
        [r["scores"] for r in records],
        [r["correct"] for r in records],
        [r["greedy_correct"] for r in records],
        [r["greedy_score"] for r in records],
        kinds=[kind_of(r) for r in records],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "policy": _moved_record(meta["policy"], gate, out),
        "reward_model": portable_path(reward_model, out),
        **table,
        **{k: meta[k] for k in ("temperature", "top_p", "max_new_tokens", "seed", "unclosed_share")},
        "rescored_from": portable_path(gate, out),
        "response_ids": "stored" if stored else "re-encoded",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_reports(result, out)
    write_jsonl(out / "samples.jsonl", records)
    return result
