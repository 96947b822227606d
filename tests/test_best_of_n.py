"""The best-of-n gate: the selection and the table on worked numbers; eval/best_of_n.py end to end on a tiny
policy and a tiny reward model, its numbers recomputed from the samples it records."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from test_sample_pairs import build_stopping_policy

from align.evaluation.policy import Z95, wilson_interval
from align.pipeline.best_of_n import best_of_k, best_of_n_by_kind, best_of_n_table, kind_of, ks_up_to

SCORES = [[0.1, 0.9, 0.3, 0.9], [2.0, 1.0, 3.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
CORRECT = [[False, True, False, False], [True, False, False, True], [False, False, False, True]]


def test_best_of_k_picks_the_first_highest_of_the_first_k():
    assert best_of_k(SCORES, 1) == [0, 0, 0]
    assert best_of_k(SCORES, 2) == [1, 0, 0]
    assert best_of_k(SCORES, 4) == [1, 2, 0]  # 0.9 twice: the first; all tied: the first
    with pytest.raises(ValueError, match="best-of-5 needs 5 samples"):
        best_of_k(SCORES, 5)
    assert ks_up_to(8) == [1, 2, 4, 8] and ks_up_to(6) == [1, 2, 4, 6] and ks_up_to(1) == [1]


def test_best_of_n_table_on_worked_numbers():
    t = best_of_n_table(SCORES, CORRECT, greedy_correct=[True, False, False], greedy_scores=[1.0, 2.0, 3.0])
    assert (t["prompts"], t["n"]) == (3, 4)
    assert t["greedy"]["accuracy"] == pytest.approx(1 / 3) and t["greedy"]["rm_score"] == pytest.approx(2.0)
    # Mean sample: shares 1/4, 2/4, 1/4 -> 1/3; its interval is Wilson's with 1 success of 3.
    assert t["mean_sample"]["accuracy"] == pytest.approx(1 / 3)
    assert (t["mean_sample"]["lo"], t["mean_sample"]["hi"]) == pytest.approx(wilson_interval(1.0, 3))
    assert t["mean_sample"]["rm_score"] == pytest.approx(4.2 / 12)
    # Best-of-1 picks (0, 0, 0): F T F; best-of-2 (1, 0, 0): T T F; best-of-4 (1, 2, 0): T F F.
    assert {k: x["accuracy"] for k, x in t["best_of"].items()} == pytest.approx(
        {"1": 1 / 3, "2": 2 / 3, "4": 1 / 3}
    )
    assert {k: x["rm_score"] for k, x in t["best_of"].items()} == pytest.approx(
        {"1": 1.1 / 3, "2": 1.9 / 3, "4": 2.9 / 3}
    )
    assert (t["best_of"]["2"]["lo"], t["best_of"]["2"]["hi"]) == pytest.approx(wilson_interval(2, 3))
    # Any correct among the first k: F T F; T T F; T T T.
    assert {k: x["accuracy"] for k, x in t["any_correct_of"].items()} == pytest.approx(
        {"1": 1 / 3, "2": 2 / 3, "4": 1.0}
    )
    # Gain of best-of-4 over the mean sample: d = (1 - 1/4, 0 - 2/4, 0 - 1/4) = (0.75, -0.5, -0.25), mean 0.
    half = Z95 * math.sqrt((0.75**2 + 0.5**2 + 0.25**2) / 2) / math.sqrt(3)
    assert t["gain"]["k"] == 4 and t["gain"]["points"] == pytest.approx(0.0, abs=1e-12)
    assert (t["gain"]["lo"], t["gain"]["hi"]) == pytest.approx((-100 * half, 100 * half))


def test_best_of_n_by_kind_on_worked_numbers():
    # Prompts 0 and 2 are "add", prompt 1 "count". Best-of-4 picks (1, 2, 0): T F F.
    t = best_of_n_by_kind(["add", "count", "add"], SCORES, CORRECT, greedy_correct=[True, False, False])
    assert list(t) == ["add", "count"]
    # add: greedy T F -> 1/2; shares 1/4 and 1/4 -> 1/4; best-of-4 T F -> 1/2: reaches greedy (a tie counts).
    assert t["add"] == {
        "prompts": 2,
        "greedy": 0.5,
        "mean_sample": 0.25,
        "best_of_n": 0.5,
        "rm_reaches_greedy": True,
    }
    # count: greedy F -> 0; share 2/4; best-of-4 picks sample 2, wrong -> 0: still reaches greedy's 0.
    assert t["count"]["best_of_n"] == 0.0 and t["count"]["rm_reaches_greedy"] is True
    t = best_of_n_by_kind(["add", "add", "count"], SCORES, CORRECT, greedy_correct=[True, True, False])
    # add: greedy 2/2, best-of-4 T F -> 1/2: the RM's favourite is wrong more often than greedy.
    assert t["add"]["best_of_n"] == 0.5 and t["add"]["rm_reaches_greedy"] is False
    with pytest.raises(ValueError, match="one entry per prompt"):
        best_of_n_by_kind(["add"], SCORES, CORRECT, [True, False, False])
    assert kind_of({"key": "count_letters:nest"}) == "count_letters"
    assert kind_of({"key": "x:y", "kind": "user"}) == "user"


def test_best_of_n_table_refuses_ragged_input():
    with pytest.raises(ValueError, match="same shape"):
        best_of_n_table([[1.0, 2.0]], [[True]])
    with pytest.raises(ValueError, match="same number"):
        best_of_n_table([[1.0, 2.0], [1.0]], [[True, False], [True]])


def _main():
    path = Path(__file__).resolve().parent.parent / "eval" / "best_of_n.py"
    spec = importlib.util.spec_from_file_location("eval_best_of_n", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _gate(tmp_path, rm_dir, seed):
    """Run the gate (4 held-out prompts, 4 samples of at most 6 tokens) from the stopping policy; its report
    and sample rows."""
    policy = build_stopping_policy(tmp_path / "policy")
    out = tmp_path / "bon"
    args = ["--policy", str(policy), "--reward-model", str(rm_dir), "--out", str(out), "--num-prompts", "4",
            "--n", "4", "--max-new-tokens", "6", "--seed", str(seed), "--device", "cpu"]  # fmt: skip
    assert _main()(args) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return out, json.loads((out / "best_of_n.json").read_text()), rows


def test_eval_best_of_n_end_to_end(tiny_rm_dir, tmp_path, capsys):
    import chatml
    from align.reward import RewardModel
    from align.tasks import generate_tasks, verify

    out, result, rows = _gate(tmp_path, tiny_rm_dir, seed=3)
    policy = tmp_path / "policy"
    tasks = generate_tasks(4, seed=3, split="heldout")
    assert [r["key"] for r in rows] == [t.key for t in tasks]
    # The recorded verdicts are the gold verifier's, and the table is the one the samples give.
    for task, r in zip(tasks, rows, strict=True):
        assert r["correct"] == [verify(task, s) for s in r["samples"]]
        assert r["greedy_correct"] == verify(task, r["greedy"])
    table = best_of_n_table(
        [r["scores"] for r in rows], [r["correct"] for r in rows],
        [r["greedy_correct"] for r in rows], [r["greedy_score"] for r in rows],
    )  # fmt: skip
    for key in ("greedy", "mean_sample", "best_of", "any_correct_of", "gain", "prompts", "n"):
        assert result[key] == table[key]
    assert list(result["best_of"]) == ["1", "2", "4"]
    assert [r["kind"] for r in rows] == [t.kind for t in tasks]
    assert result["by_kind"] == best_of_n_by_kind(
        [t.kind for t in tasks], [r["scores"] for r in rows], [r["correct"] for r in rows],
        [r["greedy_correct"] for r in rows],
    )  # fmt: skip
    assert sum(x["prompts"] for x in result["by_kind"].values()) == 4
    assert "| kind | prompts | greedy |" in (out / "best_of_n.md").read_text()
    # A recorded score is the reward model's on prompt + response (closed replies are read at <|im_end|>).
    rm = RewardModel.from_pretrained(tiny_rm_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    r, j = next((r, j) for r in rows for j, ok in enumerate(r["finished"]) if ok)
    task = tasks[rows.index(r)]
    ids = chatml.encode_prompt(task.messages, tokenizer, default_system=rm.config.default_system)
    ids += tokenizer(r["samples"][j], add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    with torch.no_grad():
        assert rm(torch.tensor([ids])).rewards.item() == pytest.approx(r["scores"][j], abs=1e-5)
    assert (out / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "best_of_n.md").read_text()
    assert "| best-of-4 by RM |" in md and "Best-of-4 vs the mean sample" in md
    assert result["policy"] == "../policy"  # relative to the report, no machine path
    assert "Best-of-4 vs the mean sample" in capsys.readouterr().out


def test_eval_best_of_n_refuses_bad_input_in_one_line(tmp_path, capsys):
    code = _main()(["--policy", ".", "--reward-model", "no/such/rm", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --reward-model no/such/rm: no such file or directory"
    assert _main()(["--policy", ".", "--reward-model", ".", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_rescore_judges_the_gate_samples_with_another_reward_model(tiny_rm_dir, tiny_byte_dir, tmp_path):
    from transformers import AutoTokenizer

    import chatml
    from align.reward import RewardModel

    gate, gate_result, gate_rows = _gate(tmp_path, tiny_rm_dir, seed=5)

    def rescore(src, rm_dir, out):
        assert _main()(["--rescore", str(src), "--reward-model", str(rm_dir), "--out", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        return json.loads((out / "best_of_n.json").read_text()), rows

    # The same RM on the recorded token ids gives back the gate's scores and table.
    same, rows = rescore(gate, tiny_rm_dir, tmp_path / "same")
    assert same["response_ids"] == "stored" and same["rescored_from"] == "../bon"
    assert same["policy"] == "../policy" and same["seed"] == 5
    for a, b in zip(gate_rows, rows, strict=True):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
        assert b["greedy_score"] == pytest.approx(a["greedy_score"], abs=1e-5)
    assert same["best_of"] == gate_result["best_of"] and same["gain"] == pytest.approx(gate_result["gain"])
    assert same["by_kind"] == gate_result["by_kind"]

    # Another RM (a new head, seed 1): samples and gold verdicts kept, every score that RM's on the ids.
    tokenizer = AutoTokenizer.from_pretrained(tiny_byte_dir)
    _, im_end = chatml.chatml_token_ids(tokenizer)
    other = RewardModel.from_backbone(tiny_byte_dir, end_token_id=im_end, seed=1)
    other_dir = other.save_pretrained(tmp_path / "rm-1", tokenizer)
    result, rows = rescore(gate, other_dir, tmp_path / "other")
    other.eval()
    for a, b in zip(gate_rows, rows, strict=True):
        assert (b["samples"], b["correct"], b["sample_ids"]) == (a["samples"], a["correct"], a["sample_ids"])
        prompt = chatml.encode_prompt(a["messages"], tokenizer, default_system=other.config.default_system)
        for ids, closed, score in zip(a["sample_ids"], a["finished"], b["scores"], strict=True):
            if closed:  # an unclosed reply gets the RM's placeholder, not a judgement
                with torch.no_grad():
                    assert other(torch.tensor([prompt + ids])).rewards.item() == pytest.approx(
                        score, abs=1e-5
                    )
    assert any(
        b["scores"] != pytest.approx(a["scores"], abs=1e-3) for a, b in zip(gate_rows, rows, strict=True)
    )
    table = best_of_n_table([r["scores"] for r in rows], [r["correct"] for r in rows],
                            [r["greedy_correct"] for r in rows], [r["greedy_score"] for r in rows])  # fmt: skip
    assert all(result[k] == table[k] for k in ("greedy", "mean_sample", "best_of", "any_correct_of", "gain"))

    # A gate written before ids and messages were recorded: the texts are re-encoded (closed ones end in
    # <|im_end|>) and the prompts rebuilt from the gate's seed; a row whose text re-encodes to its sampled
    # ids scores as before.
    old = tmp_path / "old-gate"
    old.mkdir()
    (old / "best_of_n.json").write_text((gate / "best_of_n.json").read_text())
    stripped = [
        {k: v for k, v in r.items() if k not in ("sample_ids", "greedy_ids", "messages")} for r in gate_rows
    ]
    (old / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    result, rows = rescore(old, tiny_rm_dir, tmp_path / "old-same")
    assert result["response_ids"] == "re-encoded"
    checked = 0
    for a, b in zip(gate_rows, rows, strict=True):
        for text, ids, closed, before, after in zip(
            a["samples"], a["sample_ids"], a["finished"], a["scores"], b["scores"], strict=True
        ):
            if tokenizer(text, add_special_tokens=False)["input_ids"] + [im_end] * closed == ids:
                assert after == pytest.approx(before, abs=1e-5)
                checked += 1
    assert checked >= 4

    # The policy gone from disk: its ids cannot be checked against the RM's vocabulary, so the text is
    # re-encoded, and the report says so.
    (tmp_path / "policy").rename(tmp_path / "policy-moved")
    result, _ = rescore(gate, tiny_rm_dir, tmp_path / "no-policy")
    assert result["response_ids"] == "re-encoded" and result["policy"] == "../policy"


def test_rescore_refuses_a_directory_that_is_not_a_gate_and_sampling_options(tiny_rm_dir, tmp_path, capsys):
    code = _main()(
        ["--rescore", str(tmp_path), "--reward-model", str(tiny_rm_dir), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: no best_of_n.json (not a best-of-n gate's output directory)"
    args = ["--rescore", str(tmp_path), "--reward-model", str(tiny_rm_dir), "--out", str(tmp_path / "o"),
            "--n", "4", "--temperature", "0.7"]  # fmt: skip
    assert _main()(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --rescore reads the gate's samples as they are; --n, --temperature cannot apply"
    assert not (tmp_path / "o").exists()  # nothing written on a refusal
