"""Several training arms, each run over several seeds, read back from their evaluation records and put in
one table with a pooled paired test.

A record is one directory per (arm, seed): ``<root>/<arm>/seed-<N>/`` holding what ``eval/policy.py``
wrote (``eval.json``, ``per_task.jsonl``) and, optionally, ``run.json`` (``train_seconds``, ``command``).
Each seed's gold change is recomputed from ``per_task.jsonl`` and must agree with ``eval.json``, so a
table can never show a figure its records do not support.

Pooling follows issue 21's rule: the seeds of an arm share the held-out tasks and the starting model, so
their discordant counts are summed (gained over all seeds, lost over all seeds) and one exact McNemar test
is taken on the sums. This treats each (seed, task) as a separate trial, which is what "does this arm
raise accuracy on these tasks" asks; it says nothing about other task sets.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.data.sources import iter_jsonl_values
from align.evaluation.policy import conversation_id, mcnemar_exact, paired_accuracy, paired_by_prompt

__all__ = ["SeedRecord", "load_seed_record", "load_arms", "pool_arm", "arms_markdown", "plot_arms"]

SEED_DIR = re.compile(r"^seed-(\d+)$")


@dataclasses.dataclass(frozen=True)
class SeedRecord:
    """One seed of one arm: gold accuracy before/after on the same tasks and what the run cost."""

    arm: str
    seed: int
    n: int
    before: float
    after: float
    gained: int
    lost: int
    p_mcnemar: float
    by_prompt: dict[str, Any]  # the paired test with each distinct prompt once (`paired_by_prompt`)
    kl: float | None
    unfinished: float | None
    rm_before: float | None
    rm_after: float | None
    train_seconds: float | None
    task_keys: tuple[str, ...]
    baseline_correct: tuple[bool, ...]

    @property
    def delta(self) -> float:
        return (self.gained - self.lost) / self.n


def load_seed_record(seed_dir: str | Path, arm: str | None = None) -> SeedRecord:
    """Read ``seed_dir`` (``.../<arm>/seed-<N>``). Raises ValueError when ``eval.json`` and
    ``per_task.jsonl`` disagree on the paired counts, or a file is missing."""
    seed_dir = Path(seed_dir)
    match = SEED_DIR.match(seed_dir.name)
    if match is None:
        raise ValueError(f"{seed_dir}: a record directory is named seed-<N>")
    for name in ("eval.json", "per_task.jsonl"):
        if not (seed_dir / name).is_file():
            raise ValueError(f"{seed_dir}: no {name}")
    result = json.loads((seed_dir / "eval.json").read_text())
    tasks = [value for _, value in iter_jsonl_values(seed_dir / "per_task.jsonl")]
    before = [bool(t["baseline_correct"]) for t in tasks]
    after = [bool(t["policy_correct"]) for t in tasks]
    recomputed = paired_accuracy(before, after)
    # Older records lack `messages`; key plus final turn then names the prompt.
    prompt_ids = [conversation_id(t["messages"]) if "messages" in t else f"{t.get('key')}\x1f{t['prompt']}"
                  for t in tasks]  # fmt: skip
    gained, lost = recomputed["gained"], recomputed["lost"]
    paired = result["gold_paired"]
    if (paired["n"], paired["gained"], paired["lost"]) != (len(tasks), gained, lost):
        raise ValueError(
            f"{seed_dir}: eval.json says n={paired['n']} gained={paired['gained']} lost={paired['lost']}, "
            f"per_task.jsonl gives n={len(tasks)} gained={gained} lost={lost}"
        )
    run = json.loads((seed_dir / "run.json").read_text()) if (seed_dir / "run.json").is_file() else {}
    rm = result.get("rm_score") or {}
    unfinished = result.get("unfinished") or {}
    return SeedRecord(
        arm=arm or seed_dir.parent.name,
        seed=int(match.group(1)),
        n=len(tasks),
        before=recomputed["before"],
        after=recomputed["after"],
        gained=gained,
        lost=lost,
        p_mcnemar=recomputed["p_mcnemar"],
        by_prompt=paired_by_prompt(prompt_ids, before, after),
        kl=result.get("kl_to_baseline"),
        unfinished=unfinished.get("policy"),
        rm_before=rm.get("baseline"),
        rm_after=rm.get("policy"),
        train_seconds=run.get("train_seconds"),
        task_keys=tuple(str(t.get("key", t["prompt"])) for t in tasks),
        baseline_correct=tuple(before),
    )


def load_arms(root: str | Path, arms: Sequence[str]) -> dict[str, list[SeedRecord]]:
    """Every ``<root>/<arm>/seed-<N>`` record of the named arms, seeds in order; an arm with no record
    maps to an empty list (it is shown as not run)."""
    root = Path(root)
    out: dict[str, list[SeedRecord]] = {}
    for arm in arms:
        dirs = [d for d in (root / arm).glob("seed-*") if d.is_dir() and SEED_DIR.match(d.name)]
        records = [load_seed_record(d, arm) for d in dirs]
        out[arm] = sorted(records, key=lambda r: r.seed)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pool_arm(records: Sequence[SeedRecord]) -> dict[str, Any]:
    """An arm's seeds pooled: mean and smallest change, summed gained/lost with their exact McNemar p,
    and the means of KL, unfinished share, RM score and training time. The seeds must share the tasks and
    the baseline's verdicts (the same start, evaluated the same way); otherwise pooling is refused."""
    if not records:
        raise ValueError("pool_arm: no records")
    first = records[0]
    for rec in records[1:]:
        if rec.task_keys != first.task_keys or rec.baseline_correct != first.baseline_correct:
            raise ValueError(
                f"{rec.arm} seed {rec.seed}: its tasks or baseline verdicts differ from seed {first.seed}'s; "
                "seeds are pooled only over the same tasks from the same start"
            )
    gained = sum(r.gained for r in records)
    lost = sum(r.lost for r in records)
    gained_by_prompt = sum(r.by_prompt["gained"] for r in records)
    lost_by_prompt = sum(r.by_prompt["lost"] for r in records)
    deltas = [r.delta for r in records]
    return {
        "arm": first.arm,
        "seeds": [r.seed for r in records],
        "n": first.n,
        "before": first.before,
        "after_mean": sum(r.after for r in records) / len(records),
        "delta_mean": sum(deltas) / len(deltas),
        "delta_min": min(deltas),
        "gained": gained,
        "lost": lost,
        "p_pooled": mcnemar_exact(gained, lost),
        # The same pooling with each distinct prompt counted once per seed (repeats add no evidence).
        "n_prompts": first.by_prompt["n"],
        "gained_by_prompt": gained_by_prompt,
        "lost_by_prompt": lost_by_prompt,
        "p_pooled_by_prompt": mcnemar_exact(gained_by_prompt, lost_by_prompt),
        "kl_mean": _mean([r.kl for r in records]),
        "unfinished_mean": _mean([r.unfinished for r in records]),
        "rm_before": first.rm_before,
        "rm_after_mean": _mean([r.rm_after for r in records]),
        "train_seconds_mean": _mean([r.train_seconds for r in records]),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _minutes(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f}"


def _by_prompt(t: dict[str, Any]) -> str:
    return f"{t['p_mcnemar']:.3g} ({t['gained']} / {t['lost']} of {t['n']})"


def arms_markdown(arms: dict[str, list[SeedRecord]]) -> str:
    """One table: a row per seed and a pooled row per arm (mean change, summed gained/lost, pooled p)."""
    lines = [
        "| arm | seed | gold before | gold after | change (points) | gained / lost | p (exact McNemar) "
        "| p, each distinct prompt once | RM score before -> after | KL (nats) | unclosed | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, records in arms.items():
        if not records:
            lines.append(f"| {arm} | not run | | | | | | | | | | |")
            continue
        for r in records:
            lines.append(
                f"| {arm} | {r.seed} | {_pct(r.before)} | {_pct(r.after)} | {_pts(r.delta)} | "
                f"{r.gained} / {r.lost} | {r.p_mcnemar:.3g} | {_by_prompt(r.by_prompt)} | "
                f"{_num(r.rm_before)} -> {_num(r.rm_after)} | "
                f"{_num(r.kl, '.3f')} | {_pct(r.unfinished)} | {_minutes(r.train_seconds)} |"
            )
        if len(records) > 1:
            p = pool_arm(records)
            lines.append(
                f"| **{arm}** | **mean of {len(records)}** | {_pct(p['before'])} | {_pct(p['after_mean'])} | "
                f"**{_pts(p['delta_mean'])}** (min {_pts(p['delta_min'])}) | {p['gained']} / {p['lost']} | "
                f"**{p['p_pooled']:.3g}** (pooled) | {p['p_pooled_by_prompt']:.3g} "
                f"({p['gained_by_prompt']} / {p['lost_by_prompt']} of {p['n_prompts']}) | "
                f"{_num(p['rm_before'])} -> {_num(p['rm_after_mean'])} | "
                f"{_num(p['kl_mean'], '.3f')} | {_pct(p['unfinished_mean'])} | "
                f"{_minutes(p['train_seconds_mean'])} |"
            )
    return "\n".join(lines) + "\n"


def plot_arms(arms: dict[str, list[SeedRecord]], path: str | Path) -> Path:
    """Gold-accuracy change per seed (dots) and the arm's mean (bar), in points, a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a for a, recs in arms.items() if recs]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(names)), 4.2))
    for i, arm in enumerate(names):
        deltas = [100 * r.delta for r in arms[arm]]
        ax.bar(i, sum(deltas) / len(deltas), color="tab:blue", alpha=0.35, width=0.6)
        ax.scatter([i] * len(deltas), deltas, color="tab:blue", zorder=3)
        for r, d in zip(arms[arm], deltas, strict=True):
            ax.annotate(f"s{r.seed}", (i, d), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.axhline(0.0, color="black", linewidth=1)
    # Slanted: eleven arm names set flat ran into each other.
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("gold accuracy change (points)")
    n = next((recs[0].n for recs in arms.values() if recs), 0)
    ax.set_title(f"change against the start on {n} held-out tasks: each seed and the mean", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
