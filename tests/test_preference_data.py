"""Preference data: every format parsed to exact prompt/chosen/rejected, malformed pairs reported with
their line numbers, tokenisation for the reward model, and the validate CLI."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

import chatml
from align.data import (
    DataError,
    encode_scored,
    formats,
    load_preference,
    tokenize_preference,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def _load(tmp_path, records, **kw):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_preference(path, **kw)


def test_formats_are_registered():
    assert formats("preference") == ["oasst", "sharegpt", "pair", "hh"]


def test_prompt_chosen_rejected_strings(tmp_path):
    pairs, report = _load(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert pairs == [{"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")], "margin": None}]
    assert report.formats == {"pair": 1}


def test_prompt_as_messages_responses_as_messages_with_margin(tmp_path):
    rec = {
        "prompt": [S("Be brief."), U("Hi"), A("Hello!"), U("Capital of France?")],
        "chosen": [A("Paris.")],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Lyon."}]}],
        "margin": 2,
    }
    pairs, _ = _load(tmp_path, [rec])
    assert pairs == [
        {
            "prompt": [S("Be brief."), U("Hi"), A("Hello!"), U("Capital of France?")],
            "chosen": [A("Paris.")],
            "rejected": [A("Lyon.")],
            "margin": 2.0,
        }
    ]
    assert isinstance(pairs[0]["margin"], float)


def test_top_level_system_is_prepended(tmp_path):
    pairs, _ = _load(tmp_path, [{"system": "Sys", "prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert pairs[0]["prompt"] == [S("Sys"), U("Q")]


HH_CHOSEN = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something shorter?\n\nAssistant: Tom is short and classic."
)
HH_REJECTED = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something shorter?\n\nAssistant:  No.  "
)


def test_hh_rlhf_transcripts_split_into_shared_prompt_and_last_replies(tmp_path):
    pairs, report = _load(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert pairs == [
        {
            "prompt": [
                U("What is a good name for a cat?"),
                A("How about Whiskers?"),
                U("Something shorter?"),
            ],
            "chosen": [A("Tom is short and classic.")],
            "rejected": [A("No.")],
            "margin": None,
        }
    ]
    assert report.formats == {"hh": 1}


def test_full_conversations_as_message_lists_share_a_prefix(tmp_path):
    rec = {"chosen": [U("Hi"), A("Hello! How can I help?")], "rejected": [U("Hi"), A("What.")]}
    pairs, _ = _load(tmp_path, [rec])
    assert pairs == [
        {
            "prompt": [U("Hi")],
            "chosen": [A("Hello! How can I help?")],
            "rejected": [A("What.")],
            "margin": None,
        }
    ]


def test_sharegpt_pairs_objects_and_strings(tmp_path):
    records = [
        {
            "conversations": [{"from": "human", "value": "Name a colour."}],
            "chosen": {"from": "gpt", "value": "Blue."},
            "rejected": {"from": "gpt", "value": "Seven."},
        },
        {  # MedicalGPT style: responses as plain strings, a system prompt
            "system": "You are a doctor.",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Is water good?"},
            ],
            "chosen": "Yes, stay hydrated.",
            "rejected": "No.",
        },
    ]
    pairs, report = _load(tmp_path, records)
    assert pairs == [
        {"prompt": [U("Name a colour.")], "chosen": [A("Blue.")], "rejected": [A("Seven.")], "margin": None},
        {
            "prompt": [S("You are a doctor."), U("Hi"), A("Hello."), U("Is water good?")],
            "chosen": [A("Yes, stay hydrated.")],
            "rejected": [A("No.")],
            "margin": None,
        },
    ]
    assert report.formats == {"sharegpt": 2}


def _msg(role, text, rank=None, replies=(), **kw):
    node = {"role": role, "text": text, "replies": list(replies), **kw}
    if rank is not None:
        node["rank"] = rank
    return node


def test_openassistant_tree_gives_pairs_from_sibling_ranks(tmp_path):
    tree = {
        "message_tree_id": "t1",
        "prompt": _msg(
            "prompter",
            "Q1",
            replies=[
                _msg("assistant", "worst", rank=2),
                _msg(
                    "assistant",
                    "best",
                    rank=0,
                    replies=[
                        _msg(
                            "prompter",
                            "Q2",
                            replies=[_msg("assistant", "b2", rank=1), _msg("assistant", "a2", rank=0)],
                        )
                    ],
                ),
                _msg("assistant", "middle", rank=1),
                _msg("assistant", "deleted one", rank=0, deleted=True),
                _msg("assistant", "unranked"),
            ],
        ),
    }
    pairs, report = _load(tmp_path, [tree])
    pr = [(p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert pr == [
        ([U("Q1")], "best", "middle"),
        ([U("Q1")], "best", "worst"),
        ([U("Q1")], "middle", "worst"),
        ([U("Q1"), A("best"), U("Q2")], "a2", "b2"),
    ]
    assert report.used == 1 and report.formats == {"oasst": 1}
    assert report.notes["pairs (OpenAssistant trees give several per record)"] == 4


def test_openassistant_equal_ranks_are_no_preference(tmp_path):
    tree = {
        "prompt": _msg(
            "prompter",
            "Q",
            replies=[
                _msg("assistant", "x", rank=0),
                _msg("assistant", "y", rank=0),
                _msg("assistant", "z", rank=1),
            ],
        )
    }
    pairs, report = _load(tmp_path, [tree])
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("x", "z"),
        ("y", "z"),
    ]
    assert report.notes["OpenAssistant sibling replies of equal rank skipped"] == 1


def test_malformed_pairs_are_reported_with_line_numbers(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [
        json.dumps(good),  # 1
        json.dumps({"prompt": "q", "chosen": "same", "rejected": " same "}),  # 2
        json.dumps({"prompt": "q", "chosen": "a"}),  # 3
        json.dumps({**good, "margin": "big"}),  # 4
        json.dumps({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN.replace("Whiskers", "Rex")}),  # 5
        json.dumps({"prompt": "q", "chosen": [A("a"), U("more?")], "rejected": "b"}),  # 6
        json.dumps({"prompt": [S("only a system prompt")], "chosen": "a", "rejected": "b"}),  # 7
        "{not json",  # 8
        "",  # a blank line is layout
        json.dumps({"chosen": "x", "rejected": ["y"]}),  # 10
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("inf")}).replace(
            "Infinity", "1e999"
        ),  # 11
        json.dumps({"prompt": {"role": "prompter", "text": "q", "replies": []}}),  # 12: tree with no ranks
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_preference(path)
    msg = str(err.value)
    expected = {
        2: "chosen and rejected are identical",
        3: "missing field 'rejected'",
        4: "'margin' must be a number, found string",
        5: "differ at turn 2",
        6: "the chosen response must end with an assistant turn",
        7: "the prompt has no user turn",
        8: "invalid JSON",
        10: "must both be HH transcripts (strings) or both message arrays",
        11: "'margin' must be finite",
        12: "no two ranked assistant replies",
    }
    for line, reason in expected.items():
        assert f"{path}:{line}: " in msg and reason in msg, (line, msg)
    assert {b.line for b in err.value.bad} == set(expected)

    rejects = tmp_path / "rejects.jsonl"
    pairs, report = load_preference(path, skip_bad=True, rejects_path=rejects)
    assert len(pairs) == 1 and report.read == 11 and report.used == 1 and report.skipped == 10
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == sorted(expected)


def test_empty_final_reply_is_allowed_and_noted(tmp_path):
    pairs, report = _load(
        tmp_path,
        [{"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."}],
    )
    assert pairs[0]["chosen"] == [A("")] and pairs[0]["rejected"] == [A("Go away.")]
    assert report.notes["pairs with an empty chosen or rejected reply"] == 1


def test_tokenised_pairs_end_at_im_end_and_match_the_template(qwen_tokenizer):
    pair = {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("The answer is 4.")], "margin": 0.5}
    (ex,) = tokenize_preference(
        [pair], qwen_tokenizer, max_length=None, default_system=chatml.QWEN2_DEFAULT_SYSTEM
    )
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    template = qwen_tokenizer.apply_chat_template([U("2+2?"), A("4")])["input_ids"]
    assert ex["chosen_ids"] == template[:-1]  # the template's closing "\n" is not scored
    assert ex["chosen_ids"][-1] == im_end and ex["rejected_ids"][-1] == im_end
    assert ex["chosen_closed"] and ex["rejected_closed"] and ex["margin"] == 0.5
    assert ex["chosen_len"] == 2 and ex["rejected_len"] == len(qwen_tokenizer.encode("The answer is 4.")) + 1


def test_truncation_left_keeps_the_end_token_right_flags_it(qwen_tokenizer):
    long = "word " * 60
    pair = {"prompt": [U(long)], "chosen": [A("yes")], "rejected": [A("no")], "margin": None}
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = encode_scored([U(long), A("yes")], qwen_tokenizer)
    (left,) = tokenize_preference([pair], qwen_tokenizer, max_length=32, truncation_side="left")
    assert left["chosen_ids"] == full[-32:] and left["chosen_ids"][-1] == im_end and left["chosen_closed"]
    from align.data import DataReport

    report = DataReport(kind="preference")
    (right,) = tokenize_preference(
        [pair], qwen_tokenizer, max_length=32, truncation_side="right", report=report
    )
    assert right["chosen_ids"] == full[:32] and not right["chosen_closed"] and not right["rejected_closed"]
    assert report.truncated == 1
    assert report.notes["pairs with a response whose end token was truncated away"] == 1


def test_configured_end_token_is_appended(qwen_tokenizer):
    ids = encode_scored([U("q"), A("a")], qwen_tokenizer, end_token="<|endoftext|>")
    assert ids[-2:] == [
        qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"),
        qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    with pytest.raises(ValueError, match="not a single token"):
        tokenize_preference(
            [{"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}],
            qwen_tokenizer,
            max_length=None,
            end_token="</s>",
        )


def _validate(*args):
    return subprocess.run(
        [sys.executable, "-m", "align.data", "validate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_cli_preference(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    proc = _validate(str(good), "--kind", "preference")
    assert proc.returncode == 0, proc.stderr
    assert "preference data from" in proc.stdout and "used 1" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    proc = _validate(str(bad), "--kind", "preference")
    assert proc.returncode == 1
    assert f"{bad}:1: chosen and rejected are identical" in proc.stdout


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_real_preference_files_parse():
    hh, report = load_preference(SHARED / "hh-rlhf" / "harmless-base-pairs.jsonl.gz", skip_bad=True)
    assert report.read == 1800 and report.used == len(hh) == 1791 and report.skipped == 9
    with gzip.open(SHARED / "hh-rlhf" / "harmless-base-pairs.jsonl.gz", "rt") as fh:
        first = json.loads(fh.readline())
    assert first["chosen"].endswith(hh[0]["chosen"][0]["content"])
    assert first["rejected"].endswith(hh[0]["rejected"][0]["content"])
    assert hh[0]["prompt"][0] == U("what are some pranks with a pen i can do?")
    oasst, report = load_preference(SHARED / "oasst" / "en_100_tree.jsonl")
    assert report.used == 100 and len(oasst) == 754
    lf, report = load_preference(SHARED / "llama-factory" / "dpo_en_demo.json")
    assert report.formats == {"sharegpt": 300} and len(lf) == 300


def test_group_is_kept_and_pairs_are_grouped_by_prompt(tmp_path):
    from align.data.groups import prompt_groups

    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "group": 0},
        {"prompt": "3+3?", "chosen": "6", "rejected": "7", "group": 1},
        {"prompt": "2+2?", "chosen": "4", "rejected": "22", "group": 0},
        {"prompt": "1+1?", "chosen": "2", "rejected": "3"},  # no group: a group of its own
        {"chosen": [U("3+3?"), A("6")], "rejected": [U("3+3?"), A("9")], "group": 1},  # hh, same prompt
        {"prompt": "2+2?", "chosen": "4", "rejected": "3", "group": "0"},  # a string id is another id
    ]
    pairs, _ = _load(tmp_path, records)
    assert [p.get("group") for p in pairs] == [0, 1, 0, None, 1, "0"]
    assert "group" not in pairs[3]  # records without one load exactly as before
    assert prompt_groups(pairs, tmp_path / "pairs.jsonl") == [[0, 2], [1, 4], [3], [5]]


def test_bad_groups_are_reported_with_line_numbers(tmp_path):
    from align.data.groups import prompt_groups

    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "group": 1.5}) + "\n"
        + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "group": True}) + "\n"
    )  # fmt: skip
    with pytest.raises(DataError) as err:
        load_preference(path)
    assert {b.line for b in err.value.bad} == {1, 2}
    assert f"{path}:1: 'group' must be an integer or a string, found number" in str(err.value)
    assert f"{path}:2: 'group' must be an integer or a string, found boolean" in str(err.value)

    lines = [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "group": 4},  # 1
        {"prompt": "q2", "chosen": "a", "rejected": "b", "group": 5},  # 2
        {"prompt": "q1", "chosen": "a", "rejected": "c", "group": 4},  # 3: same prompt, fine
        {"prompt": "q2", "chosen": "a", "rejected": "b", "group": 4},  # 4: another prompt in group 4
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in lines[1:]))
    pairs, _ = load_preference(path)
    with pytest.raises(DataError) as err:
        prompt_groups(pairs, path)
    assert [b.line for b in err.value.bad] == [5]  # the blank line 2 is layout
    assert f"{path}:5: group 4 mixes prompts" in str(err.value)
    assert f"the group's first pair ({path} line 1)" in str(err.value)


def test_merge_pairs_gives_each_prompt_one_group_across_sampling_runs(tmp_path):
    from align.data.groups import prompt_groups

    def write(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    # Two runs, each numbering its groups from 0: group 0 is "2+2?" in one and "5+5?" in the other.
    first = write(
        "round1.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "group": 0, "source": "r1"},
            {"prompt": "2+2?", "chosen": "4", "rejected": "22", "group": 0},
            {"prompt": "3+3?", "chosen": "6", "rejected": "7", "group": 1},
        ],
    )
    second = write(
        "round2.jsonl",
        [
            {"prompt": "5+5?", "chosen": "10", "rejected": "55", "group": 0},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "group": 1},  # round 1's first pair again
            {"prompt": "2+2?", "chosen": "4", "rejected": "8", "group": 1},
            {"prompt": "1+1?", "chosen": "2", "rejected": "3"},  # no group: stays without
        ],
    )
    catted = write(
        "cat.jsonl", [json.loads(line) for f in (first, second) for line in f.read_text().splitlines()]
    )
    with pytest.raises(DataError, match="group 0 mixes prompts"):
        prompt_groups(load_preference(catted)[0], catted)

    out = tmp_path / "merged" / "pairs.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "align.data", "merge-pairs", str(first), str(second), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "6 pairs from 2 file(s) (7 read, 1 exact duplicates dropped), 3 prompt groups" in proc.stdout
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["rejected"], r.get("group")) for r in merged] == [
        ("2+2?", "5", "p0"), ("2+2?", "22", "p0"), ("3+3?", "7", "p1"),
        ("5+5?", "55", "p2"), ("2+2?", "8", "p0"), ("1+1?", "3", None),
    ]  # fmt: skip
    assert merged[0]["source"] == "r1"  # other fields kept
    pairs, _ = load_preference(out)
    assert prompt_groups(pairs, out) == [[0, 1, 4], [2], [3], [5]]

    # A bad line is named by file and line, and nothing is written.
    bad = write("bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "group": 0}])
    with bad.open("a") as f:
        f.write("{not json\n")
    out.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "align.data", "merge-pairs", str(first), str(bad), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr
    assert list(out.parent.iterdir()) == []  # no output, and no temp file left beside it
