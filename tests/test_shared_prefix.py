"""The shared-prompt pass gives the per-row pass's log-probs and gradients (align/rollout/shared_prefix.py), and
refuses the training-mode switches under which it would not; every switch against `rollout_logprobs`:
tests/test_matrix_shared_prompt.py."""

import pytest
import torch

from align.rollout.batch import RolloutBatch
from align.rollout.shared_prefix import shared_pass_inexact_reason, shared_prompt_logprobs, shares_prompts
from align.train.rl_common import response_logprobs
from tests.conftest import tiny_qwen2


def _batch(vocab: int, seed: int = 0) -> RolloutBatch:
    """3 prompts of different lengths (one of a single token), 3 responses each of different lengths,
    rows interleaved (prompt 0, 1, 2, 0, ...) so sharing cannot rely on rows being grouped."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (7, 1, 4)]
    lengths = torch.tensor([3, 1, 4, 2, 4, 4, 1, 3, 2])
    width = int(lengths.max())
    response_ids = torch.randint(5, vocab, (9, width), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    index = torch.tensor([0, 1, 2] * 3)
    return RolloutBatch(
        prompt_ids=[prompts[int(i)] for i in index],
        response_ids=response_ids.masked_fill(mask == 0, 0),
        response_mask=mask,
        logprobs=None,
        finished=torch.ones(9, dtype=torch.bool),
        prompt_index=index,
        lengths=lengths,
        n=1,
        pad_id=0,
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_logprobs_equal_the_per_row_pass_with_gradients(qwen_tokenizer, temperature):
    model = tiny_qwen2(qwen_tokenizer, seed=3).double()
    batch = _batch(2000)
    assert shares_prompts(batch) and not shares_prompts(batch.select([0, 1, 2]))
    mask = batch.response_mask.double()
    upstream = torch.randn(
        batch.response_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            logps = shared_prompt_logprobs(model, batch, temperature)
        else:
            logps = response_logprobs(model, batch.sequences(left_pad=True), batch.response_ids, temperature)
        (upstream * logps * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach() * mask, grads))
    (plain, plain_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, want in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], want, rtol=1e-5, atol=1e-6, msg=name)  # fp32 logits


def test_shared_prompt_logprobs_match_one_unpadded_row_each(qwen_tokenizer):
    """Against an independent reference: each row alone, prompt + response, no padding, no cache."""
    model = tiny_qwen2(qwen_tokenizer, seed=4)
    batch = _batch(2000, seed=5)
    with torch.no_grad():
        fast, entropy = shared_prompt_logprobs(model, batch, 1.0, with_entropy=True)
        for row in range(len(batch)):
            n = int(batch.lengths[row])
            ids = torch.tensor([batch.prompt_ids[row] + batch.response_ids[row, :n].tolist()])
            logits = model(input_ids=ids).logits[0, -n - 1 : -1].float()
            want = logits.log_softmax(-1).gather(-1, ids[0, -n:, None])[:, 0]
            torch.testing.assert_close(fast[row, :n], want, rtol=1e-5, atol=1e-5)
            want_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            torch.testing.assert_close(entropy[row, :n], want_entropy, rtol=1e-5, atol=1e-5)


def test_shared_prompt_logprobs_through_a_lora_adapter(qwen_tokenizer):
    """A peft-wrapped policy (the GRPO default) takes the cache by the inner model's keyword, and the
    adapter's gradients equal the per-row pass's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_qwen2(qwen_tokenizer, seed=6),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    batch = _batch(2000, seed=7)
    mask = batch.response_mask.float()
    grads = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            logps = shared_prompt_logprobs(model, batch, 1.0)
        else:
            logps = response_logprobs(model, batch.sequences(left_pad=True), batch.response_ids, 1.0)
        (logps * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_the_switches_that_make_sharing_inexact_are_named_and_refused(qwen_tokenizer):
    """Gradient checkpointing and active dropout, each only in training mode; the shared pass refuses them
    (`rollout_logprobs` takes the per-row pass instead)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen2(qwen_tokenizer, seed=8)
    assert shared_pass_inexact_reason(model.train()) is None  # training mode alone changes nothing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reason = shared_pass_inexact_reason(model)
    assert reason is not None and reason.startswith("gradient checkpointing in training mode")
    with torch.no_grad():  # GPT-2-style layer loops drop the cache whatever the grad mode
        assert shared_pass_inexact_reason(model) == reason
    with pytest.raises(ValueError, match="shared-prompt pass refused: gradient checkpointing"):
        shared_prompt_logprobs(model, _batch(2000), 1.0)
    assert shared_pass_inexact_reason(model.eval()) is None

    attention = tiny_qwen2(qwen_tokenizer, seed=8, attention_dropout=0.1).train()
    assert shared_pass_inexact_reason(attention) == (
        "dropout in training mode (model.layers.0.self_attn) would share one mask across a prompt's rows"
    )
    assert shared_pass_inexact_reason(attention.eval()) is None

    def lora(p: float) -> torch.nn.Module:
        config = LoraConfig(r=4, lora_dropout=p, target_modules=["q_proj"])
        return get_peft_model(tiny_qwen2(qwen_tokenizer, seed=8), config).train()

    assert shared_pass_inexact_reason(lora(0.0)) is None  # peft puts an Identity where p = 0

    # The modules that can carry a switch are found once per model; the switches are read on every call, and
    # a module added later (an adapter, a layer) is seen: no stale answer lets a dropout through.
    later = tiny_qwen2(qwen_tokenizer, seed=8).train()
    assert shared_pass_inexact_reason(later) is None
    later.model.layers[1].self_attn.attention_dropout = 0.1
    assert shared_pass_inexact_reason(later) == (
        "dropout in training mode (model.layers.1.self_attn) would share one mask across a prompt's rows"
    )
    later.model.layers[1].self_attn.attention_dropout = 0.0
    assert shared_pass_inexact_reason(later) is None
    later.model.layers[0].mlp.act_fn = torch.nn.Sequential(
        later.model.layers[0].mlp.act_fn, torch.nn.Dropout(0.2)
    )
    assert shared_pass_inexact_reason(later) == (
        "dropout in training mode (model.layers.0.mlp.act_fn.1) would share one mask across a prompt's rows"
    )
    swapped = tiny_qwen2(qwen_tokenizer, seed=8).train()
    assert shared_pass_inexact_reason(swapped) is None
    swapped.model.layers[1].mlp.act_fn = torch.nn.Dropout(0.3)  # one module for one: the same count
    assert shared_pass_inexact_reason(swapped) == (
        "dropout in training mode (model.layers.1.mlp.act_fn) would share one mask across a prompt's rows"
    )
    # The cache holds no strong reference: a model checked once is still freed.
    import gc
    import weakref

    gone = weakref.ref(swapped)
    del swapped
    gc.collect()
    assert gone() is None
    assert shared_pass_inexact_reason(lora(0.1)) == (
        "dropout in training mode (base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.default) "
        "would share one mask across a prompt's rows"
    )
