"""Run every benchmark stage in one process and list the results.

    python bench/run_all.py --mode smoke --device cpu          # the CPU smoke run (tests use it)
    python bench/run_all.py --mode real --device cuda --model qwen2.5-0.5b

Each stage writes ``<out-dir>/<stage>_<mode>_<device>.json`` (scaling also a PNG).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

STAGES = ["sft", "dpo", "rm", "ppo", "generate", "scaling"]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="bench/run_all.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["smoke", "real"], default="smoke")
    p.add_argument("--model", choices=["qwen2.5-0.5b", "qwen2.5-1.5b"], default="qwen2.5-0.5b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--out-dir", default="bench/results", help="relative to the working directory")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    args = p.parse_args(argv)
    device = args.device or ("cuda" if common.torch.cuda.is_available() else "cpu")
    results = {}
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        module = __import__(f"bench.{stage}", fromlist=["main"])
        out = Path(args.out_dir) / f"{stage}_{args.mode}_{device}.json"
        start = time.perf_counter()
        results[stage] = module.main(
            ["--mode", args.mode, "--model", args.model, "--device", device, "--out", str(out)]
        )
        print(f"--- {stage}: {time.perf_counter() - start:.1f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
