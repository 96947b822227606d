"""One table of training arms over seeds, from their evaluation records, with the pooled paired test.

    python eval/arms.py --root docs/rlhf-embedded --arms ppo dpo grpo-rm grpo-verifier

Reads ``<root>/<arm>/seed-<N>/`` (``eval.json`` and ``per_task.jsonl`` from ``eval/policy.py``, and
``run.json`` with ``train_seconds`` when present); writes ``arms.md`` (a row per seed, a pooled row per
arm), ``arms.json`` and ``arms.png`` into ``--out`` (default: ``--root``). Exit status 0, or 2 when a
record is unusable (missing file, counts that disagree, seeds of one arm on different tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from align.evaluation.arms import arms_markdown, load_arms, plot_arms, pool_arm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/arms.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory holding <arm>/seed-<N>/ records")
    parser.add_argument("--arms", nargs="+", required=True, help="arm names, in table order")
    parser.add_argument("--out", default=None, help="where arms.md/.json/.png go (default: --root)")
    args = parser.parse_args(argv)
    out = Path(args.out or args.root)
    try:
        arms = load_arms(args.root, args.arms)
        pooled = {arm: pool_arm(recs) for arm, recs in arms.items() if recs}
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = arms_markdown(arms)
    (out / "arms.md").write_text(table)
    seeds = {
        arm: [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("task_keys", "baseline_correct")}
              | {"delta": r.delta} for r in recs]
        for arm, recs in arms.items()
    }  # fmt: skip
    (out / "arms.json").write_text(json.dumps({"seeds": seeds, "pooled": pooled}, indent=2) + "\n")
    if pooled:
        plot_arms(arms, out / "arms.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
