"""Document-masked attention (align/attention.py): packed rows equal their documents run alone."""

import pytest
import torch
from conftest import byte_tokenizer, tiny_qwen2
from transformers import Qwen2Config, Qwen2ForCausalLM

import align.attention as attention
from align.attention import (
    DOC_ATTENTION,
    check_no_mask_on_packed_rows,
    document_kwargs,
    document_kwargs_from_positions,
    lengths_from_positions,
    resolve_attn_implementation,
)
from align.fused_logprobs import lm_logprobs
from align.train.sft import packed_logprobs, packed_row

VOCAB = 97
DOC_LENS = [7, 12, 5, 12, 3]


def _tiny_lm(attn: str, seed: int = 0) -> Qwen2ForCausalLM:
    """conftest's tiny Qwen2 (grouped K/V: 4 query heads, 2 KV heads), a 97-word vocabulary, in training
    mode (dropout is 0), fp32, with attention ``attn``."""
    model = tiny_qwen2(byte_tokenizer(), seed, vocab_size=VOCAB, eos_token_id=None, pad_token_id=None)
    model.config._attn_implementation = attn
    return model.train()


def _docs(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in DOC_LENS:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return docs


def _logprobs_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logps = fn(model)
    (-logps.sum()).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _alone(model) -> torch.Tensor:
    """Each document through the model on its own (one sequence, plain causal attention)."""
    return torch.cat([packed_logprobs(model, packed_row([d], torch.device("cpu"))) for d in _docs()])


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
@pytest.mark.parametrize("with_kwargs", [True, False])
def test_packed_row_logprobs_and_grads_equal_documents_alone(reference, with_kwargs):
    """One packed row under DOC_ATTENTION == every document alone under sdpa/eager, values and every grad;
    with the varlen kwargs from the packing metadata, or derived from position_ids inside the layers."""
    ref_model = _tiny_lm(reference)
    ours = _tiny_lm(DOC_ATTENTION)
    want, want_grads = _logprobs_and_grads(ref_model, _alone)

    def packed(model):
        row = packed_row(_docs(), torch.device("cpu"))
        if not with_kwargs:
            row.pop("documents")
        return packed_logprobs(model, row)

    got, got_grads = _logprobs_and_grads(ours, packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_sdpa_block_diagonal_mask_is_the_same_reference():
    """Sanity of the reference: the stock sdpa path on the packed row also equals documents alone."""
    model = _tiny_lm("sdpa")
    alone = _alone(model)
    row = packed_row(_docs(), torch.device("cpu"))
    row.pop("documents")
    torch.testing.assert_close(packed_logprobs(model, row), alone, rtol=1e-5, atol=1e-5)


def test_several_padded_packed_rows_equal_documents_alone():
    """A (B, T) batch of packed rows (collate_packed's layout, padding as its own segment) flattened to
    B * T tokens: each document's logits equal its run alone."""
    from align.packing import collate_packed, pack_examples

    model = _tiny_lm(DOC_ATTENTION).eval()
    docs = _docs()
    rows = pack_examples(docs, max_length=20)
    batch = collate_packed(rows, pad_token_id=0)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for b, row in enumerate(rows):
        start = 0
        for i, n in zip(row["example_indices"], row["seq_lens"], strict=True):
            alone = model(input_ids=torch.tensor([docs[i]["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(out[b, start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_packed_rows_under_inference_mode_equal_documents_alone():
    """Evaluation runs under torch.inference_mode, whose tensors have no version counter: the per-pass
    cache of derived documents must not need one (it raised 'Inference tensors do not track version
    counter' in the GRPO gold evaluation)."""
    model = _tiny_lm(DOC_ATTENTION).eval()
    with torch.no_grad():
        alone = _alone(model)
    row = packed_row(_docs(), torch.device("cpu"))
    row.pop("documents")  # documents derived from position_ids inside the layers
    with torch.inference_mode():
        got = packed_logprobs(model, {k: v.clone() if torch.is_tensor(v) else v for k, v in row.items()})
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_padded_batches_and_greedy_generation_equal_sdpa():
    """Not packed: a left-padded batch and KV-cache decoding run exactly as under sdpa."""
    ours, ref = _tiny_lm(DOC_ATTENTION).eval(), _tiny_lm("sdpa").eval()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    real = mask.bool()
    got = ours(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, ref(input_ids=ids, attention_mask=mask).logits[real])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        ours.generate(ids, attention_mask=mask, **kwargs), ref.generate(ids, attention_mask=mask, **kwargs)
    )


def test_varlen_kernel_call_on_the_cuda_path(monkeypatch):
    """The CUDA branch, run on CPU with a stand-in kernel: it gets the flattened (N, H, D) query, the
    *unrepeated* (N, Hkv, D) keys/values with enable_gqa, the causal window and the batch's cu_seq_lens;
    fed an exact per-document attention, the model's output equals the per-document SDPA path."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((q.shape, k.shape, cu_q.tolist(), max_q, window_size, enable_gqa))
        return attention._per_document_sdpa(q, k, v, cu_q.tolist(), scale, 0.0)

    model = _tiny_lm(DOC_ATTENTION).eval()
    row = packed_row(_docs(), torch.device("cpu"))
    with torch.no_grad():
        want = packed_logprobs(model, row)
        monkeypatch.setattr(attention, "_varlen_attn", fake_varlen)
        monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "enable_gqa", "scale"})
        monkeypatch.setattr(attention, "_use_varlen_kernel", lambda *args: True)
        got = packed_logprobs(model, row)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    total = sum(DOC_LENS)
    cu = [0, 7, 19, 24, 36, 39]
    assert calls == [((total, 4, 8), (total, 2, 8), cu, 12, (-1, 0), True)] * 2  # one per layer
    # The signature decides: a kernel without GQA gets repeated K/V heads, torch 2.10's is_causal.
    calls.clear()

    def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
        calls.append((k.shape, is_causal))
        return attention._per_document_sdpa(q, k, v, cu_q.tolist(), None, 0.0)

    monkeypatch.setattr(attention, "_varlen_attn", old_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"is_causal"})
    with torch.no_grad():
        torch.testing.assert_close(packed_logprobs(model, row), want, rtol=1e-6, atol=1e-6)
    assert calls == [((total, 4, 8), True)] * 2


def test_document_kwargs_from_metadata_and_from_positions_agree():
    assert lengths_from_positions([0, 1, 2, 0, 1, 0, 0, 1]) == [3, 2, 1, 2]
    meta = document_kwargs([3, 2, 1, 2], "cpu")
    assert meta["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8] and meta["cu_seq_lens_q"].dtype == torch.int32
    assert meta["max_length_q"] == meta["max_length_k"] == 3
    # Two rows of 4 flattened to 8 tokens: the second row starts a document even though 3 -> 4 would continue.
    found = document_kwargs_from_positions(torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]]))
    assert found["cu_seq_lens_q"].tolist() == [0, 4, 6, 8] and found["max_length_q"] == 4
    with pytest.raises(ValueError):
        document_kwargs([3, 0], "cpu")


def test_an_attention_mask_over_packed_rows_is_refused():
    """An all-ones mask with restarting positions would let documents attend to each other under sdpa."""
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="document separation"):
        check_no_mask_on_packed_rows(torch.ones(1, 5, dtype=torch.long), positions)
    model = _tiny_lm("sdpa")
    with pytest.raises(ValueError, match="document separation"):
        lm_logprobs(
            model,
            torch.zeros(5, dtype=torch.long),
            input_ids=torch.zeros(1, 5, dtype=torch.long),
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            position_ids=positions,
            logits_to_keep=torch.ones(1, 5, dtype=torch.bool),
        )
    # Padding with positions over real tokens (left or right) is not packing.
    check_no_mask_on_packed_rows(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 1]]))
    check_no_mask_on_packed_rows(torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 1, 1, 1]]))
    ours = _tiny_lm(DOC_ATTENTION)
    with pytest.raises(ValueError, match="without an attention mask"):
        ours(
            input_ids=torch.zeros(1, 5, dtype=torch.long),
            attention_mask=torch.tensor([[1, 1, 1, 1, 0]]),
            use_cache=False,
            **document_kwargs([3, 2], "cpu"),
        )


def test_default_loading_picks_document_attention_and_others_stay_selectable(tiny_qwen_dir):
    from align.config import SFTConfig
    from align.models import load_causal_lm
    from align.reward import load_backbone

    assert "flash" not in DOC_ATTENTION  # transformers switches on flash-attn-only code for such names
    model, _ = load_causal_lm(SFTConfig(model_name_or_path=str(tiny_qwen_dir)))
    assert SFTConfig().attn_implementation == "auto"
    assert model.config._attn_implementation == DOC_ATTENTION
    assert load_backbone(tiny_qwen_dir).config._attn_implementation == DOC_ATTENTION
    for name in ("sdpa", "eager"):
        model, _ = load_causal_lm(SFTConfig(model_name_or_path=str(tiny_qwen_dir), attn_implementation=name))
        assert model.config._attn_implementation == name
    sliding = Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert resolve_attn_implementation("auto", sliding) == "sdpa"


@pytest.mark.slow  # inductor compiles one decoder layer (forward and backward) on the CPU
def test_compiled_decoder_layers_equal_eager_with_gradients():
    """compile_layers: every decoder layer compiled (layer.compile()); the packed row's log-probs and every
    gradient equal the eager model's."""
    from align.models import compile_decoder_layers

    eager, compiled = _tiny_lm(DOC_ATTENTION), _tiny_lm(DOC_ATTENTION)
    assert compile_decoder_layers(compiled) == 2

    def packed(model):
        return packed_logprobs(model, packed_row(_docs(), torch.device("cpu")))

    want, want_grads = _logprobs_and_grads(eager, packed)
    got, got_grads = _logprobs_and_grads(compiled, packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
