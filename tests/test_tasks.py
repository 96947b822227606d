"""The embedded task generator and its gold verifier."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align import tasks as T
from align.tasks import (
    KINDS,
    Task,
    generate_tasks,
    preference_pairs,
    prompts,
    sft_conversations,
    verify,
    write_preference_jsonl,
    write_sft_jsonl,
    wrong_answer,
)


def _prompt_key(task: Task) -> str:
    return json.dumps(task.messages, sort_keys=True)


def test_deterministic_per_seed():
    a = generate_tasks(60, seed=3)
    b = generate_tasks(60, seed=3)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    c = generate_tasks(60, seed=4)
    assert [t.to_json() for t in a] != [t.to_json() for t in c]


def test_prefix_stable_and_balanced():
    big = generate_tasks(5 * len(KINDS) + 4, seed=1)
    small = generate_tasks(2 * len(KINDS) + 3, seed=1)
    assert [t.to_json() for t in small] == [t.to_json() for t in big[: len(small)]]
    counts = Counter(t.kind for t in big)
    assert set(counts) == set(KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_kind_filter_and_errors():
    ts = generate_tasks(20, seed=0, kinds=["add", "compare"])
    assert {t.kind for t in ts} == {"add", "compare"}
    # A kind's stream does not depend on which other kinds are asked for.
    only_add = [t.to_json() for t in generate_tasks(5, seed=0, kinds=["add"])]
    assert only_add == [t.to_json() for t in ts if t.kind == "add"][:5]
    with pytest.raises(ValueError, match="unknown task kinds"):
        generate_tasks(3, seed=0, kinds=["poetry"])
    with pytest.raises(ValueError, match="split"):
        generate_tasks(3, seed=0, split="test")
    assert generate_tasks(0, seed=0) == []


def test_heldout_never_coincides_with_train():
    train = [t for s in range(3) for t in generate_tasks(900, seed=s)]
    held = [t for s in range(3) for t in generate_tasks(300, seed=s, split="heldout")]
    assert all(t.split == "train" for t in train) and all(t.split == "heldout" for t in held)
    assert not {t.key for t in train} & {t.key for t in held}
    assert not {_prompt_key(t) for t in train} & {_prompt_key(t) for t in held}
    for t in train[:50] + held[:50]:
        assert T.split_of_key(t.key) == t.split
    # Held-out covers every kind too.
    assert {t.kind for t in held} == set(KINDS)


def test_distinct_within_a_call_when_space_allows():
    ts = generate_tasks(10 * len(KINDS), seed=5)
    for kind in KINDS:
        keys = [t.key for t in ts if t.kind == kind]
        assert len(keys) == len(set(keys)), kind


def test_task_shapes_and_answers():
    for t in generate_tasks(9 * 20, seed=2):
        assert t.messages[-1]["role"] == "user"
        assert t.match in T.MATCH_MODES
        assert t.answer and t.answer == t.answer.strip()
        m = t.meta
        if t.kind == "add":
            assert int(t.answer) == m["a"] + m["b"]
        elif t.kind == "subtract":
            assert int(t.answer) == m["a"] - m["b"] >= 0
        elif t.kind == "multiply":
            assert int(t.answer) == m["a"] * m["b"]
        elif t.kind == "convert":
            assert int(t.answer) == m["x"] * m["factor"]
        elif t.kind == "uppercase":
            assert t.answer == m["word"].upper()
        elif t.kind == "reverse":
            assert t.answer == m["word"][::-1] != m["word"]
        elif t.kind == "count_letters":
            assert int(t.answer) == len(m["word"])
        elif t.kind == "compare":
            truth = m["a"] > m["b"] if m["relation"] == "greater" else m["a"] < m["b"]
            assert t.answer == ("yes" if truth else "no")
        elif t.kind == "followup":
            # The final answer depends on the earlier turn, whose answer is in the conversation.
            assert [x["role"] for x in t.messages] == ["user", "assistant", "user"]
            assert t.messages[1]["content"] == str(m["first"])
            assert int(t.answer) == T.FOLLOWUPS[m["followup"]][1](m["first"])
            assert t.messages[2]["content"].startswith("Now ")
        # The format is stated in the prompt.
        assert t.prompt.endswith((T.NUMBER_SUFFIX, T.WORD_SUFFIX, T.YESNO_SUFFIX))


def test_conversations_are_short():
    import chatml

    tok = chatml.qwen_tokenizer()
    lengths = [
        len(chatml.encode_conversation(c, tok)["input_ids"])
        for c in sft_conversations(generate_tasks(3 * len(KINDS), seed=0))
    ]
    assert max(lengths) <= 64, max(lengths)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_accepts_canonical_with_tolerated_decoration(kind):
    for t in generate_tasks(8, seed=11, kinds=[kind]):
        a = t.answer
        for variant in (a, f" {a}", f"{a}\n", f"{a}.", f"  {a}. \n", f"\t{a} ."):
            assert verify(t, variant), (variant, t)
        for bad in ("", ".", f"The answer is {a}.", f"{a}!", f"{a}..", f"{a} {a}", f'"{a}"', f"{a}\nok"):
            assert not verify(t, bad), (bad, t)


def test_verify_value_rules():
    add = Task("add", [{"role": "user", "content": "x"}], "1068", "number", "k")
    assert verify(add, "1,068") and verify(add, "1068.") and not verify(add, "1,06,8")
    assert not verify(add, "1067") and not verify(add, "1068.0") and not verify(add, "one thousand")
    up = Task("uppercase", [{"role": "user", "content": "x"}], "APPLE", "exact", "k")
    assert verify(up, "APPLE") and not verify(up, "Apple") and not verify(up, "apple")
    yn = Task("compare", [{"role": "user", "content": "x"}], "no", "yesno", "k")
    assert verify(yn, "No.") and verify(yn, "NO")
    assert not verify(yn, "yes") and not verify(yn, "No, it is not.")
    assert not verify(add, None)  # type: ignore[arg-type]
    assert T.rewards([add, up], ["1068", "apple"]) == [1.0, 0.0]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    kind=st.sampled_from(KINDS),
    rng_seed=st.integers(0, 2**32),
    heldout=st.booleans(),
)
def test_wrong_answer_is_rejected_and_canonical_accepted(seed, kind, rng_seed, heldout):
    (t,) = generate_tasks(1, seed=seed, kinds=[kind], split="heldout" if heldout else "train")
    rng = random.Random(rng_seed)
    assert verify(t, t.answer)
    for _ in range(5):
        wrong = wrong_answer(t, rng)
        assert wrong.strip() and not verify(t, wrong), (t, wrong)
    fmt = wrong_answer(t, rng, format_error_rate=1.0)
    assert t.answer in fmt and not verify(t, fmt)


def test_wrong_answers_are_plausible():
    # Same format as the answer: numbers for numeric tasks, yes/no flipped, words of letters.
    rng = random.Random(0)
    for t in generate_tasks(200, seed=7):
        w = wrong_answer(t, rng)
        if t.match == "number":
            assert w.isdigit()
        elif t.match == "yesno":
            assert {w, t.answer} == {"yes", "no"}
        else:
            assert w.isalpha()


def test_json_round_trip():
    for t in generate_tasks(2 * len(KINDS), seed=9):
        s = t.to_json()
        assert "\n" not in s
        back = Task.from_json(s)
        assert back == t
        assert Task.from_json(json.loads(s)) == t


def test_sft_and_prompt_views():
    ts = generate_tasks(12, seed=4)
    convs = sft_conversations(ts)
    for t, c in zip(ts, convs, strict=True):
        assert c[:-1] == t.messages and c[-1] == {"role": "assistant", "content": t.answer}
    ps = prompts(ts)
    assert ps == [t.messages for t in ts]
    ps[0][0]["content"] = "changed"  # copies: the tasks are not mutated
    assert ts[0].messages[0]["content"] != "changed"


def test_write_sft_jsonl_round_trip(tmp_path):
    path = write_sft_jsonl(tmp_path / "sub" / "sft.jsonl", n=25, seed=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"messages": c} for c in sft_conversations(generate_tasks(25, seed=6))]
    assert sorted(p.name for p in path.parent.iterdir()) == ["sft.jsonl"]  # no temp file left behind
    write_sft_jsonl(path, n=3, seed=6)  # overwrite in place
    assert len(path.read_text().splitlines()) == 3


def test_write_jsonl_gives_the_mode_a_plain_open_would(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = T.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    # not mkstemp's private 0o600: what open() gives under the umask (0o640 here)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def test_preference_pairs(tmp_path):
    ts = generate_tasks(40, seed=8)
    pairs = preference_pairs(ts, seed=1)
    assert pairs == preference_pairs(ts, seed=1)
    for t, p in zip(ts, pairs, strict=True):
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"] == t.messages
        assert verify(t, p["chosen"]) and not verify(t, p["rejected"])
    path = write_preference_jsonl(tmp_path / "pairs.jsonl", n=40, seed=8)
    assert [json.loads(x) for x in path.read_text().splitlines()] == preference_pairs(ts, seed=8)


def test_tasks_jsonl_round_trip(tmp_path):
    ts = generate_tasks(15, seed=2, split="heldout")
    path = T.write_tasks_jsonl(tmp_path / "tasks.jsonl", ts)
    assert T.read_tasks_jsonl(path) == ts
