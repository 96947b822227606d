"""The offline Qwen2/2.5 tokenizer: official ids, agreement with tiktoken, the on-disk cache."""

import hashlib
import importlib
import json
import time
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import chatml

# `chatml.qwen_tokenizer` is the function (the package re-exports it over the submodule's name).
qt = importlib.import_module("chatml.qwen_tokenizer")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Pieces that stress the pre-tokeniser: CJK, emoji (ZWJ, skin tone, flags), code, whitespace runs, CRLF,
# contractions, digits, combining marks (NFC), right-to-left scripts.
FRAGMENTS = [
    "Hello",
    " world",
    "你好，世界",
    "中文测试。",
    "こんにちは",
    "안녕하세요",
    "Привет",
    "مرحبا",
    "שלום",
    "🎉",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "def f(x):\n    return x ** 2\n",
    "{'a': [1, 2]};",
    "if (a && b) { c++; }",
    "  ",
    "   \n",
    "\n\n\n",
    "\r\n",
    "\t\t",
    " \u00a0",
    "\u3000",
    "I'm",
    " they'll",
    "DON'T",
    "12345",
    "3.14159",
    "e\u0301",
    "A\u030a",
    "...",
    "!!!",
    "<tag>",
    "</tag>",
]
ALPHABET = sorted(set("".join(FRAGMENTS)) | set("abcXYZ019 \n\r\t.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`"))
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=10).map("".join),
    st.text(alphabet=st.sampled_from(ALPHABET), max_size=60),
    # Any Unicode scalar value (surrogates cannot be UTF-8 encoded; private-use/unassigned are fine).
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)


@pytest.fixture(scope="module")
def tiktoken_encoding() -> tiktoken.Encoding:
    """tiktoken itself on the same ranks and pattern: the reference our BPE must reproduce."""
    return tiktoken.Encoding(
        name="qwen2-ranks", pat_str=qt.QWEN2_PATTERN, mergeable_ranks=qt.load_qwen_ranks(), special_tokens={}
    )


def test_ranks_file_is_the_expected_one():
    path = qt.qwen_tiktoken_path()
    assert hashlib.md5(path.read_bytes()).hexdigest() == "f0bffbad8c413a41d51fe6da4a7e99d7"
    assert len(qt.load_qwen_ranks()) == 151643


def test_wrong_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(qt.TokenizerAssetError, match="md5"):
        qt.load_qwen_ranks(bad)


def test_added_token_ids_and_flags(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    decoder = qwen_tokenizer.added_tokens_decoder
    for offset, (content, special) in enumerate(qt.QWEN2_ADDED_TOKENS):
        token_id = 151643 + offset
        assert decoder[token_id].content == content
        assert decoder[token_id].special is special, content
        # Added tokens are never split by BPE, special or not.
        assert qwen_tokenizer.encode(content, add_special_tokens=False) == [token_id]
    assert len(qwen_tokenizer) == 151665
    assert "<tool_call>" not in qwen_tokenizer.all_special_tokens


def test_special_token_roles(qwen_tokenizer):
    # Qwen2-Instruct: eos is <|im_end|>, pad is <|endoftext|>, no BOS is ever added.
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>" and qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.bos_token is None
    assert qwen_tokenizer("Hi")["input_ids"] == [13048]


def test_official_ids(qwen_tokenizer):
    assert qwen_tokenizer("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False)["input_ids"] == [
        151644,
        872,
        198,
        13048,
        151645,
        198,
    ]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"},
    ]
    expected = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    expected += [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 13048, 1052, 0, 151645, 198]
    # transformers 5: apply_chat_template(tokenize=True) returns a BatchEncoding (return_dict=True by default).
    assert qwen_tokenizer.apply_chat_template(messages)["input_ids"] == expected
    assert qwen_tokenizer.apply_chat_template(messages, return_dict=False) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello world",
        "你好，世界！这是一个测试。",
        "emoji 🎉👍🏽👨‍👩‍👧🇫🇷 done",
        "def f(x):\n    return x ** 2\n\n\n",
        "  leading and trailing   \n\n  ",
        "\r\n\r\n\t\t mixed \u00a0\u3000 spaces",
        "I'm sure they'll say DON'T 12345 3.14159",
        "e\u0301 A\u030a (decomposed: NFC composes them first)",
    ],
)
def test_matches_tiktoken_examples(qwen_tokenizer, tiktoken_encoding, text):
    ours = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The Qwen2 tokenizer NFC-normalises before BPE; tiktoken does not, so feed it NFC text.
    assert ours == tiktoken_encoding.encode_ordinary(unicodedata.normalize("NFC", text))
    assert qwen_tokenizer.decode(ours) == unicodedata.normalize("NFC", text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_matches_tiktoken_property(qwen_tokenizer, tiktoken_encoding, text):
    # Added tokens are matched before BPE (tiktoken's encode_ordinary knows none); hypothesis does find
    # them, since it mines string constants from the code under test.
    assume(not any(content in text for content, _ in qt.QWEN2_ADDED_TOKENS))
    ours = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == tiktoken_encoding.encode_ordinary(unicodedata.normalize("NFC", text))


def test_qwen2_5_template_variant():
    tok = chatml.qwen_tokenizer(template="qwen2.5")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    assert tok.init_kwargs["default_system"] == chatml.QWEN2_5_DEFAULT_SYSTEM
    with pytest.raises(ValueError, match="qwen3"):
        chatml.qwen_tokenizer(template="qwen3")


@pytest.mark.skipif(not (SHARED_DATA / "templates").is_dir(), reason="shared/data/templates not present")
def test_embedded_templates_equal_published_ones():
    templates = SHARED_DATA / "templates"
    assert (templates / "qwen2_chat_template.jinja").read_text() == chatml.QWEN2_CHAT_TEMPLATE
    assert (templates / "qwen2_5_chat_template.jinja").read_text() == chatml.QWEN2_5_CHAT_TEMPLATE


def test_cache_is_written_then_reused(tmp_path, monkeypatch):
    samples = ["<|im_start|>user\n你好 🎉<|im_end|>\n", "def f(x):\n    return x\n"]
    first = chatml.qwen_tokenizer(cache_dir=tmp_path)
    cached = tmp_path / "qwen2-tokenizer"
    assert (cached / "tokenizer.json").is_file() and (cached / "meta.json").is_file()
    # no temp dirs left behind (the lock file stays)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".qwen2-tokenizer.lock", "qwen2-tokenizer"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not rebuilt")

    monkeypatch.setattr(qt, "build_qwen_backend", no_rebuild)
    # The rebuild is patched to fail: loading proves the cache was read (no wall time asserted).
    second = chatml.qwen_tokenizer(cache_dir=tmp_path)
    for text in samples:
        assert second.encode(text) == first.encode(text)


def test_cache_root_follows_align_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "env-cache"))
    assert qt.cache_root() == tmp_path / "env-cache"
    assert qt.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("ALIGN_CACHE")
    assert qt.cache_root() == Path.home() / ".cache" / "align"


def test_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    target = tmp_path / "qwen2-tokenizer"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "meta.json").write_text(json.dumps({"format": -1, "source_md5": qt.QWEN_TIKTOKEN_MD5}))
    calls = []

    def tiny_backend():  # stands in for the 1-2 s build
        calls.append(1)
        return Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))

    monkeypatch.setattr(qt, "build_qwen_backend", tiny_backend)
    path = qt._cached_backend_file(tmp_path)
    assert calls == [1]
    assert json.loads((target / "meta.json").read_text())["format"] == qt._CACHE_FORMAT
    assert Tokenizer.from_file(str(path)).get_vocab() == {"a": 0}
    assert qt._cached_backend_file(tmp_path) == path and calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".qwen2-tokenizer.lock", "qwen2-tokenizer"]


def test_concurrent_first_builds_build_once(tmp_path, monkeypatch):
    import threading

    from tokenizers import Tokenizer, models

    calls = []

    def slow_tiny_backend():
        calls.append(1)
        time.sleep(0.2)
        return Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))

    monkeypatch.setattr(qt, "build_qwen_backend", slow_tiny_backend)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(qt._cached_backend_file(tmp_path))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]
    assert len(paths) == 4 and len(set(paths)) == 1 and paths[0].is_file()
