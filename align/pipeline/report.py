"""The pipeline's report: key numbers per stage, the stage training curves, win rates against SFT.

Reads what the stages and the evaluation wrote under the pipeline's output_dir (summary.json,
metrics.jsonl, eval/<policy>/eval.json) and writes report.md, curves.png and win_rates.png there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from align.pipeline.layout import STAGES, TITLES, final_model, stage_dir

# (stage, metrics dirs under the stage dir, left-axis key, right-axis key or None) of the summary figure.
CURVE_PANELS = (
    ("sft", ("",), "loss", None),
    ("rm", ("pmp", "rm"), "loss", "eval_accuracy"),
    ("ppo", ("",), "rm_score", "kl"),
    ("dpo", ("",), "loss", "rewards_accuracy"),
)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metric_series(run_dirs: list[Path], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` across runs in sequence (PMP then RM: RM steps continue after PMP's)."""
    from align.tracking import read_metrics

    steps, values, offset = [], [], 0
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            continue
        records = read_metrics(d)
        for r in records:
            if isinstance(r.get(key), int | float):
                steps.append(offset + r["step"])
                values.append(float(r[key]))
        offset += max((r["step"] for r in records), default=0)
    return steps, values


def _ends(values: list[float], k: int = 2) -> tuple[float, float] | None:
    """Mean of the first k and of the last k values: a start -> end figure that one noisy step won't set."""
    if not values:
        return None
    k = max(1, min(k, len(values) // 2 or 1))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if not isinstance(x, int | float) else format(x, fmt)


def _secs(x: Any) -> str:
    if not isinstance(x, int | float):
        return "-"
    return f"{x:.0f} s" if x < 120 else f"{int(x // 60)} min {x % 60:.0f} s"


def stage_numbers(root: str | Path) -> dict[str, dict[str, Any]]:
    """The key numbers of every stage that has run, from its summary.json and metrics.jsonl."""
    root = Path(root)
    numbers: dict[str, dict[str, Any]] = {}
    sft = _read_json(stage_dir(root, "sft") / "summary.json")
    if sft:
        numbers["sft"] = {
            "steps": sft.get("steps"),
            "final_loss": sft.get("final_loss"),
            "accuracy_before": sft.get("accuracy_before"),
            "accuracy_after": sft.get("accuracy_after"),
        }
    sampled = _read_json(stage_dir(root, "sample_pairs") / "summary.json")
    if sampled:
        numbers["sample_pairs"] = {
            run: {
                k: (sampled[run].get("report") or {}).get(k)
                for k in ("prompts", "samples", "share_correct", "pairs", "prompts_without_pair")
            }
            for run in ("train", "heldout")
            if sampled.get(run)
        }
    rm = _read_json(stage_dir(root, "rm") / "summary.json")
    if rm:
        pmp_run, rm_run = rm.get("pmp") or {}, rm.get("rm") or {}
        # The named held-out sets beside the main one (eval_datasets, e.g. the sampled `onpolicy` pairs): the
        # main set comes first in eval_sets where there is one.
        names = list(rm_run.get("eval_sets") or {})
        extra = names[1:] if rm_run.get("eval_pairs") else names
        numbers["rm"] = {
            "accuracy_before_pmp": rm.get("accuracy_before_pmp"),
            "accuracy_after_pmp": rm.get("accuracy_after_pmp"),
            "accuracy_after_rm": rm.get("accuracy_after_rm"),
            "eval_pairs": rm_run.get("eval_pairs"),
            "sets": {
                name: (
                    (pmp_run.get("accuracies_before") or {}).get(name),
                    (pmp_run.get("accuracies_after") or {}).get(name),
                    (rm_run.get("accuracies_after") or {}).get(name),
                )
                for name in extra
            },
        }
    if _read_json(stage_dir(root, "ppo") / "summary.json"):
        ppo_dir = [stage_dir(root, "ppo")]
        entry: dict[str, Any] = {}
        for key in ("rm_score", "gold_score", "kl", "ptx_loss", "response_length"):
            entry[key] = _ends(_metric_series(ppo_dir, key)[1])
        entry["steps"] = _read_json(stage_dir(root, "ppo") / "summary.json").get("steps")
        numbers["ppo"] = entry
    dpo = _read_json(stage_dir(root, "dpo") / "summary.json")
    if dpo:
        dpo_dir = [stage_dir(root, "dpo")]
        numbers["dpo"] = {
            "steps": dpo.get("steps"),
            "accuracy_before": dpo.get("accuracy_before"),
            "accuracy_after": dpo.get("accuracy_after"),
            "rewards_accuracy": _ends(_metric_series(dpo_dir, "rewards_accuracy")[1]),
            "rewards_margin": _ends(_metric_series(dpo_dir, "rewards_margin")[1]),
        }
    return numbers


def plot_stage_curves(root: str | Path, path: Path) -> Path | None:
    """One figure, a panel per stage that has metrics: its main curve (left axis) and a second (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    panels = []
    for stage, subdirs, left, right in CURVE_PANELS:
        dirs = [stage_dir(root, stage) / s for s in subdirs]
        series = [(key, *_metric_series(dirs, key)) if key else (None, [], []) for key in (left, right)]
        if series[0][1] or series[1][1]:
            panels.append((stage, series))
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (stage, series) in zip(axes.flat, panels, strict=False):
        (lkey, lx, ly), (rkey, rx, ry) = series
        ax.plot(lx, ly, marker=".", linewidth=1, color="tab:blue", label=lkey)
        ax.set_ylabel(lkey, color="tab:blue")
        ax.set_xlabel("optimiser step" + (" (PMP, then RM)" if stage == "rm" else ""))
        ax.grid(alpha=0.3)
        if stage == "rm":  # mark where RM fine-tuning starts
            pmp_steps = _metric_series([stage_dir(root, "rm") / "pmp"], lkey)[0]
            if pmp_steps:
                ax.axvline(max(pmp_steps) + 0.5, color="grey", linestyle=":", linewidth=1)
                ax.text(max(pmp_steps) + 0.5, 0.98, " RM starts", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey")  # fmt: skip
        if ry:
            twin = ax.twinx()
            twin.plot(rx, ry, marker="o", markersize=3, linewidth=1, color="tab:orange", label=rkey)
            twin.set_ylabel(rkey, color="tab:orange")
        ax.set_title(TITLES[stage])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training curves per pipeline stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_win_rates(evals: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of each policy's win rate against the SFT model (RM- and gold-judged), 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = [("win_rate_rm", "reward model", "tab:blue"), ("win_rate_gold", "gold verifier", "tab:green")]
    policies = list(evals)
    if not policies:
        return None
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(policies), 3.6))
    width = 0.38
    for j, (key, label, color) in enumerate(judges):
        xs, rates, lows, highs = [], [], [], []
        for i, policy in enumerate(policies):
            w = evals[policy].get(key)
            if w:
                xs.append(i + (j - 0.5) * width)
                rates.append(w["rate"])
                lows.append(w["rate"] - w["lo"])
                highs.append(w["hi"] - w["rate"])
        if xs:
            ax.bar(xs, rates, width, yerr=[lows, highs], capsize=4, color=color, alpha=0.8, label=label)
            for x, r in zip(xs, rates, strict=True):
                ax.text(x, 0.02, f"{100 * r:.0f}%", ha="center", va="bottom", fontsize=8, color="white")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="parity (0.5)")
    ax.set_xticks(range(len(policies)), [p.upper() for p in policies])
    ax.set_ylim(0, 1.2)  # headroom for the legend above the bars
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("win rate vs SFT (ties = 1/2)")
    ax.set_title("Win rate against the SFT model (95% Wilson intervals)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wr(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    return f"{_pct(w['rate'])} [{_pct(w['lo'])}, {_pct(w['hi'])}] ({w['wins']}/{w['ties']}/{w['losses']})"


def _change(pair: tuple[float, float] | None, fmt: str = ".3f") -> str:
    return "-" if pair is None else f"{format(pair[0], fmt)} -> {format(pair[1], fmt)}"


def write_report(root: str | Path, state: dict[str, Any]) -> Path:
    """report.md (stage table, key numbers, evaluation) plus curves.png and win_rates.png in `root`."""
    root = Path(root)
    numbers = stage_numbers(root)
    evals = {p: e for p in ("ppo", "dpo") if (e := _read_json(root / "eval" / p / "eval.json"))}
    curves = plot_stage_curves(root, root / "curves.png")
    bars = plot_win_rates(evals, root / "win_rates.png")
    lines = [
        "# Pipeline report",
        "",
        f"`{root}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}. Stages: SFT -> "
        f"{'sample_pairs -> ' if 'sample_pairs' in state['stages'] else ''}PMP -> RM -> PPO, and "
        "SFT -> DPO; records in `pipeline_state.json`.",
        "",
        "| stage | status | wall time (all attempts) | attempts (outcome, time) | output |",
        "|---|---|---|---|---|",
    ]
    for stage in STAGES:
        record = state["stages"].get(stage)
        if record is None and stage == "sample_pairs":
            continue  # the on-policy chain's stage: listed where it ran
        if record is None:
            lines.append(f"| {stage} | not run | - | - | - |")
            continue
        seconds = sum(a.get("seconds") or 0.0 for a in record.get("attempts", []))
        outcomes = ", ".join(
            f"{a.get('outcome', 'running')} ({_secs(a.get('seconds'))})" for a in record.get("attempts", [])
        )
        lines.append(
            f"| {stage} | {record.get('status')} | {_secs(seconds)} | {outcomes} | `{final_model(root, stage)}` |"
        )
    for policy, record in state.get("eval", {}).items():
        lines.append(
            f"| eval {policy} vs sft | done | {_secs(record.get('seconds'))} | - | `{root / 'eval' / policy}` |"
        )
    lines += ["", "## Key numbers", ""]
    sft, sampled, rm, ppo, dpo = (numbers.get(s) for s in STAGES)
    if sft:
        lines.append(
            f"- **sft**: held-out gold accuracy {_pct(sft['accuracy_before'])} -> {_pct(sft['accuracy_after'])}"
            f"; steps: {sft['steps']}, final loss {_num(sft['final_loss'])}"
        )
    for run, r in (sampled or {}).items():
        lines.append(
            f"- **sample_pairs** ({run} prompts): {r['prompts']} prompts, {r['samples']} samples, "
            f"{_pct(r['share_correct'])} correct; {r['pairs']} pairs ({r['prompts_without_pair']} prompts "
            "without one)"
        )
    if rm:
        lines.append(
            f"- **rm**: held-out pair accuracy {_pct(rm['accuracy_before_pmp'])} before, "
            f"{_pct(rm['accuracy_after_pmp'])} after PMP, {_pct(rm['accuracy_after_rm'])} after RM "
            f"({rm['eval_pairs'] or '-'} pairs)"
            + "".join(
                f"; {name}: {_pct(before)} before, {_pct(pmp)} after PMP, {_pct(after)} after RM"
                for name, (before, pmp, after) in rm["sets"].items()
            )
        )
    if ppo:
        lines.append(
            f"- **ppo**: iterations: {ppo['steps']}; RM score {_change(ppo['rm_score'])}, gold score "
            f"{_change(ppo['gold_score'], '.2f')}, KL {_change(ppo['kl'], '.4f')}, response length "
            f"{_change(ppo['response_length'], '.1f')} (mean of the first two -> last two iterations)"
        )
    if dpo:
        lines.append(
            f"- **dpo**: held-out gold accuracy {_pct(dpo['accuracy_before'])} -> {_pct(dpo['accuracy_after'])}"
            f"; steps: {dpo['steps']}, implicit-reward accuracy {_change(dpo['rewards_accuracy'], '.2f')}, "
            f"margin {_change(dpo['rewards_margin'])}"
        )
    if not numbers:
        lines.append("No stage has completed yet.")
    lines += ["", "## Aligned policies against the SFT model", ""]
    if evals:
        lines += [
            "Greedy responses on held-out prompts; win rate with ties counted half, 95% Wilson interval and "
            "(wins/ties/losses); tax = held-out LM loss change on pre-training-style text.",
            "",
            "| policy | win rate (RM) | win rate (gold) | gold accuracy policy / SFT | RM score policy / SFT "
            "| KL to SFT | length policy / SFT | tax: LM loss change | tax: accuracy change |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for policy, e in evals.items():
            rm_score, tax = e.get("rm_score") or {}, e.get("tax") or {}
            lines.append(
                f"| {policy} | {_wr(e.get('win_rate_rm'))} | {_wr(e.get('win_rate_gold'))} "
                f"| {_pct(e['gold_accuracy']['policy'])} / {_pct(e['gold_accuracy']['baseline'])} "
                f"| {_num(rm_score.get('policy'))} / {_num(rm_score.get('baseline'))} "
                f"| {_num(e.get('kl_to_baseline'), '.4f')} "
                f"| {_num(e['response_length']['policy'], '.1f')} / {_num(e['response_length']['baseline'], '.1f')} "
                f"| {_num(tax.get('delta_lm_loss'), '+.4f')} | {_num(tax.get('accuracy_delta'), '+.3f')} |"
            )
        lines += ["", "Per-policy details: " + ", ".join(f"`eval/{p}/eval.md`" for p in evals)]
    else:
        lines.append("No evaluation yet (it runs when PPO or DPO is complete and evaluate=true).")
    lines += ["", "## Figures", ""]
    if curves:
        lines.append("![training curves per stage](curves.png)")
    if bars:
        lines.append("")
        lines.append("![win rate against the SFT model](win_rates.png)")
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
