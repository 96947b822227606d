"""Where a policy's greedy answers moved, and what the reward model rewards among wrong answers.

    python eval/answer_moves.py --records docs/rlhf-embedded/ppo-kind-gate/seed-2 docs/rlhf-embedded/ppo/seed-1
    python eval/answer_moves.py --gate outputs/best_of_n/validation-round3

``--records``: evaluation records (directories with eval/policy.py's ``per_task.jsonl``); per record the
changed answers, gained, lost, wrong -> wrong and the RM's score change on those, and (``--by-kind``)
the tasks right before -> after per task kind. ``--gate``: a best-of-n
gate's output (``samples.jsonl``); the spread of the RM's scores among one prompt's wrong answers against
the right answer's lead (``align.evaluation.moves``). Prints a Markdown table and JSON. Exit status: 0, or
2 for a missing file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from align.data import DataError
from align.data.sources import iter_jsonl_values
from align.evaluation.moves import answer_moves, right_by_kind, score_landscape


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [row for _, row in iter_jsonl_values(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/answer_moves.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records", nargs="*", default=[], metavar="DIR", help="evaluation record directories"
    )
    parser.add_argument("--gate", default=None, metavar="DIR", help="a best-of-n gate's output directory")
    parser.add_argument(
        "--by-kind", action="store_true", help="with --records: tasks right before -> after per task kind"
    )
    args = parser.parse_args(argv)
    if not args.records and not args.gate:
        print("error: give --records, --gate or both", file=sys.stderr)
        return 2
    result: dict = {}
    try:
        rows = {d: _rows(Path(d) / "per_task.jsonl") for d in args.records}
        if args.gate:
            result["landscape"] = score_landscape(_rows(Path(args.gate) / "samples.jsonl"))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    moves = {d: answer_moves(r) for d, r in rows.items()}
    if moves:
        result["moves"] = moves
        print(
            "| record | changed | wrong -> wrong | gained / lost | RM up on wrong -> wrong | mean RM change |"
        )
        print("|---|---|---|---|---|---|")
        for d, m in moves.items():
            print(
                f"| {d} | {m['changed']} of {m['tasks']} | {m['wrong_to_wrong']} ({100 * m['wrong_to_wrong_share']:.0f}%)"
                f" | {m['gained']} / {m['lost']} | {m['wrong_to_wrong_rm_up']} | {m['wrong_to_wrong_rm_change']:+.2f} |"
            )
    if args.by_kind and rows:
        by_kind = {d: right_by_kind(r) for d, r in rows.items()}
        result["by_kind"] = by_kind
        kinds = sorted({k for table in by_kind.values() for k in table})
        print("\n| record | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for d, table in by_kind.items():
            cells = [
                f"{table[k]['before']} -> {table[k]['after']} of {table[k]['tasks']}" if k in table else "-"
                for k in kinds
            ]
            print(f"| {d} | " + " | ".join(cells) + " |")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
