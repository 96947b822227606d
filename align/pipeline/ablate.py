"""Ablations: sweep any config keys of a recipe, train every combination x seed, evaluate, report.

    python recipes/ablate.py --config FILE --grid ptx_coef=0,0.5,2 kl_coef=0.01,0.04,0.1 [--seeds 2]

The sweep file (YAML) names the recipe and holds its base config keys, the evaluation settings and an
optional default grid::

    recipe: ppo                  # sft, rm, ppo, dpo, online_dpo, grpo
    config: {max_steps: 10}      # base keys of the recipe's config (output_dir and seed are set per run)
    grid: {ptx_coef: [0, 2]}     # swept keys; --grid on the command line replaces it key by key
    seeds: 1
    eval: {num_prompts: 48}      # compare_policies settings; baseline / reward_model default from config
    out: outputs/ablate/NAME
    curves: [rm_score, kl]       # metrics.jsonl keys plotted per run
    keep_checkpoints: false      # a finished run's checkpoints are deleted (disk), its final/ is kept

Every key is checked against the recipe's config dataclass by the strict loader before any run starts.
Each combination x seed is one run in ``out/runs/<name>/``: the recipe runs as a subprocess
(``python recipes/<recipe>.py key=value ...``, output in ``train.log``), then ``eval/policy.py`` compares its
``final/`` with the run's start model. ``result.json`` marks a run done; a run without one is (re)started,
and the recipe resumes from its checkpoints (``resume=auto``). A failed run records the end of its log and
the others go on. At the end: ``results.csv``, ``report.md``, ``tradeoff.png`` and ``curves.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from align.config import DPOConfig, GRPOConfig, OnlineDPOConfig, PPOConfig, RMConfig, SFTConfig
from align.config_loader import ConfigError, _parse_override, build_config

REPO = Path(__file__).resolve().parents[2]  # align/pipeline/ablate.py -> the repository
RECIPES: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
    "online_dpo": OnlineDPOConfig,
    "grpo": GRPOConfig,
}
SPEC_KEYS = {"recipe", "config", "grid", "seeds", "eval", "out", "curves", "jobs", "keep_checkpoints"}
EVAL_KEYS = {"baseline", "reward_model", "num_prompts", "max_new_tokens", "batch_size", "seed", "tax_text",
             "tax_max_rows"}  # fmt: skip
DEFAULT_CURVES = {
    "ppo": ["rm_score", "kl"],
    "grpo": ["reward_mean", "kl"],
    "online_dpo": ["reward_mean", "loss"],
    "dpo": ["loss", "rewards_margin"],
    "sft": ["loss"],
    "rm": ["loss", "accuracy"],
}


@dataclasses.dataclass
class Sweep:
    """A validated sweep: the recipe, its base keys, the grid (key -> values), seeds, eval settings."""

    recipe: str
    config: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    eval: dict[str, Any]
    out: Path
    curves: list[str]
    jobs: int | None = None
    keep_checkpoints: bool = False  # a PPO checkpoint of a 135M model is ~3 GB: a finished run drops them


@dataclasses.dataclass(frozen=True)
class Run:
    """One combination x seed: ``values`` are the swept keys' values (in grid order)."""

    name: str
    values: dict[str, Any]
    seed: int

    @property
    def setting(self) -> str:
        """The combination without the seed, e.g. ``ptx_coef=0 kl_coef=0.01``."""
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.values.items()) or "base"


class RunFailed(RuntimeError):
    """A run's training or evaluation failed; the message's first line says why, the rest is the log's end."""


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["ptx_coef=0,0.5,2", "kl_coef=0.01"]`` -> ``{"ptx_coef": [0, 0.5, 2], "kl_coef": [0.01]}`` (YAML scalars)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, raw = item.split("=", 1) if "=" in item else (item, "")
        if not raw.strip():
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [_parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
    return grid


def expand_grid(grid: dict[str, list[Any]], seeds: Sequence[int]) -> list[Run]:
    """Every combination of the grid's values (cartesian product, first key slowest) times every seed."""
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        for seed in seeds:
            name = "_".join(f"{k}-{_fmt(v)}" for k, v in values.items()) or "base"
            runs.append(Run(name=f"{name}_seed-{seed}", values=values, seed=seed))
    return runs


def validate(recipe: str, config: dict[str, Any], runs: Sequence[Run]) -> None:
    """Build the recipe's config for every run with the strict loader: a typo or a wrong type fails here,
    naming the key, before any run starts."""
    cls = RECIPES[recipe]
    for run in runs:
        build_config(cls, {**config, **run.values, "seed": run.seed}, source=f"sweep run {run.name}")


def load_sweep(
    path: str | Path | None,
    *,
    grid: dict[str, list[Any]] | None = None,
    seeds: int | None = None,
    out: str | Path | None = None,
    jobs: int | None = None,
    recipe: str | None = None,
) -> Sweep:
    """The sweep file merged with command-line settings (which win), checked: unknown top-level or eval
    keys, an unknown recipe, an empty grid, or a key the recipe does not have raise ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"sweep file {p} does not exist")
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping (recipe, config, grid, ...)")
        unknown = set(raw) - SPEC_KEYS
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    src = str(path) if path is not None else "command line"
    recipe = recipe or raw.get("recipe")
    if recipe not in RECIPES:
        raise ConfigError(f"{src}: recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    config = dict(raw.get("config") or {})
    for owned in ("output_dir",):
        if owned in config:
            raise ConfigError(f"{src}: {owned} is set per run by the sweep; use `out` instead")
    merged_grid = {k: list(v) if isinstance(v, list) else [v] for k, v in (raw.get("grid") or {}).items()}
    merged_grid.update(grid or {})
    if "output_dir" in merged_grid:
        raise ConfigError(f"{src}: output_dir cannot be swept")
    n_seeds = seeds if seeds is not None else int(raw.get("seeds", 1))
    if n_seeds < 1:
        raise ConfigError(f"{src}: seeds must be >= 1, got {n_seeds}")
    if "seed" in merged_grid and n_seeds > 1:
        raise ConfigError(f"{src}: sweep `seed` in the grid or use seeds > 1, not both")
    base_seed = int(config.pop("seed", build_config(RECIPES[recipe], {}).seed))
    seed_list = [base_seed + i for i in range(n_seeds)]
    if "seed" in merged_grid:
        seed_list = [int(s) for s in merged_grid.pop("seed")]
    ev = dict(raw.get("eval") or {})
    unknown = set(ev) - EVAL_KEYS
    if unknown:
        raise ConfigError(f"{src}: unknown eval key(s) {sorted(unknown)}; allowed: {sorted(EVAL_KEYS)}")
    sweep = Sweep(
        recipe=recipe,
        config=config,
        grid=merged_grid,
        seeds=seed_list,
        eval=ev,
        out=Path(out or raw.get("out") or f"outputs/ablate/{recipe}").resolve(),
        curves=list(raw.get("curves") or DEFAULT_CURVES[recipe]),
        jobs=jobs or raw.get("jobs"),
        keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
    )
    validate(recipe, config, expand_grid(sweep.grid, sweep.seeds))
    return sweep


# --------------------------------------------------------------------------------------------------------
# Running one run (the default: subprocesses) and the sweep
# --------------------------------------------------------------------------------------------------------


def default_jobs() -> tuple[int, int]:
    """(parallel runs, threads per run): one run per GPU, else one per two CPU cores."""
    cores = os.cpu_count() or 1
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime: plan for CPUs
        gpus = 0
    jobs = gpus if gpus else max(1, cores // 2)
    return jobs, max(1, cores // jobs)


def log_tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` non-empty lines of a log, progress bars left out (they are written last)."""
    if not path.is_file():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip() and "%|" not in line]
    return "\n".join(kept[-lines:])


def error_line(tail: str) -> str:
    """The line of a log's tail that names the error (the last ``...Error: ...`` or ``error: ...``)."""
    candidates = [
        line.strip() for line in tail.splitlines() if re.search(r"(Error|Exception|^error)\b", line.strip())
    ]
    return candidates[-1] if candidates else (tail.strip().splitlines() or [""])[-1]


def _failure(what: str, code: int, log: Path) -> RunFailed:
    tail = log_tail(log)
    return RunFailed(f"{what} exited with status {code}: {error_line(tail)}\n{tail}")


def _start_model(sweep: Sweep, cfg: Any) -> str:
    if sweep.eval.get("baseline"):
        return str(sweep.eval["baseline"])
    start = getattr(cfg, "model_name_or_path", "smollm2-135m-instruct")
    if start == "auto":  # DPO/online: the SFT default's output when present
        from align.assets import SFT_DEFAULT_OUTPUT

        return str(SFT_DEFAULT_OUTPUT) if Path(SFT_DEFAULT_OUTPUT).is_dir() else "smollm2-135m-instruct"
    return start


def _reward_model(sweep: Sweep, cfg: Any) -> str | None:
    if "reward_model" in sweep.eval:
        return sweep.eval["reward_model"]
    for candidate in (getattr(cfg, "reward_model_path", None), "outputs/rm/rm/final"):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    return None


def _logged_run(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    """Run `cmd` in the current directory, appending the command line and its output to `log`; raise
    RunFailed with the log's end if it exits non-zero."""
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=Path.cwd(), env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise _failure(what, code, log)


def subprocess_run(
    sweep: Sweep, run: Run, run_dir: Path, threads: int, gpu: int | None = None
) -> dict[str, Any]:
    """Train with ``python recipes/<recipe>.py`` and evaluate with ``eval/policy.py``, both as subprocesses
    (own memory, own thread count) in the current directory, so relative paths in the config mean what
    they mean to the recipe. Returns the evaluation; raises RunFailed with the log's end."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    train_dir = run_dir / "train"
    overrides = {
        **sweep.config,
        **run.values,
        "seed": run.seed,
        "output_dir": str(train_dir),
        "resume": "auto",
    }
    cmd = [sys.executable, str(REPO / "recipes" / f"{sweep.recipe}.py")]
    cmd += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    _logged_run(cmd, env, run_dir / "train.log", "training")
    if sweep.recipe == "rm":  # a reward model is not a policy: its own evaluation is the result
        summary = json.loads((train_dir / "summary.json").read_text())
        return {"summary": summary}
    cfg = build_config(RECIPES[sweep.recipe], {**sweep.config, **run.values})
    ev = {k: v for k, v in sweep.eval.items() if k not in ("baseline", "reward_model")}
    cmd = [sys.executable, str(REPO / "eval" / "policy.py"), "--policy", str(train_dir / "final"),
           "--baseline", _start_model(sweep, cfg), "--out", str(run_dir / "eval"),
           "--cache-dir", str(sweep.out.resolve() / "cache")]  # fmt: skip
    rm = _reward_model(sweep, cfg)
    cmd += ["--reward-model", rm] if rm else ["--no-reward-model"]
    for k, v in ev.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    _logged_run(cmd, env, run_dir / "eval.log", "evaluation")
    return json.loads((run_dir / "eval" / "eval.json").read_text())


RunFn = Callable[[Sweep, Run, Path, int, "int | None"], dict[str, Any]]


def run_sweep(
    sweep: Sweep,
    *,
    run_fn: RunFn = subprocess_run,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or skip, when done) every run of the sweep, ``jobs`` at a time; write the CSV, report and plots.

    ``run_fn(sweep, run, run_dir, threads, gpu) -> evaluation dict`` does one run (raise to fail it); tests
    pass a fake. Returns the rows of results.csv.
    """
    runs = expand_grid(sweep.grid, sweep.seeds)
    auto_jobs, _ = default_jobs()
    jobs = max(1, jobs or sweep.jobs or auto_jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    sweep.out.mkdir(parents=True, exist_ok=True)
    (sweep.out / "sweep.json").write_text(
        json.dumps(dataclasses.asdict(sweep), indent=2, default=str) + "\n", encoding="utf-8"
    )
    t0 = time.perf_counter()
    lock = threading.Lock()
    free_gpus = list(range(auto_jobs)) if _has_gpus() else []
    todo = [r for r in runs if not (sweep.out / "runs" / r.name / "result.json").is_file()]
    log(
        f"sweep: {len(runs)} runs ({len(runs) - len(todo)} done already), {jobs} at a time, {threads} threads each"
    )

    def one(run: Run) -> None:
        run_dir = sweep.out / "runs" / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        with lock:
            gpu = free_gpus.pop(0) if free_gpus else None
            log(f"[{time.perf_counter() - t0:7.1f}s] start  {run.name}")
        start = time.perf_counter()
        try:
            evaluation = run_fn(sweep, run, run_dir, threads, gpu)
            result = {"status": "ok", "evaluation": evaluation, "error": None}
        except Exception as err:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
            result = {"status": "failed", "evaluation": None, "error": str(err)}
        finally:
            with lock:
                if gpu is not None:
                    free_gpus.append(gpu)
        result.update({"name": run.name, "values": run.values, "seed": run.seed,
                       "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        # Only a successful run is marked done: a failed one is retried by the next invocation.
        target = run_dir / ("result.json" if result["status"] == "ok" else "failed.json")
        target.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        if result["status"] == "ok":
            (run_dir / "failed.json").unlink(missing_ok=True)
            if not sweep.keep_checkpoints:  # final/ is what was evaluated; checkpoints only serve resume
                shutil.rmtree(run_dir / "train" / "checkpoints", ignore_errors=True)
        with lock:
            log(
                f"[{time.perf_counter() - t0:7.1f}s] {result['status']:<6} {run.name} ({result['seconds']:.0f} s)"
            )

    # The first run goes alone: a run may first train shared inputs that are missing (PPO's embedded
    # default trains the SFT and RM defaults into outputs/), and two runs at once would both write them.
    if todo:
        one(todo[0])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo[1:]))
    rows = collect(sweep, runs)
    write_outputs(sweep, rows)
    log(f"sweep done in {time.perf_counter() - t0:.0f} s: {sweep.out / 'report.md'}")
    return rows


def _has_gpus() -> bool:
    try:
        import torch

        return torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------

COLUMNS = ["rm_gain", "win_rate_rm", "win_rate_gold", "gold_acc", "gold_acc_start", "tax_lm_loss",
           "tax_accuracy", "kl", "length", "seconds"]  # fmt: skip


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """One CSV row from a run's result: the swept values, seed, status, and the headline numbers."""
    row: dict[str, Any] = {**result["values"], "seed": result["seed"], "status": result["status"]}
    ev = result.get("evaluation") or {}
    nan = float("nan")

    def get(*path: str) -> float:
        cur: Any = ev
        for key in path:
            if not isinstance(cur, dict) or cur.get(key) is None:
                return nan
            cur = cur[key]
        return float(cur)

    row.update(
        {
            "rm_gain": get("rm_score", "policy") - get("rm_score", "baseline"),
            "win_rate_rm": get("win_rate_rm", "rate"),
            "win_rate_gold": get("win_rate_gold", "rate"),
            "gold_acc": get("gold_accuracy", "policy"),
            "gold_acc_start": get("gold_accuracy", "baseline"),
            "tax_lm_loss": get("tax", "delta_lm_loss"),
            "tax_accuracy": get("tax", "accuracy_delta"),
            "kl": get("kl_to_baseline"),
            "length": get("response_length", "policy"),
            "seconds": result.get("seconds", nan),
            # The CSV keeps the error's first line (what failed, and why); failed.json and the log the rest.
            "error": ((result.get("error") or "").strip().splitlines() or [""])[0],
        }
    )
    return row


def collect(sweep: Sweep, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Rows for every run: done, failed (with its error), or missing (never finished)."""
    rows = []
    for run in runs:
        run_dir = sweep.out / "runs" / run.name
        for name in ("result.json", "failed.json"):
            if (run_dir / name).is_file():
                rows.append(result_row(json.loads((run_dir / name).read_text())))
                break
        else:
            rows.append(result_row({"values": run.values, "seed": run.seed, "status": "missing"}))
        rows[-1]["name"] = run.name
    return rows


def aggregate(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every setting's successful runs.

    Returns one dict per setting (first-seen order): the swept values, ``n`` and ``<col>`` / ``<col>_std``
    for every numeric column (std 0 with one seed).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for combo, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, combo, strict=True))
        agg["n"] = len(members)
        for col in COLUMNS:
            vals = [m[col] for m in members if not math.isnan(m[col])]
            mean = sum(vals) / len(vals) if vals else float("nan")
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            agg[col], agg[f"{col}_std"] = mean, math.sqrt(var)
        out.append(agg)
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower tax (x) and higher gain (y), sorted by x.

    A point is dominated when another has x <= its x and y >= its y, one of them strictly.
    """
    front = []
    for i, (x, y) in enumerate(points):
        if any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            continue
        front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_outputs(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """results.csv, tradeoff.png, curves.png and report.md in ``sweep.out``."""
    keys = list(sweep.grid)
    out = sweep.out
    fields = ["name", *keys, "seed", "status", *COLUMNS, "error"]
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    settings = aggregate(rows, keys)
    paths = {"csv": out / "results.csv", "md": out / "report.md"}
    paths["tradeoff"] = plot_tradeoff(settings, keys, out / "tradeoff.png", seeds=len(sweep.seeds))
    paths["curves"] = plot_curves(sweep, rows, out / "curves.png")
    (out / "report.md").write_text(format_report(sweep, rows, settings), encoding="utf-8")
    return paths


def _label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    return " ".join(f"{k}={_fmt(setting[k])}" for k in keys) or "base"


def plot_tradeoff(settings: list[dict[str, Any]], keys: Sequence[str], path: Path, seeds: int) -> Path:
    """Reward gain against alignment tax (LM loss, then task accuracy), every setting labelled, the Pareto
    front drawn, error bars (one standard deviation over seeds) when there are several seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6))
    panels = [("tax_lm_loss", "tax: held-out LM loss change (nats/token, lower is better)", 1.0),
              ("tax_accuracy", "tax: task accuracy lost (points, lower is better)", -100.0)]  # fmt: skip
    colors = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    markers = "osD^v<>ph*"
    for ax, (col, xlabel, scale) in zip(axes, panels, strict=True):
        pts = [(s[col] * scale, s["rm_gain"]) for s in settings]
        ok = [i for i, (x, y) in enumerate(pts) if not (math.isnan(x) or math.isnan(y))]
        for i in ok:
            # One colour and marker per setting (the legend names it) plus its number beside the point:
            # nearby points stay told apart, which free-floating text labels do not manage.
            s, (x, y) = settings[i], pts[i]
            style = {"color": colors(i % colors.N), "marker": markers[i % len(markers)], "ms": 7,
                     "label": f"{i + 1}: {_label(s, keys)}", "ls": "none"}  # fmt: skip
            if seeds > 1:
                ax.errorbar(x, y, xerr=abs(scale) * s[f"{col}_std"], yerr=s["rm_gain_std"], ecolor="0.6",
                            capsize=3, **style)  # fmt: skip
            else:
                ax.plot(x, y, **style)
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        front = [ok[i] for i in pareto_front([pts[i] for i in ok])]
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--o", color="tab:red", ms=13,
                    mfc="none", label="Pareto front (less tax, more gain)")  # fmt: skip
        ax.legend(loc="best", fontsize=7)
        ax.axvline(0, color="0.85", lw=0.8)
        ax.axhline(0, color="0.85", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward gain: mean RM score, policy - start")
        ax.grid(alpha=0.3)
    note = f"mean of {seeds} seeds, bars = 1 std" if seeds > 1 else "one seed per setting, no error bars"
    fig.suptitle(f"Reward gain against alignment tax per setting ({note})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(sweep: Sweep, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per metric in ``sweep.curves``: that metric against step for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.tracking import read_metrics

    fig, axes = plt.subplots(1, len(sweep.curves), figsize=(6.5 * len(sweep.curves), 4.6), squeeze=False)
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for ax, key in zip(axes[0], sweep.curves, strict=True):
        for index, row in enumerate(rows):  # one colour per run in every panel
            train_dir = sweep.out / "runs" / row["name"] / "train"
            records = read_metrics(train_dir) if (train_dir / "metrics.jsonl").is_file() else []
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if pts:
                label = _label(row, list(sweep.grid)) + (f" s{row['seed']}" if len(sweep.seeds) > 1 else "")
                ax.plot(
                    *zip(*pts, strict=True), marker=".", lw=1, label=label, color=colors(index % colors.N)
                )
        ax.set_title(f"{key} per step, every run")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"Training curves of every run ({sweep.recipe})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(sweep: Sweep, rows: Sequence[dict[str, Any]], settings: Sequence[dict[str, Any]]) -> str:
    keys = list(sweep.grid)
    pm = len(sweep.seeds) > 1

    def cell(s: dict[str, Any], col: str, scale: float = 1.0, fmt: str = "{:+.3f}") -> str:
        v = s[col] * scale
        if math.isnan(v):
            return "-"
        return fmt.format(v) + (f" ± {abs(scale) * s[col + '_std']:.3f}" if pm else "")

    lines = [
        f"# Ablation: {sweep.recipe}, {' x '.join(keys) or 'base'}",
        "",
        f"{len(rows)} runs: {len(settings)} settings x {len(sweep.seeds)} seed(s) {sweep.seeds}. Base config: "
        f"`{json.dumps(sweep.config)}`. Each run is compared with its start model on held-out prompts "
        "(`eval/policy.py`): reward gain = mean RM score of the policy minus that of the start model (greedy "
        "responses); tax = change of the held-out LM loss (standard-library docstrings never used by the ptx "
        "stream) and of the gold task accuracy; KL = mean per-sequence KL to the start model."
        + (" Values are mean ± standard deviation over seeds." if pm else " One seed: no error estimate."),
        "",
        "| setting | n | reward gain | RM win rate | gold win rate | tax: LM loss change | accuracy change (pts) | KL | length |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in settings:
        lines.append(
            f"| {_label(s, keys)} | {s['n']} | {cell(s, 'rm_gain')} | {cell(s, 'win_rate_rm', 100, '{:.1f}%')} "
            f"| {cell(s, 'win_rate_gold', 100, '{:.1f}%')} | {cell(s, 'tax_lm_loss', 1, '{:+.4f}')} "
            f"| {cell(s, 'tax_accuracy', 100, '{:+.1f}')} | {cell(s, 'kl', 1, '{:.3f}')} | {cell(s, 'length', 1, '{:.1f}')} |"
        )
    valid = [s for s in settings if not math.isnan(s["rm_gain"])]
    if valid:
        best = max(valid, key=lambda s: s["rm_gain"])
        front = [valid[i] for i in pareto_front([(s["tax_lm_loss"], s["rm_gain"]) for s in valid])]
        lines += [
            "",
            f"**Largest reward gain**: {_label(best, keys)} ({best['rm_gain']:+.3f}, LM-loss tax "
            f"{best['tax_lm_loss']:+.4f}, accuracy {100 * best['tax_accuracy']:+.1f} points).",
            "",
            "**Pareto front** (no other setting has both less LM-loss tax and more reward gain): "
            + "; ".join(_label(s, keys) for s in front)
            + ".",
        ]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += ["", "## Failures", ""]
    if failed:
        lines += [f"- `{r['name']}`: {r['status']}: {r['error'] or '(no error recorded)'}" for r in failed]
        lines.append("\nThe full log of a failed run is in `runs/<name>/train.log` (and `eval.log`).")
    else:
        lines.append("None.")
    lines += ["", "## Plots", "", "![trade-off](tradeoff.png)", "", "![training curves](curves.png)", ""]
    lines += ["Per-run results: `results.csv`; per-run evaluations: `runs/<name>/eval/eval.md`.", ""]
    return "\n".join(lines)
