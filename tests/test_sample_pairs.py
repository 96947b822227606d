"""Rejection-sampled preference pairs: pairing order, merging and checker results on worked numbers; runs on a
tiny byte-level policy with a user's `module:function` checker, the embedded verifier and a reward model,
whose written pairs must equal those recomputed from the recorded samples; a checker that fails stops the
run at its prompt's file:line and keeps what was written."""

import importlib
import json
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_qwen2

from align.config_loader import ConfigError, load_config
from align.data import DataError, load_preference
from align.data.pairing import (
    checker_value,
    correct_incorrect_pairs,
    import_checker,
    merge_candidates,
    score_pairs,
)
from align.pipeline.sample_pairs import SamplePairsConfig, run_sample_pairs

P_STOP = 0.3  # the stopping policy's chance of <|im_end|> at every step

CHECKS = '''
def answer_or_even(record, response):
    """Correct when the reply holds the integer answer, or (so random replies split) has an even length."""
    return str(record["answer"]) in response or len(response) % 2 == 0

def boom(record, response):
    if record["answer"] == 3:
        raise ValueError("cannot parse the answer")
    return answer_or_even(record, response)

def words(record, response):
    return "yes" if record["answer"] == 24 else True
'''

PROMPTS = [
    {"prompt": "What is 2 + 3?", "answer": 5, "reference": "5"},
    {"prompt": "What is 4 * 6?", "answer": 24},
    {
        "messages": [{"role": "user", "content": "What is 10 - 7?"}],
        "answer": 3,
        "reference": "The answer is 3.",
    },
]


def build_stopping_policy(out):
    """A tiny byte-level Qwen2 whose next token ignores the context: <|im_end|> with probability P_STOP,
    else uniform over the other ids, so replies are short random strings and some never close.

    Attention and MLP outputs are zeroed and every embedding is the first unit vector, so the final norm
    gives sqrt(hidden) on dimension 0 at every position; only <|im_end|>'s head row reads it."""
    tokenizer = byte_tokenizer()
    model = tiny_qwen2(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        others = len(tokenizer) - 1
        model.lm_head.weight[im_end, 0] = math.log(P_STOP / (1 - P_STOP) * others) / math.sqrt(hidden)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stopping_dir(tmp_path_factory):
    return build_stopping_policy(tmp_path_factory.mktemp("stopping"))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A prompt file of three small math questions and a checker module on sys.path."""
    import sys

    root = tmp_path_factory.mktemp("user")
    (root / "sp_checks.py").write_text(CHECKS)
    prompts = root / "math.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    sys.path.insert(0, str(root))
    yield prompts
    sys.path.remove(str(root))


def _cfg(policy, out, **kw):
    base = dict(
        model_name_or_path=str(policy), output_dir=str(out), samples_per_query=6, max_new_tokens=6,
        batch_size=64, progress=False, seed=7,
    )  # fmt: skip
    base.update(kw)
    return SamplePairsConfig(**base)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _norm(text):
    return text.strip()


def _expected_pairs(reference, samples, closed, is_correct, cap):
    """The documented pairing, written out independently: distinct replies by normalised text in first
    occurrence order (the reference first), correct = label and (closed or unclosed allowed), every
    (correct, incorrect) pair in square-shell order, at most `cap`."""
    texts, closed_of = [], {}
    if reference is not None:
        texts.append(reference)
        closed_of[_norm(reference)] = True
    for text, ok in zip(samples, closed, strict=True):
        if _norm(text) not in closed_of:
            texts.append(text)
            closed_of[_norm(text)] = False
        closed_of[_norm(text)] |= ok
    good = [t for t in texts if is_correct(t, closed_of[_norm(t)])]
    bad = [t for i, t in enumerate(texts) if t not in good and not (reference is not None and i == 0)]
    order = sorted(((i, j) for i in range(len(good)) for j in range(len(bad))), key=lambda p: (max(p), p))
    correct_samples = sum(1 for text in samples if _norm(text) in {_norm(t) for t in good})
    return [(good[i], bad[j]) for i, j in order[:cap]], correct_samples


# ---------------------------------------------------------------------------------------------------------
# Worked numbers
# ---------------------------------------------------------------------------------------------------------


def test_correct_incorrect_pairs_come_in_square_shells():
    assert correct_incorrect_pairs(2, 3, None) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]
    assert correct_incorrect_pairs(2, 3, 3) == [(0, 0), (0, 1), (1, 0)]
    assert correct_incorrect_pairs(0, 4, None) == [] and correct_incorrect_pairs(3, 0, 2) == []


def test_score_pairs_take_the_largest_differences_first():
    scores = [0.5, 2.0, -1.0, 2.0]
    # differences >= 1 with a strict win: 1>2 and 3>2 by 3.0, then 0>2, 1>0, 3>0 by 1.5; 1 vs 3 ties.
    assert score_pairs(scores, 1.0, None) == [(1, 2), (3, 2), (0, 2), (1, 0), (3, 0)]
    assert score_pairs(scores, 1.0, 1) == [(1, 2)]  # the best-vs-worst pair
    assert score_pairs(scores, 2.0, None) == [(1, 2), (3, 2)]
    assert score_pairs([1.0, 1.0], 0.0, None) == []


def test_merge_candidates_joins_duplicates_and_the_reference():
    texts = ["5", " 5\n", "6", "5.", "6"]
    closed = [False, True, False, False, True]
    cands, which = merge_candidates(texts, closed, reference="5")
    assert [(c.text, c.samples, c.closed, c.is_reference) for c in cands] == [
        ("5", 2, True, True),  # both spellings of the reference merged into it
        ("6", 2, True, False),  # closed: one of its two samples closed
        ("5.", 1, False, False),  # a trailing period is another reply
    ]
    assert which == [0, 0, 1, 2, 1]


def test_checker_value_accepts_bools_and_finite_numbers_only():
    import numpy as np

    assert [checker_value(v) for v in (True, False, np.bool_(True), 3, 0.25)] == [1.0, 0.0, 1.0, 3.0, 0.25]
    for bad, shown in [("yes", "str 'yes'"), (None, "NoneType None"), (float("nan"), "float nan")]:
        with pytest.raises(ValueError, match=f"returned {shown}, not a bool or a finite number"):
            checker_value(bad)


def test_import_checker_names_what_is_missing(user_files):
    assert import_checker("sp_checks:answer_or_even")({"answer": 5}, "x5") is True
    with pytest.raises(ConfigError, match="cannot import module 'no_such_checks'"):
        import_checker("no_such_checks:fn")
    with pytest.raises(ConfigError, match="module 'sp_checks' has no attribute 'nope'"):
        import_checker("sp_checks:nope")
    with pytest.raises(ConfigError, match="not of the form module:function"):
        import_checker("sp_checks.answer_or_even")


def test_the_embedded_config_loads():
    cfg = load_config(SamplePairsConfig, "recipes/configs/sample_pairs/embedded.yaml")
    assert (cfg.reward, cfg.dataset, cfg.embedded_split, cfg.samples_per_query) == (
        "verifier",
        "embedded",
        "train",
        8,
    )


# ---------------------------------------------------------------------------------------------------------
# Runs on the tiny stopping policy
# ---------------------------------------------------------------------------------------------------------


def test_user_prompts_with_a_checker_give_the_recomputed_pairs(stopping_dir, user_files, tmp_path):
    from align.models import load_tokenizer

    sp_checks = importlib.import_module("sp_checks")  # written by the user_files fixture, not a dependency
    from align.rollout.batch import HFRolloutEngine

    out = tmp_path / "out"
    cap = 5
    cfg = _cfg(stopping_dir, out, dataset=str(user_files), reward="checker", checker="sp_checks:answer_or_even",
               max_pairs_per_prompt=cap)  # fmt: skip
    report = run_sample_pairs(cfg)
    samples = _lines(out / "samples.jsonl")
    # The recorded samples are the policy's: one engine call (3 prompts x 6 <= batch_size) with seed 7.
    tokenizer = load_tokenizer(str(stopping_dir))
    import chatml
    from align.evaluation.policy import load_lm

    prompt_ids = [chatml.encode_prompt(m, tokenizer, default_system="template") for m in
                  [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 4 * 6?"}],
                   PROMPTS[2]["messages"]]]  # fmt: skip
    engine = HFRolloutEngine(load_lm(stopping_dir, "cpu"), tokenizer, batch_size=64, logprobs="none")
    fresh = engine.generate(prompt_ids, n=6, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=7)
    assert [s for rec in samples for s in rec["samples"]] == fresh.texts(tokenizer)
    assert [f for rec in samples for f in rec["finished"]] == fresh.finished.tolist()
    assert 0 < sum(fresh.finished.tolist()) < 18  # some replies closed, some were cut

    expected, correct = [], 0
    for group, (prompt, rec) in enumerate(zip(PROMPTS, samples, strict=True)):
        assert rec["source"] == f"{user_files}:{group + 1}" and rec["group"] == group
        reference = prompt.get("reference")

        def ok(text, closed, prompt=prompt):
            return closed and sp_checks.answer_or_even(prompt, text)

        pairs, n_correct = _expected_pairs(reference, rec["samples"], rec["finished"], ok, cap)
        correct += n_correct
        for a, b in pairs:
            messages = prompt.get("messages") or [{"role": "user", "content": prompt["prompt"]}]
            expected.append((messages, a, b, group, a == reference))
    written = _lines(out / "pairs.jsonl")
    assert [
        (
            r["prompt"],
            r["chosen"][0]["content"],
            r["rejected"][0]["content"],
            r["group"],
            r["chosen_is_reference"],
        )
        for r in written
    ] == expected
    assert expected  # the draw gives pairs to check
    # The format recipes/rm.py and recipes/dpo.py read.
    pairs, data_report = load_preference(out / "pairs.jsonl")
    assert len(pairs) == len(written) and data_report.formats == {"pair": len(written)}
    # The report's counts are the samples' counts.
    per_prompt = [sum(1 for r in written if r["group"] == g) for g in range(3)]
    assert (report["prompts"], report["samples"], report["pairs"]) == (3, 18, len(written))
    assert report["share_correct"] == pytest.approx(correct / 18)
    assert report["prompts_without_pair"] == per_prompt.count(0)
    assert report["pairs_per_prompt"]["max"] == max(per_prompt) <= cap
    assert json.loads((out / "report.json").read_text()) == report
    assert "| pairs per prompt |" in (out / "report.md").read_text()


def test_embedded_prompts_with_the_verifier_pair_the_answer_against_wrong_samples(stopping_dir, tmp_path):
    from align.tasks import generate_tasks, verify

    out = tmp_path / "out"
    run_sample_pairs(_cfg(stopping_dir, out, dataset="embedded", embedded_prompts=4, embedded_seed=3,
                          max_pairs_per_prompt=3))  # fmt: skip
    tasks = generate_tasks(4, seed=3, split="train")
    samples = _lines(out / "samples.jsonl")
    expected = []
    for group, (task, rec) in enumerate(zip(tasks, samples, strict=True)):
        assert rec["source"] == f"embedded:train:seed3:{group}" and rec["reference"] == task.answer

        def ok(text, closed, task=task):
            return closed and verify(task, text)

        expected += [(task.messages, a, b, group) for a, b in _expected_pairs(task.answer, rec["samples"],
                                                                               rec["finished"], ok, 3)[0]]  # fmt: skip
    written = _lines(out / "pairs.jsonl")
    got = [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["group"]) for r in written]
    assert got == expected and len(got) == 4 * 3  # random replies are wrong: the answer against the first 3
    assert all(r["chosen_is_reference"] for r in written)


def test_greedy_duplicates_are_merged_into_one_reply(stopping_dir, tmp_path):
    out = tmp_path / "out"
    report = run_sample_pairs(
        _cfg(stopping_dir, out, dataset="embedded", embedded_prompts=3, temperature=0.0)
    )
    samples = _lines(out / "samples.jsonl")
    # Greedy: the 6 samples of a prompt are one reply, candidate 1 (0 is the reference).
    assert all(rec["candidate"] == [1] * 6 and len(set(rec["samples"])) == 1 for rec in samples)
    assert report["distinct_responses"] == 3 and report["pairs"] == 3
    assert [r["rejected"][0]["content"] for r in _lines(out / "pairs.jsonl")] == [
        rec["samples"][0] for rec in samples
    ]


@pytest.mark.parametrize(
    ("checker", "line", "message"),
    [
        ("sp_checks:boom", 3, "checker sp_checks:boom raised ValueError: cannot parse the answer"),
        ("sp_checks:words", 2, "checker sp_checks:words returned str 'yes', not a bool or a finite number"),
    ],
)
def test_a_failing_checker_stops_at_its_prompt_and_keeps_what_was_written(
    stopping_dir, user_files, tmp_path, checker, line, message
):
    out = tmp_path / "out"
    cfg = _cfg(
        stopping_dir,
        out,
        dataset=str(user_files),
        reward="checker",
        checker=checker,
        unclosed_incorrect=False,
    )
    with pytest.raises(DataError) as err:
        run_sample_pairs(cfg)
    assert str(err.value).startswith(f"{user_files}:{line}: {message} (response ")
    # The prompts before it are on disk, in full; the report says where it stopped.
    samples = _lines(out / "samples.jsonl")
    assert [rec["group"] for rec in samples] == list(range(line - 1))
    assert {r["group"] for r in _lines(out / "pairs.jsonl")} <= set(range(line - 1))
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"] == line - 1 and report["stopped"]["where"] == f"{user_files}:{line}"
    assert message in report["stopped"]["error"]


def test_a_missing_checker_is_refused_before_sampling(stopping_dir, user_files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="module 'sp_checks' has no attribute 'missing'"):
        run_sample_pairs(
            _cfg(stopping_dir, out, dataset=str(user_files), reward="checker", checker="sp_checks:missing")
        )
    assert not out.exists()
    with pytest.raises(ConfigError, match="reward=checker needs checker=module:function"):
        run_sample_pairs(_cfg(stopping_dir, out, dataset=str(user_files), reward="checker"))


def test_the_recipe_exits_2_with_one_line(stopping_dir, user_files, tmp_path, capsys):
    from align.train.recipe import run_recipe

    argv = [f"model_name_or_path={stopping_dir}", f"dataset={user_files}", "reward=checker",
            "checker=sp_checks:missing", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    assert run_recipe(SamplePairsConfig, run_sample_pairs, argv=argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: checker: module 'sp_checks' has no attribute 'missing'"


def test_a_reward_model_labels_by_score(stopping_dir, tiny_rm_dir, tmp_path):
    import chatml
    from align.reward import RewardModel
    from align.tasks import generate_tasks

    out = tmp_path / "out"
    cfg = _cfg(stopping_dir, out, dataset="embedded", embedded_prompts=3, reward="model",
               reward_model_path=str(tiny_rm_dir), max_pairs_per_prompt=4)  # fmt: skip
    report = run_sample_pairs(cfg)
    tasks = generate_tasks(3, seed=43, split="train")
    rm = RewardModel.from_pretrained(tiny_rm_dir).eval()
    tokenizer = byte_tokenizer()
    written = _lines(out / "pairs.jsonl")
    for group, (task, rec) in enumerate(zip(tasks, _lines(out / "samples.jsonl"), strict=True)):
        # The reference is scored as the RM reads a conversation: prompt + answer + <|im_end|>.
        conversation = [*task.messages, {"role": "assistant", "content": task.answer}]
        ids = chatml.encode_conversation(conversation, tokenizer)["input_ids"]
        ids = ids[: len(ids) - ids[::-1].index(tokenizer.convert_tokens_to_ids("<|im_end|>"))]  # read there
        with torch.no_grad():
            ref_score = rm(torch.tensor([ids])).rewards.item()
        assert rec["candidate_scores"][0] == pytest.approx(ref_score, abs=1e-5)
        # Candidates: the reference, then distinct readable samples with their first score.
        scored = {_norm(task.answer): (task.answer, ref_score)}
        for text, score, ok in zip(rec["samples"], rec["scores"], rec["readable"], strict=True):
            if ok and _norm(text) not in scored:
                scored[_norm(text)] = (text, score)
        cands = list(scored.values())
        pairs = sorted(
            ((a, b) for a in range(len(cands)) for b in range(len(cands)) if cands[a][1] > cands[b][1]),
            key=lambda p: (-(cands[p[0]][1] - cands[p[1]][1]), p),
        )[:4]
        got = [
            (r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in written if r["group"] == group
        ]
        assert got == [(cands[a][0], cands[b][0]) for a, b in pairs]
        assert all(r["chosen_score"] > r["rejected_score"] for r in written)
    assert report["pairs"] == len(written) > 0 and report["share_correct"] is None
