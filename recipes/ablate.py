"""Ablations: every combination of swept config keys x seeds, trained, evaluated and reported.

    python recipes/ablate.py --config recipes/configs/ablate/ptx_kl.yaml \
        [--grid ptx_coef=0,0.5,2 kl_coef=0.01,0.04,0.1] [--seeds 2] [--jobs N] [--out DIR]

With no --config: the embedded default sweep (recipes/configs/ablate/ptx_kl.yaml). Resumable: run it again
and finished runs are skipped. Writes results.csv, report.md, tradeoff.png and curves.png (align/pipeline/ablate.py).
"""

import argparse
import sys
from pathlib import Path

from align.config_loader import ConfigError
from align.pipeline.ablate import load_sweep, parse_grid, run_sweep

DEFAULT = Path(__file__).resolve().parent / "configs" / "ablate" / "ptx_kl.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recipes/ablate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT), help="sweep YAML (recipe, config, grid, eval, out)")
    parser.add_argument(
        "--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="swept keys (replace the file's)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per setting (default: the file's, or 1)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="runs at a time (default: one per GPU, or cores/2)"
    )
    parser.add_argument("--out", default=None, help="output directory (default: the file's `out`)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(
            args.config, grid=parse_grid(args.grid), seeds=args.seeds, out=args.out, jobs=args.jobs
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = run_sweep(sweep, jobs=args.jobs)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} runs ok; report: {sweep.out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
