"""align.data: formats, validation messages with exact file:line, accounting, sources, CLI, fuzzing,
and the real data sets in ../shared/data."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align import data as data_mod
from align.data import (
    BadRecord,
    DataError,
    DataReport,
    DataSourceError,
    Parsed,
    RecordError,
    RecordFormat,
    load_records,
    load_sft,
    register_format,
    tokenize_sft,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


def write_jsonl(path: Path, records) -> Path:
    """Records as JSONL; a str item is written verbatim (for malformed lines), bytes likewise."""
    out = b""
    for r in records:
        if isinstance(r, bytes):
            out += r + b"\n"
        elif isinstance(r, str):
            out += r.encode() + b"\n"
        else:
            out += json.dumps(r, ensure_ascii=False).encode() + b"\n"
    path.write_bytes(out)
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}],
}
CALL_NORMALISED = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
}


# ------------------------------------------------------------------------------------------------
# formats: exact normalised output


def test_openai_format(tmp_path):
    rec = {
        "messages": msgs(("system", "S"), ("user", "Q"), ("assistant", "A")),
        "tools": [{"name": "f"}],  # carried with the conversation, in the OpenAI form templates read
    }
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            A("x"),
        ]
    }
    convs, report = load_sft(write_jsonl(tmp_path / "d.jsonl", [rec, parts]))
    assert convs == [rec["messages"], [U("ab"), A("x")]]
    assert convs[0].tools == [{"type": "function", "function": {"name": "f"}}] and convs[1].tools is None
    assert report.formats == {"openai": 2}


def test_sharegpt_format_with_tools_and_system(tmp_path):
    rec = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {
                "from": "function_call",
                "value": '{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
            },
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
            {"from": "user", "value": "Thanks"},
            {"from": "assistant", "value": "Welcome"},
        ],
        "tools": '[{"name": "weather", "parameters": {}}]',
    }
    inline_system = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    convs, report = load_sft(
        write_jsonl(tmp_path / "d.jsonl", [rec, inline_system, {**inline_system, "system": ""}])
    )
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    assert convs[0] == [
        *msgs(("system", "Be brief."), ("user", "Weather?")),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        *msgs(
            ("tool", "sunny"),
            ("assistant", "Sunny."),
            ("user", "Thanks"),
            ("assistant", "Welcome"),
        ),
    ]
    assert convs[0].tools == [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    assert convs[1] == convs[2] == msgs(("system", "S"), ("user", "hi"), ("assistant", "yo"))
    assert report.formats == {"sharegpt": 3}


def test_alpaca_format(tmp_path):
    recs = [
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "output": "hi"},
        {
            "instruction": "And now?",
            "input": "",
            "output": "B",
            "system": "S",
            "history": [["q1", "a1"], ["q2", "a2"]],
        },
    ]
    convs, report = load_sft(write_jsonl(tmp_path / "d.jsonl", recs))
    assert convs == [
        [U("Add.\n\n1 and 2"), A("3")],
        [U("Say hi."), A("hi")],
        [U("Say hi."), A("hi")],
        [{"role": "system", "content": "S"}, U("q1"), A("a1"), U("q2"), A("a2"), U("And now?"), A("B")],
    ]
    assert report.formats == {"alpaca": 4}


def test_hh_rlhf_format_text_and_chosen(tmp_path):
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:  Fine, thanks. "
    recs = [
        {"chosen": chosen, "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
        {"text": "Human: Q\n\nAssistant: A"},
    ]
    convs, report = load_sft(write_jsonl(tmp_path / "d.jsonl", recs))
    assert convs == [
        [U("Hi there"), A("Hello!"), U("How are you?"), A("Fine, thanks.")],
        [U("Q"), A("A")],
    ]
    assert report.formats == {"hh": 2}


def test_auto_detection_per_record_and_format_override(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [U("a"), A("b")]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"instruction": "a", "input": "", "output": "b"},
            {"text": "\n\nHuman: a\n\nAssistant: b"},
        ],
    )
    convs, report = load_sft(path)
    assert convs == [[U("a"), A("b")]] * 4
    assert report.formats == {"openai": 1, "sharegpt": 1, "alpaca": 1, "hh": 1}

    convs, report = load_sft(path, format="sharegpt", skip_bad=True)
    assert report.used == 1 and report.formats == {"sharegpt": 1}
    assert [str(b) for b in report.bad] == [
        f"{path}:1: missing field 'conversations'",
        f"{path}:3: missing field 'conversations'",
        f"{path}:4: missing field 'conversations'",
    ]
    with pytest.raises(ValueError, match="unknown sft format 'nope'"):
        load_sft(path, format="nope")


def test_trailing_unanswered_turns_are_removed_and_noted(tmp_path):
    recs = [
        {"messages": [U("a"), A("b"), U("unanswered")]},
        {
            "messages": [U("a"), {**CALL, "content": "call"}, {"role": "tool", "content": "result"}],
            "tools": [{"name": "f"}],
        },
    ]
    convs, report = load_sft(write_jsonl(tmp_path / "d.jsonl", recs))
    assert convs == [[U("a"), A("b")], [U("a"), {**CALL_NORMALISED, "content": "call"}]]
    assert report.notes == {data_mod.TRAILING_NOTE: 2}
    assert f"{data_mod.TRAILING_NOTE}: 2" in report.summary()


# ------------------------------------------------------------------------------------------------
# validation: every error kind, with its exact file:line: reason

BAD_LINES = [
    # (line content, expected reason); blank lines between them check that line numbers stay real
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', None),
    ("", None),
    ("{bad json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "record must be a JSON object, found array"),
    (b'{"messages": "\xff"}', "invalid UTF-8: byte 0xff at column 15"),
    ('{"messages": "hi"}', "'messages' must be an array, found string"),
    ('{"messages": []}', "'messages' is empty"),
    (
        '{"messages": [{"role": "bot", "content": "x"}]}',
        "'messages[0].role': unknown role 'bot' (expected system, user, assistant, tool)",
    ),
    ('{"messages": [{"role": "user"}]}', "missing field 'messages[0].content'"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
        "'messages[1].content' must be a string or an array, found number",
    ),
    ('{"messages": [{"role": "user", "content": "a"}, 7]}', "'messages[1]' must be an object, found number"),
    (
        '{"messages": [{"role": "assistant", "content": "a"}]}',
        "messages[0]: the conversation starts with an assistant turn, expected user",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}',
        "messages[1]: two user turns in a row",
    ),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}]}',
        "messages[1]: a system turn is only allowed first",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "c"}]}',
        "messages[1]: a tool turn must follow an assistant turn",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "d"}], "tools": [{"name": "f"}]}',
        "messages[3]: a user turn follows a tool turn (the assistant must answer it)",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "d"}]}',
        "messages[2]: a tool result with no preceding call (the assistant turn before it calls no function)",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\\"x\\": 1"}}]}], "tools": [{"name": "f"}]}',
        "'messages[1].tool_calls[0].function.arguments': the call's arguments is not valid JSON: Expecting ',' delimiter (column 8)",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "g", "arguments": {}}}]}], "tools": [{"name": "f"}]}',
        "messages[1]: call to 'g', a function not in 'tools' ('tools' has 'f')",
    ),
    (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{\\"name\\": \\"f\\""}], "tools": "[{\\"name\\": \\"f\\"}]"}',
        "'conversations[1].value': the function call is not valid JSON: Expecting ',' delimiter (column 13)",
    ),
    (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{\\"name\\": \\"f\\"}"}]}',
        "conversations[1]: call to 'f', a function not in 'tools' (the record has no 'tools')",
    ),
    (
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "[{name: 1}]"}',
        "'tools': the tool list is not valid JSON: Expecting property name enclosed in double quotes (column 3)",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}',
        "messages[2]: two assistant turns in a row",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}',
        "messages[1]: empty assistant turn",
    ),
    (
        '{"messages": [{"role": "user", "content": "\\udc80"}, {"role": "assistant", "content": "b"}]}',
        "'messages[0].content' contains a lone surrogate (invalid Unicode)",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}, {"role": "assistant", "content": "b"}]}',
        "'messages[0].content[0]': unsupported content part 'image_url' (only text)",
    ),
    (
        '{"foo": 1, "bar": 2}',
        "unrecognised record (keys: 'foo', 'bar'); expected one of: openai (messages), sharegpt (conversations), alpaca (instruction, output), hh (text or chosen)",
    ),
    (
        '{"conversations": [{"from": "bot", "value": "x"}]}',
        "'conversations[0].from': unknown role 'bot' (expected human, user, gpt, assistant, system, function_call, observation)",
    ),
    (
        '{"conversations": [{"from": "human", "value": null}]}',
        "'conversations[0].value' must be a string, found null",
    ),
    (
        '{"system": 3, "conversations": [{"from": "human", "value": "a"}]}',
        "'system' must be a string, found number",
    ),
    (
        '{"instruction": "a", "input": "", "output": "b", "history": [["q"]]}',
        "'history[0]' must be a [query, response] pair, found an array of length 1",
    ),
    ('{"instruction": "a"}', "missing field 'output'"),
    ('{"instruction": "a", "output": ""}', "output: empty assistant turn"),
    ('{"chosen": "no markers here"}', "'chosen': no 'Human:' / 'Assistant:' turns found"),
    ('{"text": "preamble\\n\\nHuman: a\\n\\nAssistant: b"}', "'text': text before the first 'Human:' turn"),
    (
        '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nAssistant: c"}',
        "'chosen' turn 3 (Assistant): two assistant turns in a row",
    ),
]


def test_every_error_kind_has_exact_file_line_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line, _ in BAD_LINES) + b"\n"
    )
    expected = [f"{path}:{n}: {reason}" for n, (_, reason) in enumerate(BAD_LINES, 1) if reason]
    convs, report = load_sft(path, skip_bad=True)
    assert [str(b) for b in report.bad] == expected
    assert convs == [[U("a"), A("b")]]
    assert (report.read, report.used, report.skipped) == (len(expected) + 1, 1, len(expected))


def test_bad_records_raise_data_error_listing_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{", '{"messages": []}', "[]", {"messages": [U("a"), A("b")]}])
    with pytest.raises(DataError) as info:
        load_sft(path, max_errors_shown=2)
    msg = str(info.value)
    assert f"{path}:1: invalid JSON: Expecting property name enclosed in double quotes (column 2)" in msg
    assert f"{path}:2: 'messages' is empty" in msg
    assert f"{path}:3:" not in msg
    assert "... and 1 more" in msg
    assert "skip_bad=true" in msg
    assert isinstance(info.value, ValueError)
    assert [b.line for b in info.value.bad] == [1, 2, 3]


def test_skip_bad_accounting_and_rejects_file(tmp_path):
    bad_lines = ["not json", '{"messages": [{"role": "user", "content": "a"}]}', "3"]
    good = {"messages": [U("a"), A("b")]}
    path = write_jsonl(
        tmp_path / "d.jsonl", [good, bad_lines[0], "", good, bad_lines[1], "   ", bad_lines[2]]
    )
    rejects = tmp_path / "out" / "rejects.jsonl"
    convs, report = load_sft(path, skip_bad=True, rejects_path=rejects)
    assert len(convs) == 2
    assert (report.read, report.used, report.skipped, report.dropped_no_trainable) == (5, 2, 3, 0)
    assert report.read == report.used + report.skipped + report.dropped_no_trainable
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["source"], r["line"], r["raw"]) for r in rows] == [
        (str(path), 2, bad_lines[0]),
        (str(path), 5, bad_lines[1]),
        (str(path), 7, bad_lines[2]),
    ]
    assert rows[1]["reason"] == "no assistant turn"
    d = report.to_dict()
    json.dumps(d)
    assert d["skipped"] == 3 and d["bad"][0]["line"] == 2


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("e.jsonl", b""),
        ("blank.jsonl", b"\n  \n\r\n"),
        ("e.json", b"  \n"),
        ("l.json", b"[]"),
        ("w.json", b'{"data": []}'),
    ],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}: empty, no records"):
        load_sft(path)
    convs, report = load_sft(path, skip_bad=True)
    assert convs == [] and [str(b) for b in report.bad] == [f"{path}: empty, no records"]
    assert report.read == report.skipped == 1


def test_huge_and_pathological_lines(tmp_path):
    big = {"messages": [U("x" * 3_000_000), A("y")]}
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [big, "[" * 200_000, '{"messages": ' + "1" * 5000 + "}", "{" + '"a": 1,' * 100_000],
    )
    convs, report = load_sft(path, skip_bad=True)
    assert len(convs) == 1 and len(convs[0][0]["content"]) == 3_000_000
    assert [b.line for b in report.bad] == [2, 3, 4]
    assert report.bad[0].reason == "invalid JSON: nested too deeply"
    assert report.bad[1].reason.startswith("invalid JSON: Exceeds the limit")
    assert report.bad[2].reason.startswith("invalid JSON: ")


# ------------------------------------------------------------------------------------------------
# JSON files: real line numbers, wrappers, a single record, syntax errors, invalid UTF-8

GOOD = {"messages": [U("a"), A("b")]}


def test_json_list_reports_real_line_numbers(tmp_path):
    records = [GOOD, {"messages": [U("a")]}, GOOD, {"instruction": "x"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=2))
    starts = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    convs, report = load_sft(path, skip_bad=True)
    assert len(convs) == 2
    assert [str(b) for b in report.bad] == [
        f"{path}:{starts[1]}: no assistant turn",
        f"{path}:{starts[3]}: missing field 'output'",
    ]
    assert report.bad[0].raw.startswith("{") and json.loads(report.bad[0].raw) == records[1]


def test_json_wrapper_object_and_single_record(tmp_path):
    wrapped = tmp_path / "w.json"
    wrapped.write_text(
        '{"version": 1,\n "data": [\n' + json.dumps(GOOD) + ",\n" + '{"messages": 1}' + "\n]}\n"
    )
    convs, report = load_sft(wrapped, skip_bad=True)
    assert convs == [GOOD["messages"]]
    assert [str(b) for b in report.bad] == [f"{wrapped}:4: 'messages' must be an array, found number"]

    single = tmp_path / "s.json"
    single.write_text(json.dumps(GOOD, indent=1))
    assert load_sft(single)[0] == [GOOD["messages"]]

    other = tmp_path / "o.json"
    other.write_text('\n{"a": [1], "b": 2}')
    _, report = load_sft(other, skip_bad=True)
    assert [str(b) for b in report.bad] == [
        f"{other}:2: JSON object without a list of records (keys: 'a', 'b'); expected a list or {{\"data\": [...]}}"
    ]


def test_json_syntax_error_keeps_earlier_records_and_reports_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n]\n")
    convs, report = load_sft(path, skip_bad=True)
    assert len(convs) == 2
    assert [str(b) for b in report.bad] == [
        f"{path}:4: invalid JSON: Expecting ',' delimiter (column 1); the rest of the file was not read"
    ]
    trailing = tmp_path / "t.json"
    trailing.write_text("[]\n]")
    _, report = load_sft(trailing, skip_bad=True)
    assert [str(b) for b in report.bad] == [
        f"{trailing}:2: invalid JSON: Extra data (column 1); the file was not read"
    ]


def test_json_invalid_utf8_rejects_only_that_record(tmp_path):
    path = tmp_path / "d.json"
    body = (
        "[\n"
        + json.dumps(GOOD)
        + ",\n"
        + '{"messages": [{"role": "user", "content": "@@"}]}'
        + ",\n"
        + json.dumps(GOOD)
        + "\n]"
    )
    path.write_bytes(body.encode().replace(b"@@", b"\xc3\x28"))
    convs, report = load_sft(path, skip_bad=True)
    assert len(convs) == 2
    assert [str(b) for b in report.bad] == [f"{path}:3: invalid UTF-8: byte 0xc3 in this record"]
    assert "\\xc3" in report.bad[0].raw


# ------------------------------------------------------------------------------------------------
# sources: gzip, directories, datasets, lists, missing paths


def test_gzip_sources_and_corrupt_gzip(tmp_path):
    lines = (json.dumps(GOOD) + "\n").encode() * 3
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    with gzip.open(tmp_path / "b.json.gz", "wb") as f:
        f.write(json.dumps([GOOD, GOOD]).encode())
    convs, report = load_sft([tmp_path / "a.jsonl.gz", tmp_path / "b.json.gz"])
    assert len(convs) == 5 and report.sources == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.json.gz")]

    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(gzip.compress(lines)[:-12])  # truncated stream
    convs, report = load_sft(corrupt, skip_bad=True)
    assert len(report.bad) == 1 and "cannot read the rest of the file" in report.bad[0].reason
    notgz = tmp_path / "d.jsonl.gz"
    notgz.write_bytes(b"plain text")
    _, report = load_sft(notgz, skip_bad=True)
    assert report.bad[0].line == 1 and "cannot read the rest of the file" in report.bad[0].reason


def test_directory_of_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD])
    (tmp_path / "a.json").write_text(json.dumps([GOOD, GOOD]))
    (tmp_path / "notes.txt").write_text("ignored")
    convs, report = load_sft(tmp_path)
    assert len(convs) == 3 and report.sources == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="holds no .jsonl"):
        load_sft(empty)


def test_datasets_objects_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD, {"messages": [U("a")]}])
    convs, report = load_sft(ds, skip_bad=True)
    assert convs == [GOOD["messages"]]
    assert [str(b) for b in report.bad] == ["<dataset>:record 1: no assistant turn"]

    ds.save_to_disk(str(tmp_path / "saved"))
    convs, report = load_sft(tmp_path / "saved", skip_bad=True)
    assert [str(b) for b in report.bad] == [f"{tmp_path / 'saved'}:record 1: no assistant turn"]
    convs, _ = load_sft(datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}))
    assert convs == [GOOD["messages"]]
    # Arrow fills absent columns with null: mixed formats in one Dataset still detect per row
    mixed = datasets.Dataset.from_list(
        [{**GOOD, "instruction": None, "output": None}, {"messages": None, "instruction": "a", "output": "b"}]
    )
    convs, report = load_sft(mixed)
    assert convs == [GOOD["messages"]] * 2 and report.formats == {"openai": 1, "alpaca": 1}


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or directory"):
        load_sft("org/some-hub-dataset")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataSourceError, match="unsupported file type"):
        load_sft(tmp_path / "d.csv")
    with pytest.raises(DataSourceError, match="unsupported source type int"):
        load_sft(3)


def test_registry_accepts_a_new_kind(tmp_path, monkeypatch):
    # A stand-in for the later preference kind: same reading, errors and accounting.
    monkeypatch.setitem(data_mod._FORMATS, "toy", {})

    def parse(rec):
        if not isinstance(rec.get("x"), int):
            raise RecordError("'x' must be an integer")
        return Parsed(rec["x"] * 2)

    register_format("toy", RecordFormat("ints", lambda r: "x" in r, parse, "x"))
    values, report = load_records(
        write_jsonl(tmp_path / "t.jsonl", [{"x": 1}, {"x": "a"}, {"x": 3}]), kind="toy", skip_bad=True
    )
    assert values == [2, 6] and report.kind == "toy" and report.formats == {"ints": 2}
    assert [b.reason for b in report.bad] == ["'x' must be an integer"]
    with pytest.raises(ValueError, match="unknown data kind 'nope'"):
        load_records(tmp_path / "t.jsonl", kind="nope")


def test_bad_record_str_forms():
    assert str(BadRecord("f.jsonl", 3, "why")) == "f.jsonl:3: why"
    assert str(BadRecord("f.json", None, "why", record=4)) == "f.json:record 4: why"
    assert str(BadRecord("f.json", None, "empty, no records")) == "f.json: empty, no records"


# ------------------------------------------------------------------------------------------------
# fuzzing the JSONL loader: only DataError, and the accounting always adds up

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
turn = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bot", ""]) | json_values,
        "content": st.text(max_size=6) | json_values,
    }
)
sharegpt_turn = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "observation", "function_call", "x"]),
        "value": st.text(max_size=6) | json_values,
    }
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5) | json_values}),
    st.fixed_dictionaries(
        {"conversations": st.lists(sharegpt_turn, max_size=5)}, optional={"system": json_values}
    ),
    st.fixed_dictionaries(
        {"instruction": st.text(max_size=5) | json_values, "output": st.text(max_size=5) | json_values},
        optional={"input": json_values, "history": json_values},
    ),
    st.fixed_dictionaries({"chosen": st.text(alphabet="HumanAssistant:\n x", max_size=40) | json_values}),
)
line = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    records.map(lambda r: json.dumps(r)[: len(json.dumps(r)) // 2].encode()),  # cut short
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=8))
def test_fuzz_jsonl_loader_only_raises_data_error(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    content = b"\n".join(lines)
    path.write_bytes(content)
    try:
        load_sft(path)
        raised = False
    except DataError:
        raised = True
    rejects = tmp_path / "rejects.jsonl"
    convs, report = load_sft(path, skip_bad=True, rejects_path=rejects)
    physical = content.split(b"\n")
    if physical and physical[0].startswith(b"\xef\xbb\xbf"):
        physical[0] = physical[0][3:]
    records_in_file = sum(1 for p in physical if p.strip())
    assert report.read == max(records_in_file, 1)  # an empty file counts as one bad entry
    assert report.read == report.used + report.skipped + report.dropped_no_trainable
    assert report.skipped == len(report.bad) and report.used == len(convs)
    assert raised == bool(report.bad)
    assert len(rejects.read_text(encoding="utf-8").splitlines()) == report.skipped
    for conv in convs:
        assert any(m["role"] == "assistant" for m in conv)
        assert all(isinstance(m["content"], str) for m in conv)


# ------------------------------------------------------------------------------------------------
# tokenize_sft


def test_tokenize_sft_drops_untrainable_examples_and_keeps_the_invariant(tmp_path, monkeypatch):
    import chatml

    def fake_encode(messages, tokenizer, max_length=None, train_on="all_assistant", default_system=None):
        # one token per character of each turn; assistant characters are trained
        ids, labels = [], []
        for m in messages:
            for ch in m["content"]:
                ids.append(ord(ch))
                labels.append(ord(ch) if m["role"] == "assistant" else -100)
        truncated = max_length is not None and len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        return {
            "input_ids": ids,
            "labels": labels,
            "truncated": truncated,
            "num_trainable": sum(x != -100 for x in labels),
        }

    monkeypatch.setattr(chatml, "encode_conversation", fake_encode)
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [U("ab"), A("cd")]},
            {"messages": [U("abcdef"), A("g")]},
            {"messages": [U("a"), A("bcdefgh")]},
            "bad",
        ],
    )
    convs, report = load_sft(path, skip_bad=True)
    examples = tokenize_sft(convs, tokenizer=None, max_length=5, report=report)
    assert [e["input_ids"] for e in examples] == [[97, 98, 99, 100], [97, 98, 99, 100, 101]]
    assert (report.read, report.used, report.skipped, report.dropped_no_trainable, report.truncated) == (
        4,
        2,
        1,
        1,
        1,
    )
    assert report.read == report.used + report.skipped + report.dropped_no_trainable
    assert report.tokens.min == 4 and report.tokens.max == 5 and report.tokens.trainable_tokens == 6
    assert "dropped 1 (no trainable token)" in report.summary()

    fresh = DataReport()
    tokenize_sft(convs, tokenizer=None, max_length=5, report=fresh)
    assert (fresh.read, fresh.used, fresh.dropped_no_trainable) == (3, 2, 1)


def test_tokenize_sft_with_qwen_counts_truncation():
    chatml = pytest.importorskip("chatml")
    tok = chatml.qwen_tokenizer()
    convs = [
        [U("Hello"), A("Hi there!")],
        [U("word " * 200), A("short")],  # user turn alone exceeds 64 tokens: nothing trainable left
        [U("Tell me"), A("more " * 100)],  # truncated, still trainable
    ]
    report = DataReport()
    examples = tokenize_sft(convs, tok, max_length=64, report=report)
    assert len(examples) == 2
    assert (report.used, report.dropped_no_trainable, report.truncated) == (2, 1, 1)
    assert examples[0]["input_ids"] == [
        151644,
        872,
        198,
        9707,
        151645,
        198,
        151644,
        77091,
        198,
        13048,
        1052,
        0,
        151645,
        198,
    ]
    assert examples[0]["labels"] == [-100] * 9 + [13048, 1052, 0, 151645, -100]
    assert all(len(e["input_ids"]) <= 64 for e in examples)


# ------------------------------------------------------------------------------------------------
# the real data sets


@needs_shared_data
@pytest.mark.parametrize(
    ("rel", "read", "used", "bad_lines", "fmt"),
    [
        ("llama-factory/alpaca_en_demo.json", 999, 999, [], "alpaca"),
        ("llama-factory/glaive_toolcall_en_demo.json", 300, 300, [], "sharegpt"),
        ("medicalgpt-zh/sharegpt_zh_1K_format.jsonl", 1000, 999, [781], "sharegpt"),
        (
            "hh-rlhf/harmless-base-pairs.jsonl.gz",
            1800,
            1790,
            [391, 503, 579, 851, 971, 1021, 1305, 1438, 1520, 1582],
            "hh",
        ),
    ],
)
def test_real_data_sets(rel, read, used, bad_lines, fmt):
    path = SHARED_DATA / rel
    if bad_lines:
        with pytest.raises(DataError):
            load_sft(path)
    convs, report = load_sft(path, skip_bad=True)
    assert (report.read, report.used, report.skipped) == (read, used, len(bad_lines))
    assert [b.line for b in report.bad] == bad_lines
    assert report.formats == {fmt: used} and len(convs) == used


@needs_shared_data
def test_real_tool_calls_and_hh_content():
    convs, _ = load_sft(SHARED_DATA / "llama-factory/glaive_toolcall_en_demo.json")
    assert [m["role"] for m in convs[0]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert convs[0][3] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "search_recipes",
                    "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]},
                },
            }
        ],
    }
    assert [t["function"]["name"] for t in convs[0].tools] == ["search_recipes"]
    convs, _ = load_sft(SHARED_DATA / "hh-rlhf/harmless-base-pairs.jsonl.gz", skip_bad=True)
    assert convs[0][:2] == [
        U("what are some pranks with a pen i can do?"),
        A("Are you looking for practical joke ideas?"),
    ]


@needs_shared_data
def test_real_data_truncation_with_qwen():
    chatml = pytest.importorskip("chatml")
    tok = chatml.qwen_tokenizer(template="qwen2.5")  # Qwen2's template renders no tool calls
    convs, report = load_sft(SHARED_DATA / "llama-factory/glaive_toolcall_en_demo.json")
    full = [len(chatml.encode_conversation(c, tok)["input_ids"]) for c in convs]
    examples = tokenize_sft(convs, tok, max_length=256, report=report)
    assert report.truncated == sum(n > 256 for n in full) - report.dropped_no_trainable > 0
    assert report.read == report.used + report.skipped + report.dropped_no_trainable == 300
    assert len(examples) == report.used and max(len(e["input_ids"]) for e in examples) == 256
    assert report.tokens.max == 256 and 0 < report.tokens.trainable_fraction < 1


# ------------------------------------------------------------------------------------------------
# CLI


def run_cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "align.data", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    return proc


def test_cli_exit_codes_and_output(tmp_path):
    clean = write_jsonl(tmp_path / "clean.jsonl", [GOOD, {"instruction": "a", "output": "b"}])
    proc = run_cli(clean)
    assert proc.returncode == 0, proc.stderr
    assert "read 2, used 2, skipped 0 (bad)" in proc.stdout
    assert "formats: alpaca 1, openai 1" in proc.stdout

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", "{oops", {"messages": [U("a")]}])
    rejects = tmp_path / "rejects.jsonl"
    proc = run_cli(bad, clean, "--rejects", rejects)
    assert proc.returncode == 1
    assert "read 5, used 3, skipped 2 (bad)" in proc.stdout
    assert (
        f"{bad}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)" in proc.stdout
    )
    assert f"{bad}:4: no assistant turn" in proc.stdout
    assert len(rejects.read_text().splitlines()) == 2

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)) * 50)
    assert run_cli(garbage).returncode == 1

    assert run_cli(tmp_path / "missing.jsonl").returncode == 2
    proc = run_cli(clean, "--format", "nope")
    assert proc.returncode == 2 and "unknown sft format" in proc.stderr
    proc = run_cli(clean, "--tokenizer", tmp_path / "no-tokenizer")
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    assert run_cli(clean, "--kind", "nope").returncode == 2


def test_cli_token_statistics_with_qwen(tmp_path):
    pytest.importorskip("chatml")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [U("Tell me"), A("more " * 100)]}])
    args = (path, "--tokenizer", "qwen", "--max-length", "64", "--train-on", "last_assistant")
    # By default conversations get the template's own system prompt, as apply_chat_template serves them:
    # the Qwen2 template's "You are a helpful assistant." turn is 11 tokens.
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "truncated to 64 tokens: 1" in proc.stdout
    assert (
        "tokens per example: min 23, mean 43.5, p50 23, p95 64, max 64; total 87, trainable 45 (51.7%)"
        in proc.stdout
    )
    proc = run_cli(*args, "--default-system", "none")
    assert proc.returncode == 0, proc.stderr
    assert (
        "tokens per example: min 12, mean 38.0, p50 12, p95 64, max 64; total 76, trainable 56 (73.7%)"
        in proc.stdout
    )
