"""Reward-model evaluation on preference pairs: pairwise accuracy, ties, margins, length bias, report.

One function scores the pairs (`score_pairs`), one turns scores into numbers (`summarize`), and
`write_report` writes ``report.json``, ``report.md`` and ``margins.png``. The training loop calls
`evaluate_pairs` after every epoch; ``eval/rm_accuracy.py`` is the command line around the same code.

Accuracy counts a pair as right only when the chosen response scores strictly higher; a tie (equal
scores, e.g. two unclosed responses that both get the penalty) is not right, and is reported on its
own. The length-bias line splits the pairs by which response is longer (in tokens): a model that
mostly rewards length is right far more often on one side than the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def pairwise_accuracy(
    chosen: Sequence[float] | torch.Tensor, rejected: Sequence[float] | torch.Tensor
) -> dict:
    """Counts over pairs of scores: ``correct`` (chosen > rejected), ``ties`` (equal), ``wrong``, and
    ``accuracy`` = correct / pairs (ties count as not correct); ``tie_rate`` = ties / pairs."""
    c = torch.as_tensor(chosen, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(rejected, dtype=torch.float64).reshape(-1)
    if c.shape != r.shape:
        raise ValueError(f"pairwise_accuracy: {c.numel()} chosen scores but {r.numel()} rejected")
    n = c.numel()
    correct = int((c > r).sum())
    ties = int((c == r).sum())
    return {
        "pairs": n,
        "correct": correct,
        "ties": ties,
        "wrong": n - correct - ties,
        "accuracy": correct / n if n else float("nan"),
        "tie_rate": ties / n if n else float("nan"),
    }


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int = 16,
    device: torch.device | str | None = None,
    autocast: Any = None,
) -> dict[str, list]:
    """Score tokenised pairs (`align.data.tokenize_preference`) with a `RewardModel`, each micro-batch's
    chosen and rejected sequences packed into one padding-free row.

    Returns lists ``chosen``, ``rejected`` (rewards; ``unclosed_reward`` for an unclosed response) and
    ``chosen_found``, ``rejected_found``; with K > 1 reward heads also ``chosen_members`` and
    ``rejected_members``, each head's reward (a list of K per pair).
    """
    from contextlib import nullcontext

    from align.reward import pack_pairs

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_found": [], "rejected_found": []}
    try:
        for start in range(0, len(examples), micro_batch_size):
            batch = pack_pairs(list(examples[start : start + micro_batch_size]), device)
            with autocast() if autocast is not None else nullcontext():
                result = model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    end_index=batch["end_index"],
                )
            rewards, found = result.rewards.float().cpu(), result.found.cpu()
            out["chosen"] += rewards[0::2].tolist()
            out["rejected"] += rewards[1::2].tolist()
            out["chosen_found"] += found[0::2].tolist()
            out["rejected_found"] += found[1::2].tolist()
            members = getattr(result, "member_rewards", None)
            if members is not None and members.shape[1] > 1:
                members = members.float().cpu()
                out.setdefault("chosen_members", []).extend(members[0::2].tolist())
                out.setdefault("rejected_members", []).extend(members[1::2].tolist())
    finally:
        model.train(was_training)
    return out


def summarize(examples: Sequence[dict[str, Any]], scores: dict[str, list]) -> dict[str, Any]:
    """Accuracy, ties, margins and length bias of scored pairs.

    Returns the `pairwise_accuracy` counts plus ``mean_margin`` / ``median_margin`` (of r_c - r_r),
    ``unclosed`` (pairs with a response whose end token is missing), ``length_bias`` (accuracy and
    count when the chosen response is longer, shorter, or as long as the rejected one, in tokens),
    ``chosen_mean``/``rejected_mean`` rewards and the per-pair ``margins`` (for the histogram).
    """
    chosen, rejected = scores["chosen"], scores["rejected"]
    result: dict[str, Any] = pairwise_accuracy(chosen, rejected)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    ordered = sorted(margins)
    result["mean_margin"] = sum(margins) / n if n else float("nan")
    result["median_margin"] = (
        (ordered[(n - 1) // 2] + ordered[n // 2]) / 2 if n else float("nan")  # the middle (or two middles)
    )
    result["chosen_mean"] = sum(chosen) / n if n else float("nan")
    result["rejected_mean"] = sum(rejected) / n if n else float("nan")
    result["unclosed"] = sum(
        1 for a, b in zip(scores["chosen_found"], scores["rejected_found"], strict=True) if not (a and b)
    )
    groups: dict[str, list[float]] = {"chosen_longer": [], "chosen_shorter": [], "same_length": []}
    for ex, m in zip(examples, margins, strict=True):
        lc, lr = ex.get("chosen_len", len(ex["chosen_ids"])), ex.get("rejected_len", len(ex["rejected_ids"]))
        key = "chosen_longer" if lc > lr else "chosen_shorter" if lc < lr else "same_length"
        groups[key].append(m)
    result["length_bias"] = {
        key: {"pairs": len(ms), "accuracy": (sum(m > 0 for m in ms) / len(ms)) if ms else None}
        for key, ms in groups.items()
    }
    result["margins"] = margins
    if scores.get("chosen_members"):
        result.update(ensemble_summary(scores["chosen_members"], scores["rejected_members"]))
    return result


def ensemble_summary(
    chosen_members: Sequence[Sequence[float]], rejected_members: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """The numbers of a reward model of K heads on P pairs, from the heads' rewards (P, K) of each side:
    ``head_accuracies`` (K, each head's pairwise accuracy), ``min_accuracy`` (of the min over heads, the
    worst-case score, as ``rm_ensemble_objective: min`` scores), and ``disagreement``: the mean over pairs of
    the std over heads (population) of the margin r_c - r_r, 0 when the heads agree on every pair.
    (The accuracy of the heads' mean is ``accuracy``.)"""
    c = torch.as_tensor(chosen_members, dtype=torch.float64)
    r = torch.as_tensor(rejected_members, dtype=torch.float64)
    if c.ndim != 2 or c.shape != r.shape:
        raise ValueError(
            f"ensemble_summary: expected two (P, K) lists, got {tuple(c.shape)} {tuple(r.shape)}"
        )
    return {
        "num_heads": c.shape[1],
        "head_accuracies": (c > r).double().mean(0).tolist(),  # a tie counts as not correct, as in accuracy
        "min_accuracy": pairwise_accuracy(c.min(dim=1).values, r.min(dim=1).values)["accuracy"],
        "disagreement": float((c - r).std(dim=1, unbiased=False).mean()),
    }


def evaluate_pairs(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int = 16,
    device: torch.device | str | None = None,
    autocast: Any = None,
) -> dict[str, Any]:
    """`score_pairs` then `summarize`: the numbers of one data set."""
    scores = score_pairs(model, examples, micro_batch_size=micro_batch_size, device=device, autocast=autocast)
    return summarize(examples, scores)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def length_bias_line(result: dict[str, Any]) -> str:
    """``accuracy 0.71 when the chosen response is longer (120 pairs), 0.45 when shorter (80), ...``"""
    lb = result["length_bias"]
    return (
        f"accuracy {_fmt(lb['chosen_longer']['accuracy'])} when the chosen response is longer "
        f"({lb['chosen_longer']['pairs']} pairs), {_fmt(lb['chosen_shorter']['accuracy'])} when shorter "
        f"({lb['chosen_shorter']['pairs']}), {_fmt(lb['same_length']['accuracy'])} at equal length "
        f"({lb['same_length']['pairs']})"
    )


def format_result(name: str, result: dict[str, Any]) -> str:
    """A few lines for the console."""
    return "\n".join(
        [
            f"{name}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['pairs']}), "
            f"ties {result['ties']}, mean margin {_fmt(result['mean_margin'])}, unclosed {result['unclosed']}",
            f"  length bias: {length_bias_line(result)}",
            *([f"  heads: {heads_line(result)}"] if "head_accuracies" in result else []),
        ]
    )


def heads_line(result: dict[str, Any]) -> str:
    """``accuracy per head 0.81 0.78 0.84, of the min 0.79, of the mean 0.83; disagreement 0.120``"""
    per_head = " ".join(_fmt(a) for a in result["head_accuracies"])
    return (
        f"accuracy per head {per_head}, of the min {_fmt(result['min_accuracy'])}, of the mean "
        f"{_fmt(result['accuracy'])}; disagreement (mean std of the margin over heads) "
        f"{_fmt(result['disagreement'])}"
    )


def plot_margins(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One histogram of r_chosen - r_rejected per data set, a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        margins = results[name]["margins"]
        ax.hist(margins, bins=min(50, max(10, len(margins) // 5)), color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(f"{name}: accuracy {results[name]['accuracy']:.3f}, {len(margins)} pairs", fontsize=10)
        ax.set_ylabel("pairs")
    axes[-1, 0].set_xlabel("margin r(chosen) - r(rejected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy_history(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out accuracy against optimiser step, one line per data set, from step 0 (before training)
    when it is known. ``history``: the training loop's ``eval_history`` (``step``, ``accuracies``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys(n for h in history for n in h.get("accuracies") or {}))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in names:
        points = [(h["step"], h["accuracies"][name]) for h in history if name in (h.get("accuracies") or {})]
        ax.plot(*zip(*points, strict=True), marker="o", linewidth=1.2, label=name)
    if any(h["step"] == 0 for h in history):
        ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(
            "before training", (0, 0.02), xycoords=("data", "axes fraction"), fontsize=8, color="grey"
        )
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--", alpha=0.5)  # chance
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("Held-out accuracy (a tie counts as not correct; dashed: chance)", fontsize=10)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    results: dict[str, dict[str, Any]],
    out_dir: str | Path,
    *,
    model: str = "",
    extra: dict | None = None,
    before: dict[str, float] | None = None,
    history: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``report.json`` (``accuracy`` per data set at the top, and every number per data set),
    ``report.md`` and ``margins.png`` into ``out_dir``.

    From a training run: ``before`` (accuracy per data set before training) adds ``accuracy_before`` and a
    column, and ``history`` (the eval curve, `plot_accuracy_history`) adds ``history`` and ``accuracy.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model,
        "accuracy": {name: r["accuracy"] for name, r in results.items()},
        "datasets": {name: {k: v for k, v in r.items() if k != "margins"} for name, r in results.items()},
        **(extra or {}),
    }
    if before is not None:
        report["accuracy_before"] = {name: before.get(name) for name in results}
    if history is not None:
        report["history"] = list(history)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# Reward model accuracy: {model}" if model else "# Reward model accuracy", ""]
    before_head, before_rule = ("before training | ", "---|") if before is not None else ("", "")
    lines += [
        f"| data set | pairs | {before_head}accuracy | ties | mean margin | median margin | unclosed |",
        f"|---|---|{before_rule}---|---|---|---|---|",
    ]
    for name, r in results.items():
        was = f"{_fmt((before or {}).get(name), '.4f')} | " if before is not None else ""
        lines.append(
            f"| {name} | {r['pairs']} | {was}{r['accuracy']:.4f} | {r['ties']} | {_fmt(r['mean_margin'])} | "
            f"{_fmt(r['median_margin'])} | {r['unclosed']} |"
        )
    lines.append("")
    for name, r in results.items():
        lines.append(f"- **{name}** length bias: {length_bias_line(r)}")
    for name, r in results.items():
        if "head_accuracies" in r:
            lines.append(f"- **{name}** {r['num_heads']} heads: {heads_line(r)}")
    curve = "; accuracy per step from before training: `accuracy.png`" if history is not None else ""
    lines += ["", f"Margins: `margins.png`{curve}. A tie counts as not correct.", ""]
    paths = {"json": out / "report.json", "md": out / "report.md"}
    if history is not None:
        paths["curve"] = plot_accuracy_history(history, out / "accuracy.png")
    (out / "report.md").write_text("\n".join(lines))
    paths["png"] = plot_margins(results, out / "margins.png")
    return paths
