"""Offline assets: model-name resolution, the SmolLM2 cache, and (slow) the real SmolLM2 itself."""

from __future__ import annotations

import json

import pytest

from align import assets
from align.assets import AssetError, resolve_model, smollm2_dir


def _fake_complete_cache(root):
    d = root / assets.SMOLLM2_NAME
    d.mkdir(parents=True)
    (d / assets._MARKER).write_text(json.dumps({"format": assets._CACHE_FORMAT}))
    return d


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ALIGN_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "align")


def test_complete_cache_is_reused_without_building(tmp_path, monkeypatch):
    d = _fake_complete_cache(tmp_path)

    def no_build(*a, **k):
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(assets, "_build_smollm2", no_build)
    assert smollm2_dir(tmp_path) == d
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    for alias in ("smollm2-135m-instruct", "smollm2", "SmolLM2"):
        assert resolve_model(alias) == str(d)


def test_incomplete_cache_is_not_trusted(tmp_path, monkeypatch):
    d = tmp_path / assets.SMOLLM2_NAME
    d.mkdir()
    (d / "config.json").write_text("{}")  # a build that died before its marker
    calls = []

    def fake_build(gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"built": true}')

    monkeypatch.setattr(assets, "_build_smollm2", fake_build)
    monkeypatch.setattr(assets, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    assert smollm2_dir(tmp_path) == d
    assert len(calls) == 1 and json.loads((d / "config.json").read_text()) == {"built": True}
    assert assets._is_complete(d)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{assets.SMOLLM2_NAME}-")]
    assert not leftovers  # the temp build dir was renamed, not left behind


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(assets, "_build_smollm2", broken)
    monkeypatch.setattr(assets, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    with pytest.raises(RuntimeError, match="boom"):
        smollm2_dir(tmp_path)
    assert not (tmp_path / assets.SMOLLM2_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{assets.SMOLLM2_NAME}.lock"]


def test_resolve_model_paths_and_hub_ids(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(AssetError, match="allow_hub=True"):
        resolve_model("Qwen/Qwen2-0.5B-Instruct")
    assert resolve_model("Qwen/Qwen2-0.5B-Instruct", allow_hub=True) == "Qwen/Qwen2-0.5B-Instruct"


def test_gguf_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(AssetError, match="not a file"):
        assets.find_smollm2_gguf()
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("ALIGN_SMOLLM2_GGUF", str(f))
    assert assets.find_smollm2_gguf() == f


def test_chat_template_fallback_matches_published_text():
    # The fallback (used only if a GGUF lacked a template) renders exactly like chatml with SmolLM's system.
    import jinja2

    import chatml

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = jinja2.Template(assets.SMOLLM2_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert text == chatml.render_conversation(msgs, assets.SMOLLM2_DEFAULT_SYSTEM, add_generation_prompt=True)


@pytest.mark.slow
def test_real_smollm2():
    """Builds the default cache on first use (~20-30 s from the GGUF), then loads it (<1 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chatml
    from align.evaluation.generation import generate

    d = smollm2_dir()
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)

    # Tokenizer: ChatML ids, pad == eos == <|im_end|>, the GGUF's chat template with SmolLM's system prompt.
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok.eos_token_id == 2 and tok.pad_token_id == tok.eos_token_id
    ids = tok("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False).input_ids
    assert ids == [1, 4093, 198, 26843, 2, 198]
    assert assets.SMOLLM2_DEFAULT_SYSTEM in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    official = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chatml.encode_prompt(msgs, tok, default_system=assets.SMOLLM2_DEFAULT_SYSTEM) == list(official)

    # Config facts.
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6

    # A greedy answer that makes sense.
    (reply,) = generate(model, tok, [msgs], max_new_tokens=16, show_progress=False)
    assert "Paris" in reply, reply
