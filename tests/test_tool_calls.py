"""Tool calling the Qwen2.5 way (issue #16) and the template's default system prompt (issue #13): tool
definitions, calls and results go through the tokenizer's own chat template, so the ids equal
``apply_chat_template(messages, tools=...)``; every ``<tool_call>`` block is trained, every
``<tool_response>`` block masked; bad calls are ``file:line: reason``."""

import io
import json
import pickle
from pathlib import Path

import pytest

import chatml
from align.config import PPOConfig, SFTConfig
from align.data import (
    DataError,
    load_preference,
    load_prompt_file,
    load_sft,
    tokenize_preference,
    tokenize_sft,
)
from align.data.cli import show
from align.train.dpo import tokenize_dpo_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GLAIVE = SHARED / "llama-factory" / "glaive_toolcall_en_demo.json"
needs_glaive = pytest.mark.skipif(not GLAIVE.is_file(), reason="../shared/data is not present")
M = -100
TOOL_CALL, END_TOOL_CALL, IM_END_ID = 151657, 151658, 151645  # <tool_call>, </tool_call>, <|im_end|>
DEFAULT = SFTConfig().default_system  # what a default config renders: the template's own system prompt


@pytest.fixture(scope="module")
def qwen25():
    return chatml.qwen_tokenizer(template="qwen2.5")


def runs(tok, ids, labels, trained=True):
    """Decoded text of each maximal run of trained (or of masked) tokens."""
    out, cur = [], []
    for i, label in zip(ids, labels, strict=True):
        if (label != M) == trained:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI = {
    "messages": [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [  # two calls in one turn; arguments as the API's JSON string, and as an object
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"city": "Oslo"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},  # consecutive results
        {"role": "tool", "tool_call_id": "c2", "content": "14:05"},
        {"role": "assistant", "content": "3 degrees, 14:05."},
    ],
    "tools": [{"type": "function", "function": WEATHER}, TIME],  # OpenAI form and bare schema
}
CALLS_TEXT = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
)
AFTER_SYSTEM = (
    "<|im_start|>user\nWeather and time in Oslo?<|im_end|>\n"
    "<|im_start|>assistant\n" + CALLS_TEXT + "\n"
    "<|im_start|>user\n<tool_response>\n"
    '{"temp": 3}\n</tool_response>\n<tool_response>\n14:05\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n3 degrees, 14:05.<|im_end|>\n"
)


def test_openai_tool_calls_render_as_qwen2_5_and_train_only_the_calls(tmp_path, qwen25):
    (conv,), _ = load_sft(write_jsonl(tmp_path / "d.jsonl", [OPENAI]))
    (ex,) = tokenize_sft([conv], qwen25, max_length=None, default_system=DEFAULT)
    assert ex["input_ids"] == qwen25.apply_chat_template(list(conv), tools=conv.tools)["input_ids"]
    text = qwen25.decode(ex["input_ids"])
    # The Qwen2.5 form, written out: the default system prompt, then the # Tools block, one tool per line.
    head = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps({"type": "function", "function": WEATHER})
        + "\n"
        + json.dumps({"type": "function", "function": TIME})
        + "\n</tools>\n\n"
    )
    assert text.startswith(head) and text.endswith("</tool_call><|im_end|>\n" + AFTER_SYSTEM)
    assert runs(qwen25, ex["input_ids"], ex["labels"]) == [CALLS_TEXT, "3 degrees, 14:05.<|im_end|>"]
    masked = runs(qwen25, ex["input_ids"], ex["labels"], trained=False)
    assert "<|im_start|>user\n<tool_response>\n" in masked[-2] and masked[-2].endswith(
        "14:05\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_sharegpt_several_calls_consecutive_results_and_qwen2_is_refused(tmp_path, qwen25):
    rec = {
        "conversations": [
            {"from": "human", "value": "Weather and time in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        {"name": "get_time", "arguments": {"city": "Oslo"}},
                    ]
                ),
            },
            {"from": "observation", "value": '{"temp": 3}'},
            {"from": "observation", "value": "14:05"},
            {"from": "gpt", "value": "3 degrees, 14:05."},
        ],
        "tools": json.dumps([WEATHER, TIME]),
    }
    (conv,), report = load_sft(write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert report.formats == {"sharegpt": 1}
    (ex,) = tokenize_sft([conv], qwen25, max_length=None, default_system=DEFAULT)
    assert ex["input_ids"] == qwen25.apply_chat_template(list(conv), tools=conv.tools)["input_ids"]
    assert qwen25.decode(ex["input_ids"]).endswith(AFTER_SYSTEM)
    assert runs(qwen25, ex["input_ids"], ex["labels"]) == [CALLS_TEXT, "3 degrees, 14:05.<|im_end|>"]
    # Qwen2-Instruct's template renders neither tools nor calls: training on it would teach empty replies.
    with pytest.raises(chatml.TemplateError, match="does not render tool definitions"):
        tokenize_sft([conv], chatml.qwen_tokenizer(template="qwen2"), max_length=None, default_system=DEFAULT)


@needs_glaive
def test_glaive_public_path_equals_the_qwen2_5_template(qwen25):
    convs, report = load_sft(GLAIVE)
    examples = tokenize_sft(convs, qwen25, max_length=None, default_system=DEFAULT, report=report)
    assert len(examples) == len(convs) == 300 and report.dropped_no_trainable == 0
    calls = results = 0
    for conv, ex in zip(convs, examples, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids == qwen25.apply_chat_template(list(conv), tools=conv.tools)["input_ids"]
        # The system turn (with the tools block's own <tool_call> example) is masked; after it every
        # <tool_call> and </tool_call> token is the model's call: trained.
        system_end = ids.index(IM_END_ID) + 1
        assert labels[:system_end] == [M] * system_end
        assert all(
            labels[i] == t
            for i, t in enumerate(ids[system_end:], system_end)
            if t in (TOOL_CALL, END_TOOL_CALL)
        )
        trained = runs(qwen25, ids, labels)
        assert not any("<tool_response>" in r for r in trained)
        calls += sum(r.startswith("<tool_call>\n") for r in trained)
        results += qwen25.decode(ids).count("<tool_response>")
    assert (calls, results) == (211, 211)  # every function_call turn trained, every observation masked


@needs_glaive
def test_qwen2_template_without_tools_matches_and_with_tools_is_refused():
    qwen2 = chatml.qwen_tokenizer(template="qwen2")
    convs, _ = load_sft(GLAIVE)
    plain = [c for c in convs if not c.tools]
    assert len(plain) == 109
    examples = tokenize_sft(plain, qwen2, max_length=None, default_system=DEFAULT)
    assert [e["input_ids"] for e in examples] == [
        qwen2.apply_chat_template(list(c))["input_ids"] for c in plain
    ]
    with pytest.raises(chatml.TemplateError, match="does not render tool definitions"):
        chatml.encode_conversation(next(c for c in convs if c.tools), qwen2)


def test_default_system_is_the_templates_own(qwen25):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert DEFAULT == "template" and PPOConfig().default_system == "template"
    qwen2 = chatml.qwen_tokenizer(template="qwen2")
    smollm2 = chatml.qwen_tokenizer(template="qwen2")  # same ChatML tokens; SmolLM2's published template
    from align.assets import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_DEFAULT_SYSTEM

    smollm2.chat_template = SMOLLM2_CHAT_TEMPLATE
    for tok, system in (
        (qwen25, chatml.QWEN2_5_DEFAULT_SYSTEM),
        (qwen2, chatml.QWEN2_DEFAULT_SYSTEM),
        (smollm2, SMOLLM2_DEFAULT_SYSTEM),
    ):
        assert chatml.template_default_system(tok) == system
        (ex,) = tokenize_sft([messages], tok, max_length=None, default_system=DEFAULT)
        assert ex["input_ids"] == tok.apply_chat_template(messages)["input_ids"]
        assert tok.decode(ex["input_ids"]).startswith(
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user"
        )
        assert (
            chatml.encode_prompt(messages[:1], tok, default_system=DEFAULT)
            == tok.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
        )
        for none in (None, "none"):  # opting out: no system turn at all
            (ex,) = tokenize_sft([messages], tok, max_length=None, default_system=none)
            assert tok.decode(ex["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>")
    # the ids of the worked example of DESIGN.md, with the Qwen2 default system prompt
    (ex,) = tokenize_sft([messages], qwen2, max_length=None, default_system=DEFAULT)
    assert ex["input_ids"][:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


BAD = [
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{oops"}]},
        "'conversations[1].value': the function call is not valid JSON: Expecting property name enclosed in "
        "double quotes (column 2)",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "observation", "value": "r"},
                {"from": "gpt", "value": "c"},
            ]
        },
        "conversations[2]: a tool result with no preceding call (the assistant turn before it calls no function)",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "function_call", "value": '{"name": "get_tme", "arguments": {}}'},
            ],
            "tools": json.dumps([WEATHER, TIME]),
        },
        "conversations[1]: call to 'get_tme', a function not in 'tools' ('tools' has 'get_weather', 'get_time')",
    ),
]


def test_bad_calls_are_file_line_reason_or_set_aside(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, *(rec for rec, _ in BAD)])
    with pytest.raises(DataError, match=f"{path}:2: 'conversations"):
        load_sft(path)
    rejects = tmp_path / "rejects.jsonl"
    convs, report = load_sft(path, skip_bad=True, rejects_path=rejects)
    assert len(convs) == 1 and report.skipped == 3
    assert [str(b) for b in report.bad] == [f"{path}:{n}: {reason}" for n, (_, reason) in enumerate(BAD, 2)]
    assert [json.loads(line)["line"] for line in rejects.read_text().splitlines()] == [2, 3, 4]


def test_preference_reply_that_is_a_tool_call(tmp_path, qwen25):
    rec = {
        "conversations": [{"from": "human", "value": "Weather in Oslo?"}],
        "chosen": {
            "from": "function_call",
            "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        },
        "rejected": {"from": "gpt", "value": "I cannot check the weather."},
        "tools": json.dumps([WEATHER]),
    }
    (pair,), _ = load_preference(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert pair["tools"] == [{"type": "function", "function": WEATHER}]
    (ex,) = tokenize_preference([pair], qwen25, max_length=None, default_system=DEFAULT)
    full = qwen25.apply_chat_template([*pair["prompt"], *pair["chosen"]], tools=pair["tools"])["input_ids"]
    assert ex["chosen_ids"] == full[:-1] and ex["chosen_ids"][-1] == IM_END_ID  # scored at its <|im_end|>
    assert qwen25.decode(ex["chosen_ids"][-ex["chosen_len"] :]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    )
    (dpo,), skipped = tokenize_dpo_pairs([pair], qwen25, max_length=None, default_system=DEFAULT)
    assert skipped == 0 and dpo["chosen"]["input_ids"] == full
    assert runs(qwen25, dpo["chosen"]["input_ids"], dpo["chosen"]["labels"]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    ]


def test_prompts_carry_tools_into_the_generation_prompt(tmp_path, qwen25):
    good = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER]}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": "Hi"}])
    (with_tools, plain) = load_prompt_file(path)
    assert with_tools.tools == [{"type": "function", "function": WEATHER}] and plain.tools is None
    ids = chatml.encode_prompt(with_tools, qwen25, default_system=DEFAULT)
    assert (
        ids
        == qwen25.apply_chat_template(list(with_tools), tools=with_tools.tools, add_generation_prompt=True)[
            "input_ids"
        ]
    )
    assert "<tools>" in qwen25.decode(ids)
    bad = {
        "messages": [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "nope", "arguments": {}}}],
            },
            {"role": "tool", "content": "r"},
        ],
        "tools": [WEATHER],
    }
    with pytest.raises(DataError, match=rf"^{path}:2: messages\[1\]: call to 'nope'"):
        load_prompt_file(write_jsonl(path, [good, bad]))


def test_conversation_keeps_its_tools_through_pickle(tmp_path):
    (conv,), _ = load_sft(write_jsonl(tmp_path / "d.jsonl", [OPENAI]))
    back = pickle.loads(pickle.dumps(conv))
    assert back == conv and back.tools == conv.tools and isinstance(back, chatml.Conversation)


def test_show_marks_trained_spans_with_counts(tmp_path, qwen25):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI])
    out = io.StringIO()
    show([str(path)], qwen25, n=1, out=out)
    text = out.getvalue()
    (ex,) = tokenize_sft(load_sft(path)[0], qwen25, max_length=None, default_system=DEFAULT)
    trained = sum(label != M for label in ex["labels"])
    assert text.startswith(f"--- example 1: trained {trained} / {len(ex['input_ids'])} tokens\n")
    assert "<|im_start|>assistant\n[[" + CALLS_TEXT + "]]\n<|im_start|>user\n<tool_response>" in text
