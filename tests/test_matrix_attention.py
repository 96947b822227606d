"""The switch matrix of packed rows through attention (align/attention.py, align/packing.py).

A packed row (several documents back to back, ``position_ids`` restarting, no attention mask, called as the
stages call it: ``use_cache=False``) against each document run alone through the same model: logits, and
every trainable parameter's gradient of sum(logits * fixed random weights). Then padded batches (left and
right, with an attention mask) through ``align_varlen`` against ``sdpa``, and the attention implementations
the stages refuse with packed rows.

A covering set, not the product: every architecture of tests/tiny_archs.py (Qwen2 with grouped K/V, Llama,
GPT-2, Phi3) under every attention implementation the stages allow with packing, in training mode with the
documents' varlen kwargs passed and in eval mode with the documents derived from ``position_ids``; then every
other switch on Qwen2 and GPT-2 (the two most different layouts: grouped K/V with rotary positions vs
learned positions with a fused Conv1D QKV) and some on Llama and Phi3. Weights are fp64 (exact up to
rounding), except under bf16 autocast (fp32 weights, looser tolerance).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from align.attention import DOC_ATTENTION, document_kwargs
from align.packing import check_packed_attention
from tests.tiny_archs import ARCHITECTURES, tiny_causal_lm

VOCAB = 128
DOC_LENS = [5, 9, 3, 7]  # one packed row
# Several packed rows of width 12, collate_packed's layout: padding is a segment of its own (positions
# 0, 1, ...). Row 1 is one document and padding; row 2 is one document filling the row.
ROWS = [[5, 4, 3], [7, 5], [12], [6, 6]]
PAD_SEGMENT = {1}  # rows whose last segment is padding (not a document)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: thread start-up dominates, 10-50x on a shared host; the number is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str = "qwen2"
    attn: str = DOC_ATTENTION
    train: bool = True
    kwargs: bool = True  # pass align.attention.document_kwargs; else derived from position_ids in the layers
    checkpointing: bool = False
    bf16: bool = False  # fp32 weights under CPU bf16 autocast; else fp64 weights
    rows: bool = False  # a (B, T) batch of packed rows (ROWS) instead of one row (DOC_LENS)
    lora: bool = False  # peft LoRA on every linear layer, no dropout, B != 0
    cache_default: bool = False  # no use_cache argument: the config's (True) applies


SWITCHES: dict[str, dict[str, Any]] = {
    "checkpointing-kwargs": dict(checkpointing=True),
    "checkpointing-derived": dict(checkpointing=True, kwargs=False),
    "bf16-autocast-train": dict(bf16=True),
    "bf16-autocast-eval-derived": dict(bf16=True, train=False, kwargs=False),
    "rows-kwargs": dict(rows=True),
    "rows-derived-eval": dict(rows=True, kwargs=False, train=False),
    "lora": dict(lora=True),
    "lora-checkpointing-derived": dict(lora=True, checkpointing=True, kwargs=False),
    "cache-default": dict(cache_default=True, kwargs=False),  # ours needs no use_cache=False
    "sdpa-rows-checkpointing": dict(attn="sdpa", rows=True, checkpointing=True),
    "eager-bf16-autocast": dict(attn="eager", bf16=True),
}
CASES = (
    [
        pytest.param(Case(arch=arch, attn=attn), id=f"{arch}-{attn}-train-kwargs")
        for arch in ARCHITECTURES
        for attn in (DOC_ATTENTION, "sdpa", "eager")
    ]
    + [
        pytest.param(Case(arch=arch, train=False, kwargs=False), id=f"{arch}-{DOC_ATTENTION}-eval-derived")
        for arch in ARCHITECTURES
    ]
    + [
        pytest.param(Case(arch=arch, **switches), id=f"{arch}-{name}")
        for arch in ("qwen2", "gpt2")
        for name, switches in SWITCHES.items()
    ]
    + [
        pytest.param(Case(arch="llama", rows=True, checkpointing=True), id="llama-rows-checkpointing"),
        pytest.param(Case(arch="llama", lora=True, bf16=True), id="llama-lora-bf16-autocast"),
        pytest.param(Case(arch="phi3", rows=True, kwargs=False, lora=True), id="phi3-rows-derived-lora"),
        pytest.param(Case(arch="phi3", checkpointing=True, bf16=True), id="phi3-checkpointing-bf16"),
    ]
)


def _model(case: Case) -> torch.nn.Module:
    model = tiny_causal_lm(case.arch, VOCAB, attn_implementation=case.attn, seed=3)
    model = model.to(torch.float32 if case.bf16 else torch.float64)
    if case.checkpointing:  # as align.models.load_causal_lm sets it up
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
            fan_in_fan_out=case.arch == "gpt2",  # GPT-2's Conv1D stores its weight transposed
        )  # fmt: skip
        model = get_peft_model(model, lora)
        if case.checkpointing:
            model.enable_input_require_grads()
    return model.train(case.train)


def _layout(case: Case) -> list[list[int]]:
    """Segment lengths per row."""
    return ROWS if case.rows else [DOC_LENS]


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, bool]]]:
    """(input_ids (B, T), position_ids (B, T), segments (row, start, length, is_document))."""
    g = torch.Generator().manual_seed(7)
    layout = _layout(case)
    width = max(sum(r) for r in layout)
    ids = torch.randint(2, VOCAB, (len(layout), width), generator=g)
    positions = torch.zeros_like(ids)
    segments = []
    for b, lens in enumerate(layout):
        assert sum(lens) == width
        start = 0
        for k, n in enumerate(lens):
            positions[b, start : start + n] = torch.arange(n)
            pad = b in PAD_SEGMENT and k == len(lens) - 1 and case.rows
            segments.append((b, start, n, not pad))
            start += n
    return ids, positions, segments


def _backward(logits: torch.Tensor, weights: torch.Tensor) -> None:
    (logits.to(weights.dtype) * weights).sum().backward()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_equal_documents_alone(case: Case):
    model = _model(case)
    ids, positions, segments = _inputs(case)
    docs = [s for s in segments if s[3]]
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for b, start, n, is_doc in segments:
        if not is_doc:
            weights[b, start : start + n] = 0  # padding carries no loss
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.bf16)

    model.zero_grad(set_to_none=True)
    alone = []
    for b, start, n, _ in docs:
        with autocast:
            out = model(input_ids=ids[b : b + 1, start : start + n], use_cache=False).logits[0]
        _backward(out, weights[b, start : start + n])
        alone.append(out.detach())
    want_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    call: dict[str, Any] = {"input_ids": ids, "position_ids": positions}
    if not case.cache_default:
        call["use_cache"] = False
    if case.kwargs:  # the flattened B * T tokens, padding segments included
        call.update(document_kwargs([n for _, _, n, _ in segments], "cpu"))
    with autocast:
        packed = model(**call).logits
    _backward(packed, weights)
    got_grads = _grads(model)

    # Tolerances: fp64 rounding; eager's softmax runs in fp32 whatever the weights; under bf16 autocast the
    # logits (|logit| < 1) stay within 0.02, well under a leak across documents (0.09-0.32 in bf16), and a
    # gradient's bf16 rounding is relative to its largest entry (sums of bf16 products over other shapes).
    tol, grad_tol, grad_scale = dict(rtol=1e-9, atol=1e-9), dict(rtol=1e-8, atol=1e-9), 0.0
    if case.bf16:
        tol, grad_tol, grad_scale = dict(rtol=0.0, atol=0.02), dict(rtol=0.05, atol=0.0), 0.02
    elif case.attn == "eager":
        tol, grad_tol = dict(rtol=1e-6, atol=1e-6), dict(rtol=1e-5, atol=1e-6)
    for (b, start, n, _), want in zip(docs, alone, strict=True):
        torch.testing.assert_close(packed[b, start : start + n], want, **tol)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert want_grads.keys() == got_grads.keys() == trainable
    for name, grad in want_grads.items():
        atol = grad_tol["atol"] + grad_scale * grad.abs().max().item()
        torch.testing.assert_close(
            got_grads[name], grad, rtol=grad_tol["rtol"], atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sdpa_and_eager_separate_documents_only_without_a_cache(arch: str):
    """Why every stage calls with use_cache=False, and why sdpa/eager are allowed with packing only so: with
    a KV cache transformers skips its packed-sequence detection and one causal mask spans the whole row (the
    0.1-0.3 logit differences of issue 20), while ours separates the documents either way."""
    ids, positions, segments = _inputs(Case())
    leaks = {}
    for attn in ("sdpa", "eager", DOC_ATTENTION):
        model = _model(Case(arch=arch, attn=attn, train=False))
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions).logits[0]  # the config's use_cache=True
            alone = torch.cat([model(input_ids=ids[:, s : s + n]).logits[0] for _, s, n, _ in segments])
        leaks[attn] = (packed - alone).abs().max().item()
    assert leaks["sdpa"] > 0.05 and leaks["eager"] > 0.05
    assert leaks[DOC_ATTENTION] < 1e-9


@pytest.mark.parametrize(
    "arch, side", [("qwen2", "left"), ("qwen2", "right"), ("gpt2", "left"), ("gpt2", "right"),
                   ("llama", "left"), ("phi3", "right")],
    ids=["qwen2-left", "qwen2-right", "gpt2-left", "gpt2-right", "llama-left", "phi3-right"],
)  # fmt: skip
def test_padded_batches_equal_sdpa(arch: str, side: str):
    """Not packed: rows of 9, 4 and 6 tokens padded with an attention mask (positions over real tokens) run
    under align_varlen exactly as under sdpa, logits at real tokens and gradients."""
    g = torch.Generator().manual_seed(9)
    lens, width = [9, 4, 6], 9
    ids = torch.randint(2, VOCAB, (3, width), generator=g)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, width - n :] = 1
        else:
            mask[b, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    weights = torch.randn(3, width, VOCAB, generator=g, dtype=torch.float64) * mask[..., None]
    results = {}
    for attn in ("sdpa", DOC_ATTENTION):
        model = _model(Case(arch=arch, attn=attn))
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        _backward(logits, weights)
        results[attn] = (logits.detach()[mask.bool()], _grads(model))
    (want, want_grads), (got, got_grads) = results["sdpa"], results[DOC_ATTENTION]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-8, atol=1e-9, msg=name)


# --------------------------------------------------------------------------------------------------
# What the stages refuse with packed rows


@pytest.mark.parametrize(
    "attn, kwargs_passed, refused",
    [
        ("auto", False, None),
        (DOC_ATTENTION, False, None),
        ("sdpa", False, None),
        ("eager", False, None),
        ("flash_attention_2", True, None),
        ("flash_attention_2", False, "passes no cu_seq_lens"),
        ("flex_attention", True, "not checked"),
        ("kernels-community/flash-attn2", True, "not checked"),
    ],
    ids=[
        "auto",
        "align_varlen",
        "sdpa",
        "eager",
        "fa2-with-kwargs",
        "fa2-without-kwargs",
        "flex",
        "hub-kernel",
    ],
)
def test_check_packed_attention(attn: str, kwargs_passed: bool, refused: str | None):
    check_packed_attention(attn, packs=False, passes_document_kwargs=kwargs_passed, what="-")  # no packing
    if refused is None:
        check_packed_attention(attn, packs=True, passes_document_kwargs=kwargs_passed, what="packing: true")
        return
    with pytest.raises(ValueError, match=refused) as err:
        check_packed_attention(attn, packs=True, passes_document_kwargs=kwargs_passed, what="packing: true")
    message = str(err.value)
    assert "\n" not in message and "packing" in message and f"attn_implementation={attn}" in message


def _refusal(run: Any, cfg: Any) -> str:
    """The stage refuses before it loads a model (the model path does not exist)."""
    from align.train.process import RunSetupError

    with pytest.raises(RunSetupError) as err:
        run(cfg)
    return str(err.value)


@pytest.mark.parametrize(
    "stage, attn, keys, fragment",
    [
        (
            "sft",
            "flex_attention",
            dict(packing=True),
            "packing (packing: true) with attn_implementation=flex",
        ),
        ("sft", "flex_attention", dict(packing=False, micro_batch_size=2), "micro_batch_size=2"),
        ("dpo", "flex_attention", {}, "packing (DPO: one row per micro-batch)"),
        ("rm", "flash_attention_2", dict(packing=True), "passes no cu_seq_lens"),
        ("rm", "flash_attention_2", dict(packing=False, eval_fraction=0.1), "held-out scoring packs"),
    ],
    ids=["sft-packing", "sft-micro-batch-row", "dpo", "rm-packing", "rm-heldout-scoring"],
)
def test_stages_refuse_unchecked_attention_with_packed_rows(tmp_path, stage, attn, keys, fragment):
    from align.config import DPOConfig, RMConfig, SFTConfig
    from align.train.dpo import run_dpo
    from align.train.reward import run_reward
    from align.train.sft import run_sft

    run, config = {"sft": (run_sft, SFTConfig), "dpo": (run_dpo, DPOConfig), "rm": (run_reward, RMConfig)}[
        stage
    ]
    common = dict(model_name_or_path=str(tmp_path / "no-model"), output_dir=str(tmp_path / "out"))
    if stage == "rm":
        common.update(stage="rm", dataset=str(tmp_path / "none.jsonl"))
    message = _refusal(run, config(attn_implementation=attn, report_to=["none"], **common, **keys))
    assert fragment in message and "\n" not in message
