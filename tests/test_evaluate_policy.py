"""Policy evaluation: win rates and intervals, LM loss / perplexity, KL, the held-out tax text, end to end."""

import json
import math

import pytest
import torch

from align.evaluation.policy import (
    compare_policies,
    lm_loss,
    sequence_kl,
    wilson_interval,
    win_counts,
    win_rate,
)
from align.ptx import load_text, stdlib_text, text_split


def test_win_counts_with_ties_and_tolerance():
    # 1 > 0 win; 2 = 2 tie; 3 < 5 loss; |4 - 4.05| <= 0.1 tie
    assert win_counts([1, 2, 3, 4], [0, 2, 5, 4.05], tol=0.1) == (1, 2, 1)
    assert win_counts([1, 2, 3, 4], [0, 2, 5, 4.05]) == (1, 1, 2)
    with pytest.raises(ValueError, match="unpaired"):
        win_counts([1, 2], [1])


def test_wilson_interval_matches_scipy_and_textbook():
    from scipy.stats import binomtest

    # Textbook value: 8 of 10 -> [0.4902, 0.9433].
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    for k, n in [(0, 12), (7, 48), (24, 48), (48, 48)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-6)


def test_win_rate_counts_ties_as_half():
    # 6 wins, 4 ties, 10 losses: rate (6 + 2) / 20 = 0.4, interval = Wilson(8 of 20).
    policy = [1.0] * 6 + [0.5] * 4 + [0.0] * 10
    baseline = [0.0] * 6 + [0.5] * 4 + [1.0] * 10
    w = win_rate(policy, baseline)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (6, 4, 10, 20)
    assert w["rate"] == pytest.approx(0.4)
    assert (w["lo"], w["hi"]) == pytest.approx(wilson_interval(8, 20))
    assert w["lo"] == pytest.approx(0.2188, abs=1e-4) and w["hi"] == pytest.approx(0.6134, abs=1e-4)
    # All ties: exactly one half.
    assert win_rate([1, 0, 1], [1, 0, 1])["rate"] == 0.5


def test_sequence_kl_on_worked_logprobs():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.2), 0.0, 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.9)], [math.log(0.4), 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # row 0: ln(0.5/0.25) + ln(0.25/0.25) = ln 2; row 1: ln(0.2/0.4) = -ln 2 (padding ignored)
    assert sequence_kl(logp, ref, mask).tolist() == pytest.approx([math.log(2), -math.log(2)])


class BigramLM(torch.nn.Module):
    """Logits depend only on the current token: a fixed table, so the loss can be worked by hand."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_lm_loss_is_token_weighted_on_a_worked_model():
    model = BigramLM([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    rows = [[0, 1, 2], [1, 1]]
    # predicted: p(1|0) = 1/4, p(2|1) = 1/2, p(1|1) = 1/4 -> loss = (ln 4 + ln 2 + ln 4) / 3 = 5 ln 2 / 3.
    expected = 5 * math.log(2) / 3
    for bs in (1, 2):
        r = lm_loss(model, rows, batch_size=bs)
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
        assert r["ppl"] == pytest.approx(2 ** (5 / 3), rel=1e-6)
        assert r["tokens"] == 3
    # A row-mean would be (1.5 ln 2 + 2 ln 2) / 2 = 1.75 ln 2: the token-weighted loss is not that.
    assert r["loss"] != pytest.approx(1.75 * math.log(2))


def test_lm_loss_of_a_tiny_qwen_matches_per_row_cross_entropy(tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    rows = [[5, 17, 300, 9, 11, 2000], [42, 7, 7], [100, 200, 300, 400, 500]]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one unpadded row at a time, torch's cross-entropy: an independent path
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum"))
            count += len(row) - 1
    r = lm_loss(model, rows, batch_size=2)
    assert r["tokens"] == count == 11
    assert r["loss"] == pytest.approx(total / count, rel=1e-5)


def test_tax_text_is_disjoint_from_the_ptx_stream():
    train, heldout = stdlib_text(split="train"), stdlib_text(split="heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(stdlib_text())
    assert all(text_split(t) == "heldout" for t in heldout)
    assert load_text("embedded") == train  # PPO's ptx term reads the train split
    with pytest.raises(ValueError, match="split"):
        stdlib_text(split="test")


def test_compare_policies_of_a_model_with_itself_is_neutral(tiny_qwen_dir, qwen_tokenizer, tmp_path):
    from align.reward import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel.from_backbone(
        tiny_qwen_dir, end_token_id=qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"), seed=0
    ).save_pretrained(rm_dir, qwen_tokenizer)
    kw = dict(
        reward_model=rm_dir, num_prompts=4, max_new_tokens=6, batch_size=4, tax_max_rows=4, device="cpu"
    )
    r = compare_policies(
        tiny_qwen_dir, tiny_qwen_dir, out_dir=tmp_path / "ev", cache_dir=tmp_path / "c", **kw
    )
    # Same weights: every pair ties, KL and tax are exactly zero.
    for key in ("win_rate_rm", "win_rate_gold"):
        assert r[key]["ties"] == 4 and r[key]["rate"] == 0.5
    assert r["kl_to_baseline"] == pytest.approx(0.0, abs=1e-6)
    assert r["tax"]["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6) and r["tax"]["accuracy_delta"] == 0
    assert r["tax"]["tokens"] == 4 * 63
    assert r["response_length"]["policy"] == r["response_length"]["baseline"] > 0
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["win_rate_rm"] == r["win_rate_rm"]
    assert "win rate, reward model: 50.0%" in (tmp_path / "ev" / "eval.md").read_text()
    # The baseline side was cached; a second run reads it and gives the same result.
    assert len(list((tmp_path / "c").glob("baseline-*.json"))) == 1
    again = compare_policies(
        tiny_qwen_dir, tiny_qwen_dir, out_dir=tmp_path / "ev2", cache_dir=tmp_path / "c", **kw
    )
    assert again["rm_score"] == r["rm_score"] and again["tax"] == r["tax"]


def _command(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "eval" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eval_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("policy", ["--policy", "no/such/dir", "--no-reward-model"], "--policy no/such/dir: no such file"),
        ("win_rate", ["--policy", "no/such/dir", "--no-reward-model"], "--policy no/such/dir: no such file"),
        ("alignment_tax", ["--policy", "no/such/dir"], "--policy no/such/dir: no such file"),
        ("alignment_tax", ["--policy", ".", "--text", "missing.jsonl"], "--text missing.jsonl: no such file"),
        ("policy", ["--policy", ".", "--reward-model", ".", "--num-prompts", "0"], "must be >= 1"),
    ],
)
def test_eval_commands_exit_2_with_one_line_on_bad_input(name, extra, message, tmp_path, capsys):
    code = _command(name)(["--baseline", ".", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_win_rate_and_tax_commands_end_to_end_on_a_tiny_model(tiny_qwen_dir, tmp_path):
    common = ["--policy", str(tiny_qwen_dir), "--baseline", str(tiny_qwen_dir), "--num-prompts", "2",
              "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    assert _command("win_rate")([*common, "--no-reward-model", "--out", str(tmp_path / "wr")]) == 0
    wr = json.loads((tmp_path / "wr" / "win_rate.json").read_text())
    assert wr["win_rate_gold"]["ties"] == 2 and wr["win_rate_rm"] is None and "tax" not in wr
    assert _command("alignment_tax")([*common, "--max-rows", "2", "--out", str(tmp_path / "tax")]) == 0
    tax = json.loads((tmp_path / "tax" / "tax.json").read_text())
    assert tax["delta_lm_loss"] == 0.0 and tax["before"]["tokens"] == 2 * 63
    assert "held-out LM loss" in (tmp_path / "tax" / "tax.md").read_text()


def test_mcnemar_exact_on_worked_numbers_and_scipy():
    from scipy.stats import binomtest

    from align.evaluation.policy import mcnemar_exact

    # 9 tasks gained, 1 lost: 2 x (C(10,0) + C(10,1)) / 2^10 = 22/1024.
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    for gained, lost in [(30, 12), (5, 0), (2, 17)]:
        assert mcnemar_exact(gained, lost) == pytest.approx(binomtest(gained, gained + lost, 0.5).pvalue)


def test_paired_accuracy_counts_discordant_tasks():
    from align.evaluation.policy import paired_accuracy

    before = [True, True, False, False, False, True, False, False, False, False]
    after = [True, False, True, True, True, True, True, False, False, True]
    r = paired_accuracy(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (10, 5, 1)
    assert r["before"] == pytest.approx(0.3) and r["after"] == pytest.approx(0.7)
    assert r["delta"] == pytest.approx(0.4)
    # paired Wald half-width: 1.96 x sqrt(6 - 16/10) / 10
    assert r["delta_hi"] - r["delta"] == pytest.approx(1.959963984540054 * math.sqrt(4.4) / 10)
    assert r["p_mcnemar"] == pytest.approx(2 * 7 / 64)  # (C(6,0) + C(6,1)) / 2^6, twice
    assert (r["after_lo"], r["after_hi"]) == pytest.approx(wilson_interval(7, 10))


def test_paired_by_prompt_counts_each_distinct_prompt_once():
    from align.evaluation.policy import mcnemar_exact, paired_by_prompt

    # Prompt "a" asked 7 times and gained each time, "b" lost once, "c" right on both sides twice.
    ids = ["a"] * 7 + ["b", "c", "c"]
    before = [False] * 7 + [True, True, True]
    after = [True] * 7 + [False, True, True]
    r = paired_by_prompt(ids, before, after)
    assert (r["n"], r["gained"], r["lost"], r["repeats"], r["inconsistent"]) == (3, 1, 1, 7, 0)
    assert r["p_mcnemar"] == 1.0
    # Per task the same verdicts read 7 gained / 1 lost: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 0.0703.
    assert mcnemar_exact(7, 1) == pytest.approx(2 * 9 / 256)
    # Repeats judged differently are counted (first verdict kept), not hidden.
    r = paired_by_prompt(["a", "a", "b"], [False, False, True], [True, False, True])
    assert (r["n"], r["gained"], r["lost"], r["inconsistent"]) == (2, 1, 0, 1)
    with pytest.raises(ValueError, match="3 prompts, 2 before"):
        paired_by_prompt(["a", "b", "c"], [True, False], [True, False])


def test_portable_path_holds_no_machine_prefix(tmp_path):
    from align.evaluation.policy import REPO_ROOT, portable_path

    out = tmp_path / "run" / "eval"
    (tmp_path / "model").mkdir()
    (tmp_path / "run" / "eval" / "final").mkdir(parents=True)
    assert portable_path(REPO_ROOT / "align" / "tasks.py", out) == "align/tasks.py"  # inside the repository
    assert portable_path(tmp_path / "model", out) == "../../model"  # outside it: from the report's directory
    assert portable_path(tmp_path / "run" / "eval" / "final", out) == "./final"
    assert portable_path("smollm2-135m-instruct", out) == "smollm2-135m-instruct"  # an alias, kept


def test_per_task_records_recompute_the_paired_test(tmp_path, monkeypatch):
    from conftest import build_tiny_qwen2, byte_tokenizer

    import align.evaluation.policy as ev
    from align.evaluation.policy import mcnemar_exact
    from align.tasks import generate_tasks

    # Random models never answer right; a rule on the text makes some replies "correct" on either side.
    monkeypatch.setattr(ev, "verify", lambda task, reply: len(reply) % 2 == 0)
    # Byte-level models (259 ids): their tokenizer loads in milliseconds, Qwen's 151k vocabulary in seconds.
    base = build_tiny_qwen2(byte_tokenizer(), tmp_path / "base", seed=0)
    other = build_tiny_qwen2(byte_tokenizer(), tmp_path / "other", seed=1)
    r = compare_policies(other, base, reward_model=None, out_dir=tmp_path / "ev", num_prompts=12,
                         max_new_tokens=5, batch_size=12, tax_max_rows=0, device="cpu")  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "ev" / "per_task.jsonl").read_text().splitlines()]
    tasks = generate_tasks(12, seed=0, split="heldout")
    assert [(x["prompt"], x["answer"], x["key"]) for x in lines] == [
        (t.prompt, t.answer, t.key) for t in tasks
    ]
    for x in lines:
        assert x["policy_correct"] == (len(x["policy"]) % 2 == 0)
        assert x["baseline_correct"] == (len(x["baseline"]) % 2 == 0)
    gained = sum(x["policy_correct"] and not x["baseline_correct"] for x in lines)
    lost = sum(x["baseline_correct"] and not x["policy_correct"] for x in lines)
    paired = r["gold_paired"]
    assert (paired["gained"], paired["lost"]) == (gained, lost) and gained + lost > 0
    assert paired["p_mcnemar"] == mcnemar_exact(gained, lost)
    assert r["gold_accuracy"]["policy"] == sum(x["policy_correct"] for x in lines) / 12
    # The report names the models relative to itself (they live outside the repository), never absolutely.
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (saved["policy"], saved["baseline"]) == ("../other", "../base")
    assert r["gold_paired_by_prompt"]["repeats"] == 0  # 12 distinct prompts: the two tests agree
    assert (r["gold_paired_by_prompt"]["gained"], r["gold_paired_by_prompt"]["lost"]) == (gained, lost)

    # Each task asked twice (shuffled into one batch with other lengths): greedy answers repeat exactly, so
    # the per-prompt test counts half the discordant tasks, and no repeat is judged differently.
    from align.tasks import write_tasks_jsonl

    twice = tasks[:6] + tasks[5::-1]
    write_tasks_jsonl(tmp_path / "twice.jsonl", twice)
    r2 = compare_policies(other, base, reward_model=None, out_dir=tmp_path / "ev2", num_prompts=12,
                          max_new_tokens=5, batch_size=12, tax_max_rows=0, device="cpu",
                          prompts_file=tmp_path / "twice.jsonl")  # fmt: skip
    by_prompt, per_task = r2["gold_paired_by_prompt"], r2["gold_paired"]
    assert (by_prompt["n"], by_prompt["repeats"], by_prompt["inconsistent"]) == (6, 6, 0)
    assert (per_task["gained"], per_task["lost"]) == (2 * by_prompt["gained"], 2 * by_prompt["lost"])
    assert "12 tasks ask 6 distinct prompts (6 repeats)" in (tmp_path / "ev2" / "eval.md").read_text()
