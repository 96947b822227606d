"""Property-based bad input at every loader: SFT and preference records (every format), PPO/online
prompt files, ptx text, and `python -m align.data validate`.

Files are built from labelled lines (good records, and bad ones of known kinds) plus arbitrary JSON in
the shape of each format. Properties: a loader either returns or raises `DataError` whose lines read
`file:line: reason` (never another exception); with skip_bad the bad lines are exactly the ones we
made bad, each is in the rejects file, and read = used + skipped.
"""

import json
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.data import DataError, load_preference, load_sft, main
from align.ptx import load_text
from align.train.rl_common import load_prompts

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TEXT = st.text(alphabet=string.ascii_letters + string.digits + " .,?!é中", min_size=1, max_size=30).filter(
    lambda s: s.strip()
)

# --------------------------------------------------------------------------------------------------
# Lines that are bad whatever the format: bytes of one JSONL line, never valid as a record.

BAD_ANY = st.one_of(
    st.just(b"{not json"),
    st.just(b'{"messages": [1, 2'),
    # invalid UTF-8 (newlines replaced: one generated line must stay one line of the file)
    st.binary(min_size=1, max_size=20).map(lambda b: b'{"text": "\xff' + b.replace(b"\n", b"n") + b'"}'),
    st.sampled_from([b"[]", b"42", b'"a string"', b"null", b"true"]),  # JSON, but not an object
    st.just(b"[" * 5000 + b"]" * 5000),  # nested past any sane depth
    st.just(b'{"x": "' + b"y" * 300_000 + b'"}'),  # a huge line of an unknown shape
)


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _conversation(draw, n_pairs):
    turns = []
    if draw(st.booleans()):
        turns.append(("system", draw(TEXT)))
    for _ in range(n_pairs):
        turns += [("user", draw(TEXT)), ("assistant", draw(TEXT))]
    return turns


@st.composite
def sft_good(draw):
    turns = _conversation(draw, draw(st.integers(1, 3)))
    fmt = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "hh"]))
    if fmt == "messages":
        return _line({"messages": [{"role": r, "content": c} for r, c in turns]})
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return _line({"conversations": [{"from": names[r], "value": c} for r, c in turns]})
    if fmt == "alpaca":
        return _line({"instruction": draw(TEXT), "input": "", "output": draw(TEXT)})
    body = "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in turns if r != "system")
    return _line({"chosen": body, "rejected": body + " no"})


@st.composite
def sft_bad(draw):
    kind = draw(st.sampled_from(["any", "scrambled", "empty", "role", "types", "no_assistant"]))
    if kind == "any":
        return draw(BAD_ANY)
    if kind == "scrambled":  # assistant first, or two user turns in a row
        first = draw(st.sampled_from([["assistant", "user"], ["user", "user", "assistant"]]))
        return _line({"messages": [{"role": r, "content": draw(TEXT)} for r in first]})
    if kind == "empty":
        return _line(draw(st.sampled_from([{"messages": []}, {"conversations": []}, {}])))
    if kind == "role":
        return _line(
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
        )
    if kind == "types":
        bad_value = draw(st.sampled_from([None, 3, 2.5, ["x"], {"a": 1}]))
        return _line(
            {"messages": [{"role": "user", "content": bad_value}, {"role": "assistant", "content": "y"}]}
        )
    return _line({"messages": [{"role": "user", "content": draw(TEXT)}]})


@st.composite
def pref_good(draw):
    fmt = draw(st.sampled_from(["pair", "pair_messages", "hh", "sharegpt"]))
    prompt, chosen, rejected = draw(TEXT), draw(TEXT), draw(TEXT)
    rejected = rejected if rejected != chosen else chosen + "!"
    if fmt == "pair":
        return _line({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if fmt == "pair_messages":
        return _line(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    if fmt == "hh":
        head = f"\n\nHuman: {prompt}\n\nAssistant: "
        return _line({"chosen": head + chosen, "rejected": head + rejected})
    return _line(
        {
            "conversations": [{"from": "human", "value": prompt}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        }
    )


@st.composite
def pref_bad(draw):
    kind = draw(st.sampled_from(["any", "same", "missing", "types", "mismatched"]))
    if kind == "any":
        return draw(BAD_ANY)
    text = draw(TEXT)
    if kind == "same":  # chosen equals rejected: no preference at all
        return _line({"prompt": draw(TEXT), "chosen": text, "rejected": text})
    if kind == "missing":
        return _line({"prompt": draw(TEXT), "chosen": text})
    if kind == "types":
        return _line(
            {"prompt": draw(TEXT), "chosen": text, "rejected": draw(st.sampled_from([None, 1, True]))}
        )
    # HH transcripts that do not share a prompt
    return _line(
        {"chosen": f"\n\nHuman: a{text}\n\nAssistant: x", "rejected": f"\n\nHuman: b{text}\n\nAssistant: y"}
    )


# Arbitrary JSON in the shape of a format: parsers must reject it cleanly, or accept it.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output",
        "chosen", "rejected", "prompt", "margin", "replies", "rank", "text", "children", "message_id"]  # fmt: skip
SHAPED = st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=4).map(_line)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _check_accounting(path, lines, report, rejects, expected_bad):
    read = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    assert read == sum(1 for line in lines if line.strip())  # one generated line is one line of the file
    assert report.read == read == report.used + report.skipped
    bad_lines = sorted(b.line for b in report.bad)
    if expected_bad is not None:
        assert bad_lines == expected_bad
    rows = [json.loads(r) for r in rejects.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == bad_lines and all(r["source"] == str(path) for r in rows)


def _check_strict(load, path, report):
    """Without skip_bad: a clean file loads; a dirty one raises DataError naming file:line of each."""
    if report.skipped == 0:
        load(path)
        return
    with pytest.raises(DataError) as err:
        load(path)
    first = min(b.line for b in report.bad)
    assert f"{path}:{first}: " in str(err.value)


def _check_labelled(tmp_path, labelled, good_lines, bad_lines, name, load):
    """Draw a good or a bad line for each (good, data) of `labelled`, write them to `name` and load it
    with skip_bad: exactly the bad lines are skipped and written to the rejects file, by line number."""
    lines, expected_bad = [], []
    for i, (good, data) in enumerate(labelled, 1):
        lines.append(data.draw(good_lines() if good else bad_lines()))
        if not good:
            expected_bad.append(i)
    path = _write(tmp_path, name, lines)
    rejects = tmp_path / "rejects.jsonl"
    records, report = load(path, skip_bad=True, rejects_path=rejects)
    assert len(records) == report.used == len(lines) - len(expected_bad)
    _check_accounting(path, lines, report, rejects, expected_bad)
    _check_strict(load, path, report)


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=8))
def test_sft_loader_accounts_for_every_line(tmp_path, labelled):
    _check_labelled(tmp_path, labelled, sft_good, sft_bad, "sft.jsonl", load_sft)


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=8))
def test_preference_loader_accounts_for_every_line(tmp_path, labelled):
    _check_labelled(tmp_path, labelled, pref_good, pref_bad, "pairs.jsonl", load_preference)


@SETTINGS
@given(st.lists(SHAPED | BAD_ANY, min_size=1, max_size=6), st.sampled_from(["sft", "preference"]))
def test_arbitrary_records_never_crash_a_loader(tmp_path, lines, kind):
    path = _write(tmp_path, "data.jsonl", lines)
    rejects = tmp_path / "rejects.jsonl"
    load = load_sft if kind == "sft" else load_preference
    _, report = load(path, skip_bad=True, rejects_path=rejects)
    _check_accounting(path, lines, report, rejects, None)
    _check_strict(load, path, report)


def _prompts_cfg(path):
    from align.config import PPOConfig

    return PPOConfig(dataset=str(path))


FILE_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): \S")


@SETTINGS
@given(st.lists(SHAPED | BAD_ANY | st.just(b'{"prompt": "hi"}'), min_size=1, max_size=6))
def test_prompt_and_ptx_files_fail_with_file_and_line(tmp_path, lines):
    """PPO/online prompt files and ptx text have no skip mode: clean files load, any bad line is a
    DataError naming the first bad line (each loader checks its own shape)."""
    path = _write(tmp_path, "p.jsonl", lines)
    for load in (lambda p: load_prompts(_prompts_cfg(p)), load_text):
        try:
            load(path)
        except DataError as err:
            match = FILE_LINE.match(str(err))
            assert match and match["file"] == str(path), str(err)
            assert 1 <= int(match["line"]) <= len(lines)


def test_invalid_utf8_in_text_files_names_the_line(tmp_path):
    jsonl = _write(tmp_path, "t.jsonl", [b'{"text": "fine"}', b'{"text": "caf\xe9"}'])
    with pytest.raises(DataError, match=rf"^{re.escape(str(jsonl))}:2: invalid UTF-8: byte 0xe9"):
        load_text(str(jsonl))
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"one block\n\nline two\nbad \xff here\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(txt))}:4: invalid UTF-8: byte 0xff"):
        load_text(str(txt))
    prompts = _write(tmp_path, "p.jsonl", [b'{"prompt": "ok"}', b"", b'{"prompt": "\xc3("}'])
    with pytest.raises(DataError, match=rf"^{re.escape(str(prompts))}:3: invalid UTF-8"):
        load_prompts(_prompts_cfg(prompts))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=5),
    st.sampled_from(["sft", "preference"]),
)
def test_validate_cli_exit_status_and_accounting(tmp_path, capsys, labelled, kind):
    good_gen, bad_gen = (sft_good, sft_bad) if kind == "sft" else (pref_good, pref_bad)
    lines = [data.draw(good_gen() if good else bad_gen()) for good, data in labelled]
    n_bad = sum(1 for good, _ in labelled if not good)
    path = _write(tmp_path, "v.jsonl", lines)
    rejects = tmp_path / "v-rejects.jsonl"
    capsys.readouterr()
    rc = main(["validate", str(path), "--kind", kind, "--rejects", str(rejects)])
    out = capsys.readouterr()
    assert rc == (1 if n_bad else 0)
    assert len(rejects.read_text().splitlines()) == n_bad
    assert f"read {len(lines)}" in out.out + out.err
    assert "Traceback" not in out.out + out.err
