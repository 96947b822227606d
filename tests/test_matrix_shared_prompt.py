"""The switch matrix of the shared-prompt pass (align/rollout/shared_prefix.py).

`rollout_logprobs`, what GRPO, online DPO and PPO call for the policy and the reference, against the
per-row reference `response_logprobs` over `RolloutBatch.sequences(left_pad=True)`: log-probs (and
entropy), and the parameters' gradients of sum(upstream * logp) where the case trains. Each case also
asserts which route the fast path took: the shared pass where sharing is exact, else the per-row pass
itself, bit for bit (under the same torch seed where dropout draws masks).

A covering set, not the product: every architecture x attention implementation at the update's default
switches, then every other switch on Qwen2 and GPT-2, the two most different layouts (grouped K/V with
rotary positions vs learned positions with a fused Conv1D QKV). The batch (tests/test_shared_prefix.py
`_batch`) has left padding (prompts of 7, 1 and 4 tokens) and rows of one prompt interleaved.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import torch

import align.train.rl_common as rl_common
from align.rollout.batch import RolloutBatch
from align.rollout.shared_prefix import shares_prompts
from align.train.rl_common import micro_slices, response_logprobs, rollout_logprobs
from tests.test_shared_prefix import _batch
from tests.tiny_archs import ARCHITECTURES, tiny_causal_lm

pytestmark = [  # transformers 5.24 renamed these to activation_checkpointing; peft and the loops use the old
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
ATTENTION = ("align_varlen", "sdpa", "eager")
VOCAB = 128
QV_TARGETS = {"qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}  # GPT-2's q, k, v are one Conv1D


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str = "qwen2"
    attn: str = "align_varlen"
    train: bool = True  # model.train(): the update; eval(): the reference and the old log-probs
    grad: bool = True  # backward through both routes (an update), else no_grad (scoring)
    checkpointing: bool = False  # as load_causal_lm sets it up
    dropout: float = 0.0  # the model config's own dropout (attention, hidden, embeddings)
    lora: str | None = None  # "all-linear" or "qv"
    lora_dropout: float = 0.0
    adapter_off: bool = False  # a LoRA policy's reference pass: the adapter disabled
    bf16: bool = False  # fp32 weights under CPU bf16 autocast
    micro: int = 9  # rows per rollout_logprobs call; the batch has 9
    entropy: bool = False
    temperature: float = 1.0

    @property
    def dtype(self) -> torch.dtype:
        """fp64 weights (the log-probs come from fp32 logits) except: bf16 autocast runs on fp32 weights, and
        eager attention, whose softmax runs in fp32, turns fp64's mask minimum into -inf, so fully masked pad
        rows give NaN that reaches real tokens through 0 * NaN (in both routes: a transformers matter)."""
        return torch.float32 if self.bf16 or self.attn == "eager" else torch.float64

    @property
    def sharing_is_exact(self) -> bool:
        """Written from the switches, independently of `shared_pass_inexact_reason`."""
        dropout = self.dropout > 0 or (self.lora is not None and self.lora_dropout > 0)
        return not (self.train and (self.checkpointing or dropout))


SWITCHES: dict[str, dict[str, Any]] = {
    "eval-nograd": dict(train=False, grad=False),
    "eval-grad": dict(train=False),
    "checkpointing-train": dict(checkpointing=True),  # per-row: transformers drops the cache
    # per-row too: GPT-2's layer loop drops the cache in training mode whatever the grad mode
    "checkpointing-train-nograd": dict(checkpointing=True, grad=False),
    "checkpointing-eval": dict(checkpointing=True, train=False),
    "dropout-train": dict(dropout=0.1),  # per-row: one mask per prompt otherwise
    "dropout-train-nograd": dict(dropout=0.1, grad=False),
    "dropout-eval": dict(dropout=0.1, train=False),
    "lora-all-linear": dict(lora="all-linear"),
    "lora-qv": dict(lora="qv"),
    "lora-dropout-train": dict(lora="all-linear", lora_dropout=0.1),  # per-row
    "lora-dropout-eval": dict(lora="qv", lora_dropout=0.1, train=False, grad=False),
    "lora-checkpointing-train": dict(lora="all-linear", checkpointing=True),  # per-row
    "lora-adapter-off": dict(lora="qv", lora_dropout=0.1, adapter_off=True, train=False, grad=False),
    "bf16-autocast-train": dict(bf16=True),
    "bf16-autocast-eval": dict(bf16=True, train=False, grad=False),
    "micro-1": dict(micro=1),  # no row shares a prompt: always per-row
    "micro-4-ragged": dict(micro=4),  # 4 + 4 + 1
    "micro-5-ragged": dict(micro=5),  # 5 + 4, both sharing
    "entropy-temperature-0.7": dict(entropy=True, temperature=0.7),
}
CASES = [
    pytest.param(Case(arch=arch, attn=attn), id=f"{arch}-{attn}")
    for arch in ARCHITECTURES
    for attn in ATTENTION
] + [
    pytest.param(Case(arch=arch, **switches), id=f"{arch}-{name}")
    for arch in ("qwen2", "gpt2")
    for name, switches in SWITCHES.items()
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tensors this small gain nothing from intra-op threads; on a loaded 2-core machine their
    synchronisation made the file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(case: Case) -> torch.nn.Module:
    model = tiny_causal_lm(case.arch, VOCAB, attn_implementation=case.attn, dropout=case.dropout, seed=3)
    model = model.to(case.dtype)
    if case.checkpointing:  # what align.models.load_causal_lm does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if case.lora is not None:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if case.lora == "all-linear" else QV_TARGETS[case.arch]
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=case.lora_dropout,
            target_modules=targets,
            init_lora_weights=False,
            fan_in_fan_out=case.arch == "gpt2",  # GPT-2's Conv1D stores its weight transposed
        )  # B != 0: the adapter changes the log-probs, so its gradients carry the prompt's effect
        model = get_peft_model(model, lora)
        if case.checkpointing:
            model.enable_input_require_grads()
    return model.train(case.train)


def _run(fn: Any, model: Any, batch: RolloutBatch, case: Case, upstream: torch.Tensor) -> tuple[list, dict]:
    """Per micro-batch (log-probs, entropy) masked, and the gradients accumulated over the micro-batches."""
    model.zero_grad(set_to_none=True)
    outputs = []
    for rows in micro_slices(list(range(len(batch))), case.micro):
        sub = batch.select(rows)
        adapter = model.disable_adapter() if case.adapter_off else contextlib.nullcontext()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.bf16)
        torch.manual_seed(11)  # where dropout is active, both routes draw the same masks
        with adapter, autocast, torch.set_grad_enabled(case.grad):
            out = fn(model, sub, case.temperature, case.entropy)
        logps, entropy = out if case.entropy else (out, None)
        mask = sub.response_mask.to(logps.dtype)
        if case.grad:
            (upstream[rows, : logps.shape[1]].to(logps.dtype) * logps * mask).sum().backward()
        outputs.append((logps.detach() * mask, None if entropy is None else entropy.detach() * mask))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def _per_row(model: Any, sub: RolloutBatch, temperature: float, with_entropy: bool) -> Any:
    return response_logprobs(model, sub.sequences(left_pad=True), sub.response_ids, temperature, with_entropy)


@pytest.mark.parametrize("case", CASES)
def test_rollout_logprobs_equal_the_per_row_pass(case: Case, monkeypatch):
    batch = _batch(VOCAB)
    model = _model(case)
    upstream = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(1))
    shared_calls = []
    real_shared = rl_common.shared_prompt_logprobs

    def spy(*args: Any, **kwargs: Any) -> Any:
        shared_calls.append(1)
        return real_shared(*args, **kwargs)

    want, want_grads = _run(_per_row, model, batch, case, upstream)
    monkeypatch.setattr(rl_common, "shared_prompt_logprobs", spy)
    got, got_grads = _run(rollout_logprobs, model, batch, case, upstream)

    slices = micro_slices(list(range(len(batch))), case.micro)
    sharing = sum(shares_prompts(batch.select(rows)) for rows in slices)
    assert sharing > 0 or case.micro == 1  # every case but micro-1 has a micro-batch that can share
    assert len(shared_calls) == (sharing if case.sharing_is_exact else 0)
    # The per-row route is the reference computation itself: bit-equal. The shared route differs by float
    # rounding: of fp32 logits (fp64 weights), fp32 weights, or bf16 under autocast: a log-prob by one bf16
    # rounding (2^-8 relative), a gradient by the order bf16 sums the rows' terms into the shared prompt.
    tol = grad_tol = dict(rtol=0.0, atol=0.0)
    if shared_calls and case.bf16:
        tol, grad_tol = dict(rtol=4e-3, atol=1e-3), dict(rtol=0.02, atol=0.02)
    elif shared_calls and case.dtype == torch.float32:
        tol, grad_tol = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-5)
    elif shared_calls:
        tol, grad_tol = dict(rtol=1e-6, atol=1e-6), dict(rtol=1e-5, atol=1e-6)
    for (logps, entropy), (want_logps, want_entropy) in zip(got, want, strict=True):
        torch.testing.assert_close(logps, want_logps, **tol)
        if case.entropy:
            torch.testing.assert_close(entropy, want_entropy, **tol)
    if not case.grad:
        assert not want_grads and not got_grads
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert want_grads.keys() == got_grads.keys() == trainable
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **grad_tol, msg=name)
