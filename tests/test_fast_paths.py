"""Each fast path gives the plain path's numbers (values and gradients), on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from align.fused_logprobs import chunked_entropy, chunked_token_logprobs, default_chunk, lm_logprobs
from align.rl_math import entropy_from_logits, token_logprobs


def _plain_and_fast_grads(hidden, weight, bias, targets, temperature, chunk, upstream):
    """(values, grads) of sum(upstream * logp) on the plain full-logits path and on the chunked one."""
    results = []
    for fast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        if fast:
            logp = chunked_token_logprobs(h, w, targets, b, temperature, chunk)
        else:
            logp = token_logprobs(F.linear(h, w, b), targets, temperature)
        (upstream * logp).sum().backward()
        results.append((logp.detach(), h.grad, w.grad, None if b is None else b.grad))
    return results


@pytest.mark.parametrize(
    "n, chunk, temperature, with_bias",
    [(37, 5, 1.0, False), (37, 64, 0.7, True), (1, 1, 1.3, False), (16, 16, 1.0, True)],
)
def test_chunked_logprobs_equal_plain_values_and_gradients(n, chunk, temperature, with_bias):
    torch.manual_seed(0)
    vocab, width = 300, 24
    hidden = torch.randn(n, width, dtype=torch.float64)
    weight = torch.randn(vocab, width, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n, dtype=torch.float64)  # an arbitrary downstream loss (PPO-like)
    plain, fast = _plain_and_fast_grads(hidden, weight, bias, targets, temperature, chunk, upstream)
    # The log-probs come back fp32 on both paths; gradients stay in the input dtype (fp64 here).
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(fast[1:], plain[1:], strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_match_an_independent_reference():
    """Against log_softmax computed by hand, for a worked 2-token, 3-word example."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([2, 1])
    # Logits: row 0 = [1, 0, 1], row 1 = [0, 2, 2].
    want = torch.tensor([1 - math.log(2 * math.e + 1), 2 - math.log(1 + 2 * math.e**2)])
    got = chunked_token_logprobs(hidden, weight, targets, chunk=1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_entropy_equals_plain():
    torch.manual_seed(1)
    hidden, weight = torch.randn(23, 16), torch.randn(200, 16)
    want = entropy_from_logits(hidden @ weight.T)
    torch.testing.assert_close(chunked_entropy(hidden, weight, chunk=4), want, rtol=1e-5, atol=1e-5)


def test_default_chunk_bounds_the_logits_block():
    # Qwen's vocabulary: one fp32 block of 441 positions is just under 256 MiB.
    assert default_chunk(151_936) == 441
    assert 441 * 151_936 * 4 <= 1 << 28 < 442 * 151_936 * 4
    assert default_chunk(10**12) == 1
    # A small vocabulary: the block stops at 1,024 positions (not 8,192), whatever the row length.
    assert default_chunk(8192) == 1024


def _tiny_lm(tie: bool, vocab: int = 97):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_logprobs_packed_row_equals_plain_with_gradients(tie):
    """The SFT/DPO call: one packed row, boolean logits_to_keep, flat targets; parameters' grads equal."""
    model = _tiny_lm(tie)
    ids = torch.randint(0, 97, (1, 20))
    positions = torch.tensor([list(range(12)) + list(range(8))])
    keep = torch.zeros(1, 20, dtype=torch.bool)
    keep[0, 3:11] = True
    keep[0, 14:19] = True
    targets = torch.randint(0, 97, (int(keep.sum()),))
    grads, values = [], []
    for fast in (False, True):
        model.zero_grad()
        logp = lm_logprobs(
            model,
            targets,
            fast=fast,
            input_ids=ids,
            position_ids=positions,
            logits_to_keep=keep,
            use_cache=False,
        )
        (-logp.sum() / 7).backward()
        values.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    # The head is back in place afterwards and still returns logits.
    assert model(input_ids=ids).logits.shape == (1, 20, 97)


def test_lm_logprobs_rollout_layout_with_temperature_and_entropy():
    """The PPO call: (B, R) targets, logits_to_keep=R + 1, last position dropped, temperature, entropy."""
    model = _tiny_lm(False).eval()
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :2] = 0
    targets = ids[:, -4:]
    kwargs = dict(input_ids=ids, attention_mask=mask, logits_to_keep=5, drop_last=True, use_cache=False)
    with torch.no_grad():
        plain_lp, plain_ent = lm_logprobs(
            model, targets, temperature=0.8, with_entropy=True, fast=False, **kwargs
        )
        fast_lp, fast_ent = lm_logprobs(model, targets, temperature=0.8, with_entropy=True, **kwargs)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -5:-1]
    assert fast_lp.shape == (3, 4)
    torch.testing.assert_close(fast_lp, plain_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_ent, plain_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_lp, token_logprobs(logits, targets, 0.8), rtol=1e-5, atol=1e-5)


def test_lm_logprobs_falls_back_when_the_head_is_not_a_plain_linear():
    """A wrapped head (as LoRA on lm_head would be) is left alone: the plain path runs."""

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2.0

    model = _tiny_lm(False).eval()
    model.lm_head = Scaled(model.lm_head)
    ids = torch.randint(0, 97, (1, 6))
    targets = ids[0, 1:]
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, -1] = False
    with torch.no_grad():
        got = lm_logprobs(model, targets, input_ids=ids, logits_to_keep=keep)
        want = token_logprobs(model(input_ids=ids).logits[0, :-1], targets)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_adamw_kernel_is_fused_on_cpu_and_matches_the_per_tensor_loop():
    """build_optimizer's kernel choice gives the reference AdamW's weights after a few steps."""
    from align.train.optimization import adamw_kernel

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32), torch.randn(7, 5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    params = {}
    for kind, kwargs in (("loop", {"foreach": False}), ("chosen", adamw_kernel(start))):
        ps = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
        for step_grads in grads:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        params[kind] = ps
    assert adamw_kernel(start) == {"fused": True}
    assert adamw_kernel([torch.zeros(3, dtype=torch.long)]) == {"foreach": True}
    for got, want, p0 in zip(params["chosen"], params["loop"], start, strict=True):
        assert not torch.equal(want, p0)  # the steps moved the weights
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lm_logprobs_under_bf16_autocast_equals_plain():
    """The GPU training setting (bf16 autocast over fp32 weights), on CPU: the chunked head runs its
    matmul in bf16 as the plain head does, so values and gradients agree."""
    model = _tiny_lm(True)
    ids = torch.randint(0, 97, (1, 16))
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, -1] = False
    targets = ids[0, 1:]
    values, grads = [], []
    for fast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = lm_logprobs(model, targets, fast=fast, input_ids=ids, logits_to_keep=keep, use_cache=False)
        assert logp.dtype == torch.float32
        (-logp.mean()).backward()
        values.append(logp.detach())
        grads.append(model.lm_head.weight.grad.clone())
    # Same bf16 matmuls, same fp32 reductions: equal here to float rounding (measured: exactly).
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_sft_loss_from_logprobs_equals_sft_loss():
    """The SFT loop's loss from chunked log-probs is `sft_loss` on full logits (value, stats, gradient)."""
    from align.losses import sft_loss, sft_loss_from_logprobs

    torch.manual_seed(2)
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (9,))
    w_plain, w_fast = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    plain, plain_stats = sft_loss(hidden @ w_plain.T, targets, 20)
    fast, fast_stats = sft_loss_from_logprobs(chunked_token_logprobs(hidden, w_fast, targets, chunk=4), 20)
    plain.backward()
    fast.backward()
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_stats["nll_sum"], plain_stats["nll_sum"], rtol=1e-6, atol=1e-6)
    assert int(fast_stats["tokens"]) == int(plain_stats["tokens"]) == 9
    torch.testing.assert_close(w_fast.grad, w_plain.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(N,\) log-probs"):
        sft_loss_from_logprobs(torch.zeros(2, 3), 1)
