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
    """The CUDA branch, run on CPU with a stand-in kernel behind the real gate (only the device facts are
    faked: CUDA, capability 9.0): under bf16 autocast it gets the flattened (N, H, D) query and the
    *unrepeated* (N, Hkv, D) keys/values in bf16 (the stand-in asserts the dtype, so a wrong gate or
    `_kernel_dtype` fails here), with enable_gqa, the causal window and the batch's cu_seq_lens; fed an
    exact per-document attention, the model's output equals the per-document SDPA path. In fp32 the gate
    says no and the stand-in is never called."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16, (q.dtype, k.dtype, v.dtype)
        calls.append((q.shape, k.shape, cu_q.tolist(), max_q, window_size, enable_gqa))
        return attention._per_document_sdpa(q, k, v, cu_q.tolist(), scale, 0.0)

    model = _tiny_lm(DOC_ATTENTION).eval()
    row = packed_row(_docs(), torch.device("cpu"))
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        want_fp32 = packed_logprobs(model, row)
        with bf16:
            want = packed_logprobs(model, row)
        monkeypatch.setattr(attention, "_varlen_attn", fake_varlen)
        monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "enable_gqa", "scale"})
        monkeypatch.setattr(attention, "_device_facts", lambda t: ("cuda", (9, 0)))
        torch.testing.assert_close(packed_logprobs(model, row), want_fp32, rtol=0, atol=0)
        assert calls == []  # fp32: not the kernel's dtype
        with bf16:
            got = packed_logprobs(model, row)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    total = sum(DOC_LENS)
    cu = [0, 7, 19, 24, 36, 39]
    assert calls == [((total, 4, 8), (total, 2, 8), cu, 12, (-1, 0), True)] * 2  # one per layer
    # The signature decides: a kernel without GQA gets repeated K/V heads, torch 2.10's is_causal.
    calls.clear()

    def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16
        calls.append((k.shape, is_causal))
        return attention._per_document_sdpa(q, k, v, cu_q.tolist(), None, 0.0)

    monkeypatch.setattr(attention, "_varlen_attn", old_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"is_causal"})
    with torch.no_grad(), bf16:
        torch.testing.assert_close(packed_logprobs(model, row), want, rtol=0, atol=0)
    assert calls == [((total, 4, 8), True)] * 2


# The kernel gate as a pure function: each fact that keeps FlashAttention-2 varlen off, one at a time.
_KERNEL_OK = dict(device_type="cuda", capability=(8, 0), dtype=torch.bfloat16, head_dim=64, dropout=0.0)


@pytest.mark.parametrize(
    "change, refusal",
    [
        ({}, None),
        ({"dtype": torch.float16, "capability": (9, 0), "head_dim": 256}, None),
        ({"head_dim": 8}, None),
        ({"device_type": "cpu", "capability": None}, "not CUDA"),
        ({"capability": (7, 5)}, "compute capability"),
        ({"capability": None}, "compute capability"),
        ({"dtype": torch.float32}, "bf16/fp16"),
        ({"head_dim": 264}, "head size 264"),
        ({"head_dim": 20}, "head size 20"),
        ({"dropout": 0.1}, "attention dropout 0.1"),
        ({"params": {"window_size"}, "scaling": 0.5}, "takes no scale"),
        ({"params": {"window_size"}, "scaling": 64**-0.5}, None),
        ({"params": {"scale"}}, "cannot say causal"),
        ({"params": set()}, "torch < 2.10"),
    ],
    ids=[
        "sm80-bf16-d64", "sm90-fp16-d256", "d8", "cpu", "sm75", "no-capability", "fp32", "d264", "d20",
        "dropout", "scale-not-passable", "default-scale", "no-causal", "no-varlen",
    ],
)  # fmt: skip
def test_varlen_kernel_gate(change, refusal):
    facts = {"params": {"window_size", "enable_gqa", "scale"}, **_KERNEL_OK, **change}
    got = attention.varlen_kernel_refusal(**facts)
    if refusal is None:
        assert got is None
    else:
        assert refusal in got


def test_the_gate_decides_the_forward_pass(monkeypatch):
    """`_use_varlen_kernel` asks the gate with the call's facts: head size 8 of the tiny model, its dtype,
    the module's dropout (training only)."""
    monkeypatch.setattr(attention, "_varlen_attn", lambda *a, **k: None)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "enable_gqa", "scale"})
    q = torch.zeros(5, 4, 8)
    assert not attention._use_varlen_kernel(q, torch.bfloat16, 0.0, None)  # a CPU tensor
    monkeypatch.setattr(attention, "_device_facts", lambda t: ("cuda", (8, 6)))
    assert attention._use_varlen_kernel(q, torch.bfloat16, 0.0, None)
    assert not attention._use_varlen_kernel(q, torch.bfloat16, 0.1, None)
    assert not attention._use_varlen_kernel(q, torch.float32, 0.0, None)
    assert not attention._use_varlen_kernel(torch.zeros(5, 4, 12), torch.bfloat16, 0.0, None)
    monkeypatch.setattr(attention, "_device_facts", lambda t: ("cuda", (7, 0)))
    assert not attention._use_varlen_kernel(q, torch.bfloat16, 0.0, None)


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


@pytest.mark.parametrize(
    "device, capability, dropout, training, evaluation, warns",
    [
        ("cuda", (9, 0), 0.1, "per-document", "FlashAttention-2", True),  # the Qwen SFT recipe on an H100
        ("cuda", (9, 0), 0.0, "FlashAttention-2", "FlashAttention-2", False),
        ("cuda", (7, 5), 0.1, "per-document", "per-document", False),  # a T4: dropout is not the reason
        ("cpu", None, 0.1, "per-document", "per-document", False),
    ],
    ids=["h100-dropout", "h100-no-dropout", "t4-dropout", "cpu-dropout"],
)
def test_the_run_says_which_attention_packed_rows_take(
    monkeypatch, device, capability, dropout, training, evaluation, warns
):
    """`announce_attention` at a run's setup: one line naming attn_implementation, the path of packed rows in
    training and evaluation and why; a warning naming `dropout` and `attn_implementation` exactly where
    attention dropout alone keeps training off the kernel."""
    import warnings

    import align.models as models
    from align.config import SFTConfig

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, attention_dropout=dropout)
    config._attn_implementation = DOC_ATTENTION
    plan = attention.packed_attention_plan(
        config, device_type=device, compute_dtype=torch.bfloat16, capability=capability
    )
    assert plan["training"].startswith(training) and plan["evaluation"].startswith(evaluation)
    assert (plan["training_reason"] is None) == (training == "FlashAttention-2")
    if dropout and device == "cuda" and capability >= (8, 0):
        assert plan["training_reason"] == "attention dropout 0.1, the kernel has none"
    real = models.packed_attention_plan  # the device is described, not needed
    monkeypatch.setattr(
        models,
        "packed_attention_plan",
        lambda c, **k: real(c, **{**k, "device_type": device, "capability": capability}),
    )
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        announced = models.announce_attention(
            config, SFTConfig(dropout=dropout), device="cpu", mixed_precision="bf16", say=lines.append
        )
    assert announced == plan
    assert len(lines) == 1 and "attn_implementation=align_varlen" in lines[0]
    messages = [str(w.message) for w in caught if "sets attention dropout" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert "dropout=0.1" in messages[0] and "attn_implementation=auto" in messages[0]
        assert "\n" not in messages[0]


def test_the_document_cache_is_keyed_by_batch_size():
    """One (1, T) position tensor shared by a batch of 1 and then of 3 rows: the second call must not
    reuse the documents derived for the first (it raised on the CPU, and left rows uninitialised on CUDA)."""
    model = _tiny_lm(DOC_ATTENTION).eval()
    row = packed_row(_docs(), torch.device("cpu"))
    positions, ids = row["position_ids"], row["input_ids"]
    with torch.no_grad():
        one = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        three = model(input_ids=ids.expand(3, -1), position_ids=positions, use_cache=False).logits
    for b in range(3):
        torch.testing.assert_close(three[b], one[0], rtol=1e-5, atol=1e-5)
    width = positions.shape[1]
    assert attention._documents_of(positions, 1)["cu_seq_lens_q"][-1] == width
    assert attention._documents_of(positions, 3)["cu_seq_lens_q"][-1] == 3 * width
    assert attention._documents_of(positions, 1)["cu_seq_lens_q"][-1] == width


def test_documents_must_end_where_the_batch_ends():
    """On the host a ValueError; on an accelerator (sync=False) torch._assert_async, whose CPU form raises
    at once, so the condition it is given is checked here too."""
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    attention._check_documents_cover(cu, 5, sync=True)
    attention._check_documents_cover(cu, 5, sync=False)
    with pytest.raises(ValueError, match="ends at 5, the batch has 6 tokens"):
        attention._check_documents_cover(cu, 6, sync=True)
    with pytest.raises(RuntimeError, match="does not end at 6 tokens"):
        attention._check_documents_cover(cu, 6, sync=False)
    model = _tiny_lm(DOC_ATTENTION).eval()
    with pytest.raises(ValueError, match="ends at 5, the batch has 6 tokens"):
        model(
            input_ids=torch.zeros(1, 6, dtype=torch.long), use_cache=False, **document_kwargs([3, 2], "cpu")
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
