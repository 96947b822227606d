"""Where an optimised policy's answers went, and what the reward model rewards among them.

`answer_moves` reads one evaluation record (``per_task.jsonl`` of eval/policy.py) and counts the greedy
answers that changed: gained (wrong -> right), lost (right -> wrong) and wrong -> wrong, with how often the
judging RM scored a wrong -> wrong move higher. `score_landscape` reads a best-of-n gate's samples
(``samples.jsonl`` of eval/best_of_n.py) and says how far the RM's scores spread among one prompt's
distinct wrong answers against how far the right answer leads the best wrong one: a reward that varies
most among wrong answers pays a policy for better-looking wrong answers (docs/rlhf-embedded/ppo-kind-gate/).
`right_by_kind` says in which task kinds a record's gains and losses fall.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def answer_moves(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts over per-task rows (``baseline``, ``policy``, ``baseline_correct``, ``policy_correct``,
    ``baseline_rm``, ``policy_rm``): tasks, changed answers, gained, lost, wrong -> wrong, its share of the
    changes, and among wrong -> wrong moves how many the RM scored higher and the mean score change."""
    changed = [r for r in rows if r["policy"] != r["baseline"]]
    wrong = [r for r in changed if not r["baseline_correct"] and not r["policy_correct"]]
    deltas = [r["policy_rm"] - r["baseline_rm"] for r in wrong]
    return {
        "tasks": len(rows),
        "changed": len(changed),
        "gained": sum(bool(r["policy_correct"]) and not r["baseline_correct"] for r in changed),
        "lost": sum(bool(r["baseline_correct"]) and not r["policy_correct"] for r in changed),
        "wrong_to_wrong": len(wrong),
        "wrong_to_wrong_share": len(wrong) / len(changed) if changed else float("nan"),
        "wrong_to_wrong_rm_up": sum(d > 0 for d in deltas),
        "wrong_to_wrong_rm_change": statistics.fmean(deltas) if deltas else float("nan"),
    }


def right_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per task kind (``kind`` of each per-task row), sorted by name: tasks, right before (``baseline_correct``)
    and right after (``policy_correct``)."""
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = table.setdefault(r["kind"], {"tasks": 0, "before": 0, "after": 0})
        counts["tasks"] += 1
        counts["before"] += bool(r["baseline_correct"])
        counts["after"] += bool(r["policy_correct"])
    return dict(sorted(table.items()))


def score_landscape(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over gate rows (``samples``, ``correct``, ``scores``, ``finished``), closed samples only (an unclosed
    one gets the RM's placeholder, not a judgement): per prompt with >= 2 distinct wrong answers the range
    of their scores; per prompt with a right and a wrong answer the lead of the mean right score over the
    best wrong one. Returns the medians, the share of those prompts where the lead is <= 0, and the sd of
    every sample's score (the scale to read the two against)."""
    ranges, leads = [], []
    for r in rows:
        closed = [
            (s, c, x)
            for s, c, x, f in zip(r["samples"], r["correct"], r["scores"], r["finished"], strict=True)
            if f
        ]
        wrong = {s: x for s, c, x in closed if not c}  # distinct answers: one text, one score
        right = [x for _, c, x in closed if c]
        if len(wrong) >= 2:
            ranges.append(max(wrong.values()) - min(wrong.values()))
        if right and wrong:
            leads.append(statistics.fmean(right) - max(wrong.values()))
    scores = [x for r in rows for x in r["scores"]]
    return {
        "prompts": len(rows),
        "prompts_with_distinct_wrong": len(ranges),
        "median_wrong_range": statistics.median(ranges) if ranges else float("nan"),
        "prompts_with_right_and_wrong": len(leads),
        "median_right_lead": statistics.median(leads) if leads else float("nan"),
        "share_best_wrong_at_least_mean_right": sum(g <= 0 for g in leads) / len(leads)
        if leads
        else float("nan"),
        "score_sd": statistics.pstdev(scores) if scores else float("nan"),
    }
