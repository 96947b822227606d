"""The benchmark harness runs end to end in smoke mode on CPU and writes complete, consistent records.

No timing is asserted: only that each record has every field, that ours and the peer did the same work,
and that the ratio is the one the two figures give.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MACHINE_FIELDS = {"device", "name", "torch", "transformers", "trl", "cpu_count"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every stage in smoke mode on CPU (PPO without its TRL 1.12 peer, which needs a separate install)."""
    from bench import ppo, run_all

    out = tmp_path_factory.mktemp("bench")
    run_all.main(
        [
            "--mode",
            "smoke",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
            "--stages",
            "sft,dpo,rm,generate,scaling",
        ]
    )
    ppo.main(
        ["--mode", "smoke", "--device", "cpu", "--out", str(out / "ppo_smoke_cpu.json")]
        + ["--trl112", str(out / "no-trl-here")]
    )
    return out


def _record(out: Path, stage: str) -> dict:
    return json.loads((out / f"{stage}_smoke_cpu.json").read_text())


def _check_common(rec: dict, stage: str, unit: str, peer_expected: bool = True) -> None:
    assert rec["stage"] == stage and rec["mode"] == "smoke" and rec["unit"] == unit
    assert set(rec["machine"]) >= MACHINE_FIELDS and rec["machine"]["device"] == "cpu"
    assert rec["command"].startswith(f"python bench/{stage}.py") and "--mode smoke" in rec["command"]
    assert rec["date"]
    sides = [rec["ours"], rec["peer"]] if peer_expected else [rec["ours"]]
    for side in sides:
        assert side["name"]
        assert isinstance(side[unit], float | int) and side[unit] > 0
        assert isinstance(side["peak_memory_above_start_mb"], float | int)
        assert "resident set size" in side["memory_method"]
    if peer_expected:
        ours, peer = rec["ours"][unit], rec["peer"][unit]
        # A speed-up either way: rates compare ours / peer, durations peer / ours.
        want = peer / ours if "peer seconds" in rec["ratio_meaning"] else ours / peer
        assert rec["ratio_ours_over_peer"] == pytest.approx(want, rel=2e-3)


def test_sft_record_same_tokens_both_sides(smoke):
    rec = _record(smoke, "sft")
    _check_common(rec, "sft", "tokens_per_s")
    tokens = rec["setting"]["dataset_tokens"]
    # One epoch each: both trained every token of the same data, TRL's packing and ours alike.
    assert rec["ours"]["tokens_processed"] == rec["peer"]["tokens_processed"] == tokens
    assert "TRL" in rec["peer"]["name"] and "SFTTrainer" in rec["peer"]["name"]
    assert rec["ours"]["mfu_peak"].startswith("no MFU on CPU")


def test_dpo_record_same_pairs_and_same_token_ids(smoke):
    rec = _record(smoke, "dpo")
    _check_common(rec, "dpo", "pairs_per_s")
    n = rec["setting"]["pairs_total"]
    assert rec["ours"]["pairs_processed"] == rec["peer"]["pairs_processed"] == n
    assert rec["peer"]["tokenised_like_ours"] is True  # TRL's own tokenisation gave our ids
    assert rec["ours"]["reference_pass_seconds"] > 0  # the one-off reference pass is in our figure


def test_rm_record_same_pairs(smoke):
    rec = _record(smoke, "rm")
    _check_common(rec, "rm", "pairs_per_s")
    assert rec["ours"]["pairs_processed"] == rec["peer"]["pairs_processed"] == rec["setting"]["pairs_total"]


def test_generate_record_same_batch_and_budget(smoke):
    rec = _record(smoke, "generate")
    _check_common(rec, "generate", "tokens_per_s")
    s = rec["setting"]
    most = s["batch"] * s["new_tokens"] * s["repeats"]  # timed calls only
    for side in (
        rec["ours"],
        rec["peer"],
        rec["ours"]["also_HFRolloutEngine"],
        rec["ours"]["also_ManualRolloutEngine"],
    ):
        assert side["calls"] == s["repeats"] + 1
        assert 0 < side["tokens_generated"] <= most
    # The refill comparison: more prompts than slots, every side generating for all of them.
    refill = s["refill"]
    assert refill["prompts"] == s["refill_factor"] * s["batch"]
    for side in (refill["ours"], refill["manual"], refill["peer"]):
        assert side["calls"] == s["repeats"] + 1
        assert (
            refill["prompts"] * s["repeats"]
            <= side["tokens_generated"]
            <= refill["prompts"] * most // s["batch"]
        )
    want = refill["ours"]["tokens_per_s"] / refill["peer"]["tokens_per_s"]
    assert refill["ratio_ours_over_peer"] == pytest.approx(want, rel=2e-3)


def test_ppo_record_without_peer_says_why(smoke):
    rec = _record(smoke, "ppo")
    _check_common(rec, "ppo", "seconds_per_iteration", peer_expected=False)
    assert rec["peer"] is None and rec["ratio_ours_over_peer"] is None
    assert "pip install --no-deps --target" in rec["note"] and "trl==1.12.0" in rec["note"]
    s = rec["setting"]
    assert rec["ours"]["responses"] == s["responses"]
    assert 0 < rec["ours"]["response_tokens"] <= s["responses"] * s["new_tokens"]
    parts = sum(rec["ours"][k] for k in ("time_rollout", "time_scoring", "time_training"))
    assert rec["ours"]["seconds_per_iteration"] == pytest.approx(parts, abs=1e-3)


def test_scaling_record_and_plot(smoke):
    rec = json.loads((smoke / "scaling_smoke_cpu.json").read_text())
    sweep = rec["sweep"]
    assert [(p["model"], p["length"]) for p in rec["points"]] == [
        (m, n) for m in sweep["models"] for n in sweep["lengths"]
    ]
    for p in rec["points"]:
        assert p["tokens_per_s"] > 0 and p["documents_per_step"] == max(
            1, sweep["tokens_per_step"] // p["length"]
        )
    png = smoke / rec["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
