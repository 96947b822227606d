"""ChatML encoding with loss masks: exact ids and labels, equality with the official chat templates,
label invariants, truncation, and tokenizers that lack the ChatML tokens."""

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import chatml
from chatml import IM_END, IM_START, encode_conversation, encode_prompt, render_conversation

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QWEN2_SYSTEM = "You are a helpful assistant."
M = -100  # masked label

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

FRAGMENTS = [
    "Hello",
    " world",
    "你好，世界",
    "中文测试。",
    "こんにちは",
    "안녕하세요",
    "🎉",
    "👍🏽",
    "👨‍👩‍👧",
    "def f(x):\n    return x ** 2\n",
    "{'a': [1, 2]};",
    "  ",
    " ",
    "\n",
    "\n\n",
    "   \n",
    "\r\n",
    "\t",
    "\u3000",
    "I'm",
    "123",
    "e\u0301",
    "!",
    "<b>",
]
ALPHABET = sorted(set("".join(FRAGMENTS)) | set("abcXYZ019 \n\r\t.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`"))
contents = st.one_of(
    st.just(""),
    st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join),
    st.text(alphabet=st.sampled_from(ALPHABET), max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@st.composite
def conversations(draw, roles=("user", "assistant", "tool", "system")):
    """1-8 turns, optionally starting with a system turn; any order of the other roles."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(contents)})
    for _ in range(draw(st.integers(min_value=1, max_value=8 - len(messages)))):
        messages.append({"role": draw(st.sampled_from(roles)), "content": draw(contents)})
    # Control tokens typed inside a message would be parsed as control tokens by any ChatML tokenizer (the
    # official template included); hypothesis finds them because it mines string constants from our code.
    assume(not any(t in m["content"] for m in messages for t in (IM_START, IM_END, "<|endoftext|>")))
    return messages


# ---------------------------------------------------------------- worked examples

WORKED = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
]
# fmt: off
WORKED_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,  # <|im_start|>system\n...<|im_end|>\n
    151644, 872, 198, 9707, 151645, 198,                              # <|im_start|>user\nHello<|im_end|>\n
    151644, 77091, 198, 13048, 1052, 0, 151645, 198,                  # <|im_start|>assistant\nHi there!<|im_end|>\n
]
WORKED_LABELS = [
    M, M, M, M, M, M, M, M, M, M, M,
    M, M, M, M, M, M,
    M, M, M, 13048, 1052, 0, 151645, M,
]
# fmt: on


def test_worked_example_ids_and_labels(qwen_tokenizer):
    out = encode_conversation(WORKED, qwen_tokenizer)
    assert out["input_ids"] == WORKED_IDS
    assert out["labels"] == WORKED_LABELS
    assert out["truncated"] is False
    assert out["num_trainable"] == 4
    assert out["input_ids"] == qwen_tokenizer.apply_chat_template(WORKED)["input_ids"]


def test_default_system_is_prepended_only_without_a_system_turn(qwen_tokenizer):
    without = encode_conversation(WORKED[1:], qwen_tokenizer, default_system=QWEN2_SYSTEM)
    assert without["input_ids"] == WORKED_IDS and without["labels"] == WORKED_LABELS
    other = [{"role": "system", "content": "Be brief."}, *WORKED[1:]]
    assert render_conversation(other, default_system=QWEN2_SYSTEM).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )
    assert (
        render_conversation(WORKED[1:])
        == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
    )


TWO_ROUNDS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]
# fmt: off
TWO_ROUNDS_IDS = [
    151644, 872, 198, 9707, 151645, 198,
    151644, 77091, 198, 13048, 1052, 0, 151645, 198,
    151644, 872, 198, 13048, 151645, 198,
    151644, 77091, 198, 9707, 0, 151645, 198,
]
# fmt: on


def test_all_assistant_versus_last_assistant(qwen_tokenizer):
    first_turn = [M, M, M, 13048, 1052, 0, 151645, M]
    last_turn = [M, M, M, 9707, 0, 151645, M]
    user_turn = [M] * 6
    all_turns = encode_conversation(TWO_ROUNDS, qwen_tokenizer)
    assert all_turns["input_ids"] == TWO_ROUNDS_IDS
    assert all_turns["labels"] == user_turn + first_turn + user_turn + last_turn
    assert all_turns["num_trainable"] == 7
    last = encode_conversation(TWO_ROUNDS, qwen_tokenizer, train_on="last_assistant")
    assert last["input_ids"] == TWO_ROUNDS_IDS
    assert last["labels"] == user_turn + [M] * 8 + user_turn + last_turn
    assert last["num_trainable"] == 3
    with pytest.raises(ValueError, match="train_on"):
        encode_conversation(TWO_ROUNDS, qwen_tokenizer, train_on="everything")


def test_tool_turn_is_masked(qwen_tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Calling"},
        {"role": "tool", "content": "Sunny"},
        {"role": "assistant", "content": "Sunny!"},
    ]
    out = encode_conversation(messages, qwen_tokenizer)
    # fmt: off
    assert out["input_ids"] == [
        151644, 872, 198, 28981, 30, 151645, 198,
        151644, 77091, 198, 48853, 151645, 198,
        151644, 14172, 198, 50, 27297, 151645, 198,     # <|im_start|>tool\nSunny<|im_end|>\n
        151644, 77091, 198, 50, 27297, 0, 151645, 198,
    ]
    assert out["labels"] == [
        M, M, M, M, M, M, M,
        M, M, M, 48853, 151645, M,
        M, M, M, M, M, M, M,
        M, M, M, 50, 27297, 0, 151645, M,
    ]
    # fmt: on


def test_boundary_token_straddling_header_and_content_is_trained(qwen_tokenizer):
    # The header's "\n" and the content's leading "\n" merge into one token "\n\n" (271): it is trained.
    out = encode_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nHi"}], qwen_tokenizer
    )
    assert out["input_ids"][-6:] == [151644, 77091, 271, 13048, 151645, 198]
    assert out["labels"][-6:] == [M, M, 271, 13048, 151645, M]


def test_empty_assistant_content_trains_only_im_end(qwen_tokenizer):
    out = encode_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], qwen_tokenizer
    )
    assert out["input_ids"][-5:] == [151644, 77091, 198, 151645, 198]
    assert out["labels"][-5:] == [M, M, M, 151645, M]
    assert out["num_trainable"] == 1


def test_encode_prompt(qwen_tokenizer):
    prompt = encode_prompt(WORKED[:2], qwen_tokenizer)
    assert prompt == WORKED_IDS[:17] + [151644, 77091, 198]
    assert prompt == qwen_tokenizer.apply_chat_template(WORKED[:2], add_generation_prompt=True)["input_ids"]
    assert encode_prompt(WORKED[1:2], qwen_tokenizer, default_system=QWEN2_SYSTEM) == prompt
    assert render_conversation(WORKED[1:2], add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_constants():
    assert (IM_START, IM_END) == ("<|im_start|>", "<|im_end|>")


# ---------------------------------------------------------------- validation


def test_unknown_role_is_named(qwen_tokenizer):
    with pytest.raises(ValueError, match="'narrator'"):
        encode_conversation([{"role": "narrator", "content": "Once"}], qwen_tokenizer)
    with pytest.raises(ValueError, match="'human'"):
        render_conversation([{"role": "human", "content": "hi"}])


def test_malformed_messages(qwen_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        encode_conversation([], qwen_tokenizer)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        encode_conversation([{"role": "user"}], qwen_tokenizer)
    with pytest.raises(TypeError, match="content must be a str"):
        encode_conversation([{"role": "user", "content": None}], qwen_tokenizer)
    with pytest.raises(TypeError):
        encode_conversation("hello", qwen_tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        encode_conversation(WORKED, qwen_tokenizer, max_length=0)


# ---------------------------------------------------------------- template equality


@SETTINGS
@given(messages=conversations())
def test_ids_equal_qwen2_template(qwen_tokenizer, messages):
    out = encode_conversation(messages, qwen_tokenizer, default_system=QWEN2_SYSTEM)
    assert out["input_ids"] == qwen_tokenizer.apply_chat_template(messages)["input_ids"]
    assert len(out["labels"]) == len(out["input_ids"])
    prompt = encode_prompt(messages, qwen_tokenizer, default_system=QWEN2_SYSTEM)
    assert prompt == qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def qwen2_5_tokenizer():
    return chatml.qwen_tokenizer(template="qwen2.5")


@SETTINGS
@given(messages=conversations(roles=("user", "assistant", "system")))
def test_ids_equal_qwen2_5_template(qwen2_5_tokenizer, messages):
    # Qwen2.5's template renders tool turns as <tool_response> blocks inside user turns, so no tool role here.
    out = encode_conversation(messages, qwen2_5_tokenizer, default_system=chatml.QWEN2_5_DEFAULT_SYSTEM)
    assert out["input_ids"] == qwen2_5_tokenizer.apply_chat_template(messages)["input_ids"]


def _sharegpt_to_messages(record):
    roles = {
        "system": "system",
        "human": "user",
        "gpt": "assistant",
        "function_call": "assistant",
        "observation": "tool",
    }
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]


def _real_conversations(limit=40):
    sharegpt = SHARED_DATA / "medicalgpt-zh" / "sharegpt_zh_1K_format.jsonl"
    toolcall = SHARED_DATA / "llama-factory" / "glaive_toolcall_en_demo.json"
    if not (sharegpt.is_file() and toolcall.is_file()):
        pytest.skip("shared/data is not present")
    with sharegpt.open(encoding="utf-8") as fh:
        records = [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]
    records += json.loads(toolcall.read_text(encoding="utf-8"))[:limit]
    return [_sharegpt_to_messages(r) for r in records]


def _trained_runs(tokenizer, ids, labels):
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token_id, label in zip(ids, labels, strict=True):
        if label != M:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def _check_runs(tokenizer, messages, out, train_on="all_assistant"):
    """Trained text is exactly each assistant content plus its <|im_end|> (one extra leading "\\n" where the
    header's newline merged into the content's first token)."""
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant = assistant[-1:]
    runs = _trained_runs(tokenizer, out["input_ids"], out["labels"])
    assert len(runs) == len(assistant)
    for run, content in zip(runs, assistant, strict=True):
        expected = unicodedata.normalize("NFC", content) + IM_END
        assert run.endswith(expected) and run[: len(run) - len(expected)] in ("", "\n"), (run, content)


def test_real_conversations(qwen_tokenizer):
    for messages in _real_conversations():
        out = encode_conversation(messages, qwen_tokenizer, default_system=QWEN2_SYSTEM)
        assert out["input_ids"] == qwen_tokenizer.apply_chat_template(messages)["input_ids"]
        assert out["num_trainable"] > 0
        _check_runs(qwen_tokenizer, messages, out)


# ---------------------------------------------------------------- label invariants


@SETTINGS
@given(messages=conversations(), train_on=st.sampled_from(["all_assistant", "last_assistant"]))
def test_label_invariants(qwen_tokenizer, messages, train_on):
    out = encode_conversation(messages, qwen_tokenizer, train_on=train_on)
    ids, labels = out["input_ids"], out["labels"]
    im_start_id, im_end_id = 151644, 151645
    assert len(ids) == len(labels)
    assert all(label in (M, token_id) for token_id, label in zip(ids, labels, strict=True))
    assert out["num_trainable"] == sum(label != M for label in labels)
    assert im_start_id not in labels

    # Turn boundaries from the ids alone: each turn starts at an <|im_start|> and closes at the next <|im_end|>.
    starts = [i for i, t in enumerate(ids) if t == im_start_id]
    ends = [i for i, t in enumerate(ids) if t == im_end_id]
    assert len(starts) == len(ends) == len(messages)
    roles = [m["role"] for m in messages]
    trained_turns = [k for k, role in enumerate(roles) if role == "assistant"]
    if train_on == "last_assistant":
        trained_turns = trained_turns[-1:]
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        # header = <|im_start|>, role token(s); newline may merge into the first content token
        header_len = len(qwen_tokenizer.encode(f"{IM_START}{roles[k]}", add_special_tokens=False))
        turn_labels = labels[start : end + 1]
        assert all(label == M for label in turn_labels[:header_len]), "header tokens must be masked"
        if k in trained_turns:
            assert turn_labels[-1] == im_end_id, "an assistant <|im_end|> must be trained"
            # The first token after the role is the header's "\n": masked when alone (198), trained when it
            # merged with leading newlines of the content. Everything after it is trained.
            first = start + header_len
            assert (labels[first] == M) == (ids[first] == 198)
            assert all(label != M for label in labels[first + 1 : end + 1])
        else:
            assert all(label == M for label in turn_labels)
        # the "\n" after <|im_end|> is never trained
        if end + 1 < len(labels):
            assert labels[end + 1] == M
    _check_runs(qwen_tokenizer, messages, out, train_on)


@SETTINGS
@given(messages=conversations(), data=st.data())
def test_truncation_keeps_ids_and_labels_aligned(qwen_tokenizer, messages, data):
    full = encode_conversation(messages, qwen_tokenizer)
    max_length = data.draw(st.integers(min_value=1, max_value=len(full["input_ids"]) + 3))
    cut = encode_conversation(messages, qwen_tokenizer, max_length=max_length)
    assert cut["input_ids"] == full["input_ids"][:max_length]
    assert cut["labels"] == full["labels"][:max_length]
    assert cut["truncated"] is (len(full["input_ids"]) > max_length)
    assert cut["num_trainable"] == sum(label != M for label in cut["labels"])


# ---------------------------------------------------------------- tokenizers without ChatML tokens


def _tiny_byte_tokenizer():
    """A 256-token byte-level BPE with no merges and no ChatML tokens (built here, no hub)."""
    from conftest import byte_tokenizer

    return byte_tokenizer(with_chatml=False)


def _tiny_qwen2_model(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def test_missing_chatml_tokens_error_then_fix():
    tok = _tiny_byte_tokenizer()
    assert len(tok) == 256
    with pytest.raises(ValueError, match=r"<\|im_start\|> and <\|im_end\|>.*add_chatml_tokens"):
        encode_conversation(WORKED, tok)
    with pytest.raises(ValueError, match="add_chatml_tokens"):
        encode_prompt(WORKED, tok)

    model = _tiny_qwen2_model(vocab_size=256)
    assert chatml.add_chatml_tokens(tok, model) == 2
    assert len(tok) == 258
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [256, 257]
    assert model.get_input_embeddings().num_embeddings == 258
    assert model.get_output_embeddings().out_features == 258  # untied head grown too
    assert chatml.add_chatml_tokens(tok, model) == 0  # idempotent

    out = encode_conversation(WORKED, tok)
    assert out["input_ids"].count(256) == 3 and out["input_ids"].count(257) == 3
    assert tok.decode(out["input_ids"]) == render_conversation(WORKED)
    assert tok.decode([t for t in out["labels"] if t != M]) == "Hi there!" + IM_END
    logits = model(torch.tensor([out["input_ids"]])).logits
    assert logits.shape == (1, len(out["input_ids"]), 258)


def test_add_chatml_tokens_partial_and_never_shrinks():
    tok = _tiny_byte_tokenizer()
    tok.add_special_tokens({"eos_token": IM_END})
    with pytest.raises(ValueError, match=r"for <\|im_start\|>, so"):
        encode_conversation(WORKED, tok)
    big = _tiny_qwen2_model(vocab_size=300)  # like Qwen2 checkpoints: padding rows beyond the tokenizer
    assert chatml.add_chatml_tokens(tok, big) == 1
    assert big.get_input_embeddings().num_embeddings == 300
    assert chatml.add_chatml_tokens(tok) == 0


def test_slow_path_tokenizer_is_refused():
    class NotFast:
        is_fast = False
        unk_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [1] if text == IM_START else [2]

    with pytest.raises(ValueError, match="fast tokenizer"):
        encode_conversation(WORKED, NotFast())


def _smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer when align's offline cache already holds it (no 30 s build here)."""
    try:
        from align.assets import SMOLLM2_NAME, cache_root
    except ImportError:
        pytest.skip("align.assets not available")
    path = cache_root() / SMOLLM2_NAME
    if not (path / "tokenizer.json").is_file() or not (path / "ALIGN_CACHE_COMPLETE.json").is_file():
        pytest.skip("SmolLM2 cache not built")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_other_chatml_tokenizer_smollm2():
    tok = _smollm2_tokenizer()
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [1, 2]
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = [
        {"role": "user", "content": "\nHello 世界"},
        {"role": "assistant", "content": "\n\nHi there!  "},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "  \n y"},
    ]
    out = encode_conversation(messages, tok, default_system=system)
    assert out["input_ids"] == tok.apply_chat_template(messages)["input_ids"]
    assert 1 not in out["labels"] and out["labels"].count(2) == 2
    runs = _trained_runs(tok, out["input_ids"], out["labels"])
    assert [run.endswith(m["content"] + IM_END) for run, m in zip(runs, messages[1::2], strict=True)] == [
        True,
        True,
    ]
