"""Run benchmark stages and list the results in one table.

    python bench/run_all.py --mode smoke --device cpu                  # the CPU smoke run (tests use it)
    python bench/run_all.py --mode real --device cuda --budget-s 480   # the prepared GPU run (8 minutes)

Each stage writes ``<out-dir>/<stage>_<mode>_<device>.json`` as soon as it ends (scaling also a PNG).

With ``--budget-s N`` the stages run in priority order (``PRIORITY``: what the last GPU run could not
measure first), each in its own process (a fresh GPU memory pool; a crash or hang costs one stage) with a
timeout of the time left, and a stage whose expected duration (``EXPECTED_S``, from the H200 run of
2026-11-28 where there is one, else a guess) no longer fits is skipped and listed as such. Without it,
every asked stage runs in this process, in the order given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

STAGES = ["sft", "dpo", "rm", "ppo", "generate", "scaling", "packed_rows"]
# Budgeted runs: the unmeasured or changed paths first (document attention, CUDA-graph decoding, PPO).
PRIORITY = ["packed_rows", "sft", "generate", "ppo", "dpo", "rm", "scaling"]
# Expected real-mode seconds on one H100/H200 (sft, dpo, rm: measured 2026-11-28 on an H200; the others
# are guesses: generate without the extra engines and with one compilation, ppo within its own budget).
EXPECTED_S = {"packed_rows": 40, "sft": 120, "generate": 150, "ppo": 180, "dpo": 90, "rm": 60, "scaling": 300}


def _stage_argv(stage: str, args: argparse.Namespace, device: str, out: Path) -> list[str]:
    return ["--mode", args.mode, "--model", args.model, "--device", device, "--out", str(out)]


def summary_row(stage: str, status: str, seconds: float, out: Path) -> dict:
    """One line of the table: the stage's headline figure from its JSON, when it wrote one."""
    row = {"stage": stage, "status": status, "seconds": round(seconds, 1), "file": str(out)}
    if out.exists():
        rec = json.loads(out.read_text())
        row["ratio_ours_over_peer"] = rec.get("ratio_ours_over_peer")
        unit = rec.get("unit")
        if unit:
            row["unit"] = unit
            row["ours"] = (rec.get("ours") or {}).get(unit)
            row["peer"] = (rec.get("peer") or {}).get(unit)
        if "per_token_ratio_longest_vs_shortest" in rec:
            row["unit"] = "per-token cost, longest / shortest row"
            row["ours"] = rec["per_token_ratio_longest_vs_shortest"]
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| stage | status | s | unit | ours | peer | ours/peer |", flush=True)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["stage"],
            r["status"],
            r["seconds"],
            r.get("unit", ""),
            r.get("ours", ""),
            r.get("peer", ""),
        ]
        cells.append(r.get("ratio_ours_over_peer", ""))
        print("| " + " | ".join("" if c is None else str(c) for c in cells) + " |", flush=True)


def run_budgeted(stages: list[str], args: argparse.Namespace, device: str) -> list[dict]:
    """Stages in priority order, one process each, within ``args.budget_s`` seconds."""
    deadline = time.monotonic() + args.budget_s
    rows = []
    for stage in sorted(stages, key=PRIORITY.index):
        out = Path(args.out_dir) / f"{stage}_{args.mode}_{device}.json"
        left = deadline - time.monotonic()
        if EXPECTED_S[stage] > left:
            rows.append(
                summary_row(stage, f"skipped: {EXPECTED_S[stage]} s expected, {left:.0f} s left", 0, out)
            )
            continue
        cmd = [
            sys.executable,
            str(Path(__file__).with_name(f"{stage}.py")),
            *_stage_argv(stage, args, device, out),
        ]
        if stage == "ppo":
            cmd += ["--budget-s", str(int(min(left, EXPECTED_S["ppo"])))]
        start = time.monotonic()
        before = out.stat().st_mtime if out.exists() else None
        try:
            proc = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                status += ": " + " / ".join(tail)[:300]
            sys.stdout.write(proc.stdout[-2000:])
        except subprocess.TimeoutExpired:
            status = f"cut off at the budget ({left:.0f} s)"
        fresh = out.exists() and out.stat().st_mtime != before
        rows.append(
            summary_row(stage, status, time.monotonic() - start, out if fresh else Path("/nonexistent"))
        )
        print(f"--- {stage}: {rows[-1]['status']}, {rows[-1]['seconds']} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="bench/run_all.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["smoke", "real"], default="smoke")
    p.add_argument("--model", choices=["qwen2.5-0.5b", "qwen2.5-1.5b"], default="qwen2.5-0.5b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--out-dir", default="bench/results", help="relative to the working directory")
    p.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--budget-s", type=float, default=None, help="run in priority order within N seconds")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if common.torch.cuda.is_available() else "cpu")
    default = [s for s in PRIORITY if s != "scaling"] if args.budget_s else STAGES
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else default
    for stage in stages:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if args.budget_s is not None:
        rows = run_budgeted(stages, args, device)
        print_table(rows)
        return {r["stage"]: r for r in rows}
    results, rows = {}, []
    for stage in stages:
        module = __import__(f"bench.{stage}", fromlist=["main"])
        out = Path(args.out_dir) / f"{stage}_{args.mode}_{device}.json"
        start = time.perf_counter()
        results[stage] = module.main(_stage_argv(stage, args, device, out))
        rows.append(summary_row(stage, "ok", time.perf_counter() - start, out))
        print(f"--- {stage}: {rows[-1]['seconds']} s", flush=True)
    print_table(rows)
    return results


if __name__ == "__main__":
    main()
