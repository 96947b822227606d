"""eval/answer_moves.py: answer moves and the RM's score landscape on worked numbers, and the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest

from align.evaluation.moves import answer_moves, right_by_kind, score_landscape


def _task(base, pol, base_ok, pol_ok, base_rm=0.0, pol_rm=0.0):
    return {"baseline": base, "policy": pol, "baseline_correct": base_ok, "policy_correct": pol_ok,
            "baseline_rm": base_rm, "policy_rm": pol_rm}  # fmt: skip


ROWS = [
    _task("5", "5", False, False),  # unchanged
    _task("5", "4", False, True),  # gained
    _task("4", "6", True, False),  # lost
    _task("12", "48", False, False, -3.0, -1.0),  # wrong -> wrong, RM +2
    _task("tURP", "PRUT", False, False, 1.0, 0.5),  # wrong -> wrong, RM -0.5
]


def test_answer_moves_on_worked_numbers():
    m = answer_moves(ROWS)
    assert {k: m[k] for k in ("tasks", "changed", "gained", "lost", "wrong_to_wrong", "wrong_to_wrong_rm_up")} == {
        "tasks": 5, "changed": 4, "gained": 1, "lost": 1, "wrong_to_wrong": 2, "wrong_to_wrong_rm_up": 1,
    }  # fmt: skip
    assert m["wrong_to_wrong_share"] == 0.5 and m["wrong_to_wrong_rm_change"] == pytest.approx(0.75)


def test_right_by_kind_on_worked_numbers():
    kinds = ["count_letters", "multiply", "multiply", "convert", "multiply"]
    rows = [dict(row, kind=kind) for row, kind in zip(ROWS, kinds, strict=True)]
    # multiply: gained (wrong -> right), lost (right -> wrong), wrong -> wrong
    assert right_by_kind(rows) == {
        "convert": {"tasks": 1, "before": 0, "after": 0},
        "count_letters": {"tasks": 1, "before": 0, "after": 0},
        "multiply": {"tasks": 3, "before": 1, "after": 1},
    }
    assert list(right_by_kind(rows)) == ["convert", "count_letters", "multiply"]


def test_score_landscape_on_worked_numbers():
    rows = [
        # wrong "3" twice (one distinct answer), wrong "7", right "5"; the unclosed wrong "9" is left out
        {"samples": ["3", "3", "7", "5", "9"], "correct": [False, False, False, True, False],
         "scores": [1.0, 1.0, -3.0, 2.0, 50.0], "finished": [True, True, True, True, False]},
        # two right answers (mean 0.5) under a wrong one at 1.0
        {"samples": ["a", "a", "b"], "correct": [True, True, False], "scores": [0.0, 1.0, 1.0],
         "finished": [True, True, True]},
        # one wrong answer only: neither a range nor a lead
        {"samples": ["x"], "correct": [False], "scores": [0.0], "finished": [True]},
    ]  # fmt: skip
    s = score_landscape(rows)
    assert s["prompts"] == 3 and s["prompts_with_distinct_wrong"] == 1
    assert s["median_wrong_range"] == 4.0  # 1.0 - (-3.0)
    assert s["prompts_with_right_and_wrong"] == 2
    assert s["median_right_lead"] == pytest.approx((1.0 + -0.5) / 2)  # leads 2 - 1 and 0.5 - 1
    assert s["share_best_wrong_at_least_mean_right"] == 0.5


def _main():
    spec = importlib.util.spec_from_file_location(
        "answer_moves", Path(__file__).parents[1] / "eval/answer_moves.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_reads_records_and_refuses_a_missing_file(tmp_path, capsys):
    record = tmp_path / "seed-1"
    record.mkdir()
    kinds = ["add", "add", "add", "uppercase", "uppercase"]
    rows = [dict(row, kind=kind) for row, kind in zip(ROWS, kinds, strict=True)]
    (record / "per_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _main()(["--records", str(record)]) == 0
    out = capsys.readouterr().out
    assert "| 4 of 5 | 2 (50%) | 1 / 1 | 1 | +0.75 |" in out and "by_kind" not in out
    assert _main()(["--records", str(record), "--by-kind"]) == 0
    out = capsys.readouterr().out
    assert "| record | add | uppercase |" in out and "| 1 -> 1 of 3 | 0 -> 0 of 2 |" in out
    assert _main()(["--gate", str(tmp_path)]) == 2
    assert "samples.jsonl: no such file" in capsys.readouterr().err
    assert _main()([]) == 2
