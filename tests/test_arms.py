"""eval/arms.py: seed records read back, checked against their per-task lines, and pooled (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.evaluation.arms import arms_markdown, load_arms, load_seed_record, pool_arm

REPO = Path(__file__).resolve().parents[1]


def write_record(seed_dir: Path, before: list[bool], after: list[bool], keys: list[str] | None = None,
                 claim: tuple[int, int] | None = None, train_seconds: float | None = 600.0) -> None:  # fmt: skip
    """A record as eval/policy.py writes it; ``claim`` overrides eval.json's gained/lost (a corrupt one)."""
    seed_dir.mkdir(parents=True)
    keys = keys or [f"k{i}" for i in range(len(before))]
    gained = sum(a and not b for b, a in zip(before, after, strict=True))
    lost = sum(b and not a for b, a in zip(before, after, strict=True))
    if claim is not None:
        gained, lost = claim
    result = {
        "gold_paired": {"n": len(before), "gained": gained, "lost": lost},
        "kl_to_baseline": 0.25,
        "unfinished": {"policy": 0.0, "baseline": 0.0},
        "rm_score": {"policy": 1.5, "baseline": 0.5},
    }
    (seed_dir / "eval.json").write_text(json.dumps(result))
    with (seed_dir / "per_task.jsonl").open("w") as fh:
        for k, b, a in zip(keys, before, after, strict=True):
            fh.write(json.dumps({"key": k, "prompt": k, "baseline_correct": b, "policy_correct": a}) + "\n")
    if train_seconds is not None:
        (seed_dir / "run.json").write_text(json.dumps({"train_seconds": train_seconds}))


def verdicts(gained: int, lost: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    before = [False] * gained + [True] * lost + [True] * both + [False] * neither
    after = [True] * gained + [False] * lost + [True] * both + [False] * neither
    return before, after


def test_a_seed_record_is_recomputed_from_its_tasks(tmp_path):
    before, after = verdicts(gained=5, lost=2, both=3, neither=10)
    write_record(tmp_path / "ppo" / "seed-7", before, after)
    rec = load_seed_record(tmp_path / "ppo" / "seed-7")
    assert (rec.arm, rec.seed, rec.n, rec.gained, rec.lost) == ("ppo", 7, 20, 5, 2)
    assert rec.before == pytest.approx(5 / 20) and rec.after == pytest.approx(8 / 20)
    assert rec.delta == pytest.approx(3 / 20)
    # exact McNemar on 5 vs 2: 2 * (C(7,0) + C(7,1) + C(7,2)) / 2^7 = 2 * 29 / 128
    assert rec.p_mcnemar == pytest.approx(58 / 128)
    assert rec.train_seconds == 600.0


def test_a_record_whose_json_disagrees_with_its_tasks_is_refused(tmp_path):
    before, after = verdicts(gained=5, lost=2, both=3, neither=10)
    write_record(tmp_path / "ppo" / "seed-1", before, after, claim=(6, 2))
    with pytest.raises(ValueError, match="gained=6 .* gained=5"):
        load_seed_record(tmp_path / "ppo" / "seed-1")


def test_seeds_pool_by_summing_discordant_counts(tmp_path):
    # Same tasks and start (one `before` for both): seed 1 gains 5 and loses 2, seed 2 gains 3 and loses 4.
    before = [False] * 5 + [True] * 4 + [False] * 11
    after1 = [True] * 5 + [False, False, True, True] + [False] * 11
    after2 = [True, True, True, False, False] + [False] * 4 + [False] * 11
    write_record(tmp_path / "ppo" / "seed-1", before, after1, train_seconds=600.0)
    write_record(tmp_path / "ppo" / "seed-2", before, after2, train_seconds=1200.0)
    arms = load_arms(tmp_path, ["ppo", "dpo"])
    assert arms["dpo"] == []
    pooled = pool_arm(arms["ppo"])
    assert (pooled["gained"], pooled["lost"]) == (3 + 5, 4 + 2)
    # exact McNemar on 8 vs 6: 2 * sum_{k<=6} C(14,k) / 2^14 = 2 * 6476 / 16384
    assert pooled["p_pooled"] == pytest.approx(2 * 6476 / 16384)
    assert pooled["delta_mean"] == pytest.approx(((5 - 2) / 20 + (3 - 4) / 20) / 2)
    assert pooled["delta_min"] == pytest.approx(-1 / 20)
    assert pooled["train_seconds_mean"] == 900.0
    table = arms_markdown(arms)
    assert "| ppo | 1 | 20.0% | 35.0% | +15.0 | 5 / 2 |" in table
    assert "**+5.0** (min -5.0) | 8 / 6 | **0.791** (pooled)" in table
    assert "| dpo | not run |" in table


def test_repeated_prompts_are_pooled_once_per_seed_beside_the_per_task_test(tmp_path):
    # 10 tasks asking 4 prompts: "a" four times (gained), "b" three times (gained), "c" twice (lost), "d" once.
    keys = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]
    before = [False] * 7 + [True, True, False]
    after = [True] * 7 + [False, False, False]
    write_record(tmp_path / "ppo" / "seed-1", before, after, keys=keys)
    write_record(tmp_path / "ppo" / "seed-2", before, after, keys=keys)
    rec = load_arms(tmp_path, ["ppo"])["ppo"]
    assert (rec[0].gained, rec[0].lost) == (7, 2)
    assert rec[0].by_prompt == {
        "n": 4,
        "gained": 2,
        "lost": 1,
        "p_mcnemar": 1.0,
        "repeats": 6,
        "inconsistent": 0,
    }
    pooled = pool_arm(rec)
    assert (pooled["gained"], pooled["lost"], pooled["gained_by_prompt"], pooled["lost_by_prompt"]) == (
        14,
        4,
        4,
        2,
    )
    # exact McNemar on 14 vs 4: 2 * (1 + 18 + 153 + 816 + 3060) / 2^18; on 4 vs 2: 2 * (1 + 6 + 15) / 64
    assert pooled["p_pooled"] == pytest.approx(2 * 4048 / 2**18)
    assert pooled["p_pooled_by_prompt"] == pytest.approx(2 * 22 / 64)
    assert "| **0.0309** (pooled) | 0.688 (4 / 2 of 4) |" in arms_markdown({"ppo": rec})


def test_seeds_on_different_tasks_are_not_pooled(tmp_path):
    before, after = verdicts(gained=1, lost=0, both=1, neither=2)
    write_record(tmp_path / "grpo" / "seed-1", before, after)
    write_record(tmp_path / "grpo" / "seed-2", before, after, keys=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="seed 2: its tasks or baseline verdicts differ"):
        pool_arm(load_arms(tmp_path, ["grpo"])["grpo"])


def test_the_cli_writes_the_table_and_exits_2_on_a_bad_record(tmp_path):
    before, after = verdicts(gained=4, lost=1, both=2, neither=3)
    write_record(tmp_path / "dpo" / "seed-1", before, after)
    run = [sys.executable, str(REPO / "eval" / "arms.py"), "--root", str(tmp_path), "--arms", "dpo"]
    done = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "arms.json").read_text())["pooled"]["dpo"]["gained"] == 4
    assert (tmp_path / "arms.png").stat().st_size > 0
    assert "| dpo | 1 | 30.0% | 60.0% | +30.0 | 4 / 1 |" in (tmp_path / "arms.md").read_text()
    (tmp_path / "dpo" / "seed-1" / "per_task.jsonl").write_text("{not json\n")
    done = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "per_task.jsonl:1: invalid JSON" in done.stderr
