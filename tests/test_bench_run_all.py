"""bench/run_all.py --budget-s: priority order, skipping what no longer fits, one table (no stage runs here)."""

import json

from bench import run_all


def test_budget_skips_stages_that_do_not_fit_in_priority_order(tmp_path, capsys):
    rows = run_all.main(
        [
            "--mode",
            "real",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
            "--budget-s",
            "5",
            "--stages",
            "rm,ppo,sft",
        ]
    )
    assert list(rows) == ["sft", "ppo", "rm"]  # PRIORITY order, not the order asked
    for stage, row in rows.items():
        assert row["status"].startswith(f"skipped: {run_all.EXPECTED_S[stage]} s expected")
    table = capsys.readouterr().out
    assert "| stage | status |" in table and table.count("| skipped:") == 3
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_summary_row_reads_the_stage_json(tmp_path):
    out = tmp_path / "sft_real_cuda.json"
    out.write_text(
        json.dumps(
            {
                "unit": "tokens_per_s",
                "ours": {"tokens_per_s": 3.0},
                "peer": {"tokens_per_s": 2.0},
                "ratio_ours_over_peer": 1.5,
            }
        )
    )
    row = run_all.summary_row("sft", "ok", 12.34, out)
    assert (row["ours"], row["peer"], row["ratio_ours_over_peer"], row["seconds"]) == (3.0, 2.0, 1.5, 12.3)
    packed = tmp_path / "packed_rows_real_cuda.json"
    packed.write_text(json.dumps({"per_token_ratio_longest_vs_shortest": 1.02}))
    assert run_all.summary_row("packed_rows", "ok", 1.0, packed)["ours"] == 1.02
