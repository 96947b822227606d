"""Rollout engines on a tiny Qwen2 (from config) with the real Qwen tokenizer; top-p filter against a full sort."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_qwen2
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2ForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

import chatml
from align.rollout.batch import (
    HFRolloutEngine,
    RolloutBatch,
    RolloutEngine,
    position_ids_from_mask,
    stop_token_ids,
    teacher_forced_logprobs,
)
from align.rollout.engines import engine_class
from align.rollout.manual import ManualRolloutEngine
from align.rollout.sampling import counter_token_keys, counter_uniforms, sample_tokens, top_p_filter
from align.rollout.static import StaticRolloutEngine

ENGINES = [HFRolloutEngine, ManualRolloutEngine, StaticRolloutEngine]


def _tiny(tok, head_scale: float) -> Qwen2ForCausalLM:
    # No special-token ids in the config: the engines must stop on the ids they are given.
    return tiny_qwen2(tok, head_scale=head_scale, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def tiny(qwen_tokenizer):
    return _tiny(qwen_tokenizer, 50.0)


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is 12 + 30? Answer with just the number."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour, please, and make it a warm colour this time."},
        ],
    ]
    return [chatml.encode_prompt(c, qwen_tokenizer) for c in convs]


def _teacher_forced(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of ``response`` after ``prompt``: one unpadded forward pass of the plain model."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]


# ------------------------------------------------------------------------------------------------ top-p


def _reference_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep-mask by a full descending sort of the whole vocabulary."""
    probs = logits.float().softmax(-1)
    sorted_p = probs.sort(-1, descending=True).values
    cum = sorted_p.cumsum(-1)
    first = (cum < top_p).sum(-1, keepdim=True)
    vocab = probs.shape[-1]
    cut = torch.where(first < vocab, sorted_p.gather(-1, first.clamp(max=vocab - 1)), torch.zeros(()))
    return probs >= cut


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    vocab=st.integers(1, 400),
    scale=st.sampled_from([0.01, 0.3, 1.0, 3.0, 10.0, 40.0]),
    ties=st.booleans(),
    top_p=st.floats(0.001, 1.0),
    initial_k=st.integers(1, 8),
)
def test_top_p_filter_keeps_the_same_set_as_a_full_sort(seed, rows, vocab, scale, ties, top_p, initial_k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    if ties:  # coarse values: many exact ties, also at the cut
        logits = logits.round()
    out = top_p_filter(logits, top_p, initial_k=initial_k)
    kept = ~torch.isinf(out)
    if top_p < 1.0:
        assert torch.equal(kept, _reference_top_p(logits, top_p))
    else:
        assert kept.all()
    assert torch.equal(out[kept], logits[kept])  # kept logits untouched
    # The nucleus semantics: the most likely token is kept; the kept mass reaches top_p (up to rounding)
    # unless everything is kept; and dropping the whole lowest kept level would fall below top_p.
    probs = logits.softmax(-1)
    assert kept.gather(-1, probs.argmax(-1, keepdim=True)).all()
    for p, k in zip(probs, kept, strict=True):
        if not k.all():
            assert p[k].sum() >= top_p - 1e-5
            lowest = p[k].min()
            assert p[k & (p > lowest)].sum() < top_p + 1e-5


def test_top_p_filter_on_the_real_vocabulary_matches_transformers():
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 8.0, 20.0):  # flat (full-sort fallback) to peaked (a few dozen candidates)
        logits = torch.randn(3, 151_665, generator=g) * scale
        for top_p in (0.1, 0.5, 0.9, 0.99):
            kept = ~torch.isinf(top_p_filter(logits, top_p))
            assert torch.equal(kept, _reference_top_p(logits, top_p))
            # Continuous logits have no ties, so transformers' warper keeps the same tokens, except where its
            # ascending float32 cumsum over 150k tiny probabilities rounds differently right at the cut.
            hf = ~torch.isinf(TopPLogitsWarper(top_p=top_p)(None, logits.clone()))
            probs = logits.softmax(-1)
            for row in range(3):
                differ = (kept[row] ^ hf[row]).nonzero().squeeze(1)
                if len(differ):  # mass strictly above each differing token is within rounding of top_p
                    mass_above = torch.stack([probs[row][probs[row] > probs[row, t]].sum() for t in differ])
                    assert (mass_above - top_p).abs().max() < 1e-4
                    assert len(differ) <= 1e-3 * int(kept[row].sum())


def test_top_p_filter_edges():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, float("-inf")]])
    p = logits.softmax(-1)[0]
    assert top_p_filter(logits, 1.0) is logits
    # The cut falls inside the tie: both tied tokens stay.
    assert (~torch.isinf(top_p_filter(logits, float(p[0] + 0.5 * p[1])))).tolist() == [[1, 1, 1, 0, 0]]
    assert (~torch.isinf(top_p_filter(logits, 1e-6))).tolist() == [[1, 0, 0, 0, 0]]  # top token always kept
    assert (~torch.isinf(top_p_filter(logits, float(p[0])))).tolist() == [
        [1, 0, 0, 0, 0]
    ]  # mass reached exactly
    assert top_p_filter(logits.half(), 0.5).dtype == torch.float16
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)


def test_sample_tokens_draws_from_the_renormalised_nucleus():
    logits = torch.tensor([1.5, 1.0, 0.5, 0.0, -1.0])
    temperature, top_p = 0.8, 0.8
    probs = (logits / temperature).softmax(-1)
    nucleus = ~torch.isinf(top_p_filter(logits / temperature, top_p))
    expected = torch.where(nucleus, probs, 0.0) / probs[nucleus].sum()
    g = torch.Generator().manual_seed(0)
    tokens, logps = sample_tokens(logits.expand(40_000, -1), temperature, top_p, generator=g)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq[~nucleus] == 0).all()
    assert torch.allclose(freq, expected, atol=0.01)
    # Log-probs are the plain tempered softmax, not the renormalised nucleus.
    assert torch.allclose(logps, probs.log()[tokens])
    greedy, greedy_lp = sample_tokens(logits[None], 0.0)
    assert greedy.tolist() == [0] and torch.allclose(greedy_lp, logits.log_softmax(-1)[:1])


# ------------------------------------------------------------------------------------------------ engines


def test_engines_satisfy_the_interface_and_default_stop(tiny, qwen_tokenizer):
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for cls in ENGINES:
        engine = cls(tiny, qwen_tokenizer)
        assert isinstance(engine, RolloutEngine)
        assert engine.stop == stop_token_ids(qwen_tokenizer) and engine.stop[0] == im_end
        assert engine.pad_id == qwen_tokenizer.pad_token_id
        for bad in (
            dict(n=0),
            dict(max_new_tokens=0),
            dict(temperature=-1.0),
            dict(top_p=0.0),
            dict(top_p=1.5),
        ):
            kw = dict(n=1, max_new_tokens=2) | bad
            with pytest.raises(ValueError):
                engine.generate([[1, 2]], **kw)
        with pytest.raises(ValueError, match="empty"):
            engine.generate([[1], []], n=1, max_new_tokens=2)
        empty = engine.generate([], n=2, max_new_tokens=3)
        assert len(empty) == 0 and empty.response_ids.shape == (0, 0) and empty.texts(qwen_tokenizer) == []


@pytest.mark.parametrize("cls", ENGINES)
def test_n_samples_grouped_and_left_padding_equals_each_prompt_alone(cls, tiny, qwen_tokenizer, prompts):
    engine = cls(tiny, qwen_tokenizer, batch_size=4)  # 6 rows: two chunks of different widths
    batch = engine.generate(prompts, n=2, max_new_tokens=6, temperature=0.0)
    assert len(batch) == 6 and batch.n == 2 and batch.num_prompts == 3
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.prompt_ids == [p for p in prompts for _ in range(2)]
    alone = [engine.generate([p], n=1, max_new_tokens=6, temperature=0.0).responses()[0] for p in prompts]
    assert batch.responses() == [r for r in alone for _ in range(2)]
    assert batch.grouped(batch.lengths).shape == (3, 2)
    assert batch.texts(qwen_tokenizer) == qwen_tokenizer.batch_decode(
        batch.responses(), skip_special_tokens=True
    )


def test_manual_greedy_equals_hf_greedy_token_for_token(qwen_tokenizer, prompts):
    model = _tiny(qwen_tokenizer, 50.0)
    # A checkpoint's generation_config (Qwen2-Instruct ships these) must not change what we sample.
    model.generation_config.update(
        do_sample=True, temperature=0.3, top_k=20, top_p=0.5, repetition_penalty=1.5
    )
    kw = dict(n=1, max_new_tokens=10, temperature=0.0)
    hf = HFRolloutEngine(model, qwen_tokenizer).generate(prompts, **kw)
    manual = ManualRolloutEngine(model, qwen_tokenizer).generate(prompts, **kw)
    assert torch.equal(hf.response_ids, manual.response_ids)
    assert torch.equal(hf.response_mask, manual.response_mask)
    assert torch.allclose(hf.logprobs, manual.logprobs, atol=1e-5, rtol=0)
    assert all(len(set(r)) > 1 for r in hf.responses())  # a degenerate model would prove little


def test_manual_engine_prefills_each_prompt_once_and_matches_hf(qwen_tokenizer, prompts):
    """n samples of a prompt share its prefill (one row per distinct prompt in the first forward pass) and
    decode as if each had its own: greedy n=3 equals HF's greedy n=3 token for token, log-probs included."""
    model = _tiny(qwen_tokenizer, 50.0)
    first_batch = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: first_batch.append(kw["input_ids"].shape) if not first_batch else None,
        with_kwargs=True,
    )
    kw = dict(n=3, max_new_tokens=8, temperature=0.0)
    try:
        manual = ManualRolloutEngine(model, qwen_tokenizer, batch_size=9).generate(prompts, **kw)
    finally:
        handle.remove()
    hf = HFRolloutEngine(model, qwen_tokenizer).generate(prompts, **kw)
    assert first_batch[0][0] == len(prompts) == 3  # 3 distinct prompts prefilled for 9 rows
    assert torch.equal(hf.response_ids, manual.response_ids)
    assert torch.allclose(hf.logprobs, manual.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in manual.responses()}) > 1


@pytest.mark.parametrize("cls", ENGINES)
def test_stop_masks_and_finished_flags(cls, tiny, qwen_tokenizer, prompts):
    engine = cls(tiny, qwen_tokenizer, batch_size=2)
    max_new = 8
    free = engine.generate(prompts, n=1, max_new_tokens=max_new, temperature=0.0, stop=[])
    assert free.lengths.tolist() == [max_new] * 3 and not free.finished.any()
    rows = free.responses()
    # Stop tokens taken from the free-running output: row 0 stops at its 3rd token; the others stop wherever
    # those tokens occur first, or run to max_new_tokens.
    stop = [rows[0][2], rows[1][5]]
    batch = engine.generate(prompts, n=1, max_new_tokens=max_new, temperature=0.0, stop=stop)
    expected_len = [next((k + 1 for k, t in enumerate(r) if t in stop), max_new) for r in rows]
    expected_fin = [any(t in stop for t in r) for r in rows]
    assert expected_len[0] == 3 and not all(expected_fin), "the test needs early and unfinished rows"
    assert batch.lengths.tolist() == expected_len
    assert batch.finished.tolist() == expected_fin
    width = max(expected_len)
    assert batch.response_ids.shape == (3, width)
    for i, n_tok in enumerate(expected_len):
        assert batch.response_mask[i].tolist() == [1] * n_tok + [0] * (width - n_tok)
        assert batch.response_ids[i, :n_tok].tolist() == rows[i][:n_tok]
        assert (batch.response_ids[i, n_tok:] == engine.pad_id).all()
        assert (batch.logprobs[i, n_tok:] == 0).all()
    # The checkpoint's own eos must not sneak back in when the caller asks for no stop tokens.
    saved, tiny.generation_config.eos_token_id = tiny.generation_config.eos_token_id, stop[0]
    try:
        again = engine.generate(prompts, n=1, max_new_tokens=max_new, temperature=0.0, stop=[])
    finally:
        tiny.generation_config.eos_token_id = saved
    assert again.responses() == rows


@pytest.mark.parametrize("source", ["forward", "generate"])
@pytest.mark.parametrize("cls", ENGINES)
def test_logprobs_equal_teacher_forcing(cls, source, qwen_tokenizer, prompts):
    model = _tiny(qwen_tokenizer, 10.0)
    engine = cls(model, qwen_tokenizer, logprobs=source, batch_size=4)
    for temperature, top_p in ((0.7, 0.9), (1.3, 1.0), (0.0, 1.0)):
        batch = engine.generate(prompts, n=2, max_new_tokens=7, temperature=temperature, top_p=top_p, seed=1)
        assert batch.logprobs is not None and batch.logprobs.dtype == torch.float32
        assert not batch.logprobs.is_inference() and not batch.response_ids.is_inference()  # usable in a loss
        for i, response in enumerate(batch.responses()):
            want = _teacher_forced(model, batch.prompt_ids[i], response, temperature or 1.0)
            got = batch.logprobs[i, : len(response)]
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (temperature, (got - want).abs().max())
        # teacher_forced_logprobs (what a training step or the reference model would use) agrees too.
        assert torch.allclose(teacher_forced_logprobs(model, batch), batch.logprobs, atol=1e-5, rtol=0)
        if temperature > 0:
            assert batch.logprobs[batch.response_mask.bool()].std() > 0.1  # not a flat distribution


@pytest.mark.parametrize("cls", ENGINES)
def test_seeded_sampling_is_reproducible_and_leaves_global_rng_and_mode_alone(
    cls, tiny, qwen_tokenizer, prompts
):
    engine = cls(tiny, qwen_tokenizer, logprobs="none")
    kw = dict(n=2, max_new_tokens=5, temperature=1.5, top_p=0.9)
    state = torch.get_rng_state()
    tiny.train()
    try:
        a = engine.generate(prompts, seed=7, **kw)
        assert tiny.training  # the caller's mode is restored
        b = engine.generate(prompts, seed=7, **kw)
        c = engine.generate(prompts, seed=8, **kw)
    finally:
        tiny.eval()
    assert torch.equal(state, torch.get_rng_state())
    assert a.logprobs is None
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert a.responses()[0] != a.responses()[1]  # the n samples of a prompt are distinct draws


def test_sequences_layout_on_a_hand_made_batch():
    pad = 0
    batch = RolloutBatch(
        prompt_ids=[[11, 12, 13], [21]],
        response_ids=torch.tensor([[14, 15, 99], [22, 23, 24]]),  # 99: a leftover after the stop, masked out
        response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        logprobs=torch.zeros(2, 3),
        finished=torch.tensor([True, False]),
        prompt_index=torch.tensor([0, 1]),
        lengths=torch.tensor([2, 3]),
        n=1,
        pad_id=7,
    )
    ids, mask, start = batch.sequences(pad_id=pad, left_pad=True)
    assert ids.tolist() == [[11, 12, 13, 14, 15, 0], [0, 0, 21, 22, 23, 24]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert start.tolist() == [3, 3]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    ids, mask, start = batch.sequences(pad_id=pad, left_pad=False)
    assert ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert start.tolist() == [3, 1]
    assert batch.sequences().input_ids[0, -1].item() == 7  # default pad: the batch's own
    assert batch.responses() == [[14, 15], [22, 23, 24]]


# ------------------------------------------------------------------------------------- static engine


@pytest.fixture(scope="module")
def varied_prompts(qwen_tokenizer):
    """Five prompts of 9, 13 and 24 tokens: with n=2, ten rows, more than the engines' 3 slots below."""
    texts = [
        "Hi",
        "ok",
        "What is 12 + 30? Answer with just the number.",
        "Tell me about cats.",
        "Name a warm colour.",
    ]
    return [chatml.encode_prompt([{"role": "user", "content": t}], qwen_tokenizer) for t in texts]


def _stops_at_different_steps(free: RolloutBatch) -> list[int]:
    """Stop tokens taken from a free-running batch so that rows end at different steps (or never)."""
    rows = free.responses()
    return [rows[0][1], rows[2][4], rows[4][6]]


def test_static_greedy_equals_hf_and_manual_with_refill(qwen_tokenizer, varied_prompts):
    model = _tiny(qwen_tokenizer, 50.0)
    kw = dict(n=2, max_new_tokens=9, temperature=0.0)
    free = HFRolloutEngine(model, qwen_tokenizer, batch_size=16).generate(varied_prompts, stop=[], **kw)
    stop = _stops_at_different_steps(free)
    hf = HFRolloutEngine(model, qwen_tokenizer, batch_size=16).generate(varied_prompts, stop=stop, **kw)
    manual = ManualRolloutEngine(model, qwen_tokenizer, batch_size=4).generate(
        varied_prompts, stop=stop, **kw
    )
    # 3 slots for 10 rows: slots are refilled as rows end, at different steps.
    static = StaticRolloutEngine(model, qwen_tokenizer, batch_size=3, logprobs="generate").generate(
        varied_prompts, stop=stop, **kw
    )
    lengths = hf.lengths.tolist()
    assert len(set(lengths)) >= 3 and hf.finished.any() and not hf.finished.all(), lengths
    for other in (manual, static):
        assert torch.equal(other.response_ids, hf.response_ids)
        assert torch.equal(other.response_mask, hf.response_mask)
        assert torch.equal(other.finished, hf.finished)
    # Decoding log-probs of the static engine (through its slot cache) equal a teacher-forced pass.
    assert torch.allclose(static.logprobs, teacher_forced_logprobs(model, static), atol=1e-5, rtol=0)
    assert torch.allclose(static.logprobs, hf.logprobs, atol=1e-5, rtol=0)


def test_static_sampling_does_not_depend_on_batch_size_or_refilling(qwen_tokenizer, varied_prompts):
    model = _tiny(qwen_tokenizer, 10.0)
    kw = dict(n=2, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    free = StaticRolloutEngine(model, qwen_tokenizer, batch_size=16).generate(varied_prompts, stop=[], **kw)
    stop = _stops_at_different_steps(free)
    runs = [
        StaticRolloutEngine(model, qwen_tokenizer, batch_size=bs, logprobs="generate").generate(
            varied_prompts, stop=stop, **kw
        )
        for bs in (16, 3, 1)  # no refill, refill, one row at a time
    ]
    assert len(set(runs[0].lengths.tolist())) >= 3 and runs[0].finished.any()
    for run in runs[1:]:
        assert torch.equal(run.response_ids, runs[0].response_ids)
        assert torch.equal(run.lengths, runs[0].lengths)
        assert torch.allclose(run.logprobs, runs[0].logprobs, atol=1e-5, rtol=0)
    assert torch.allclose(runs[1].logprobs, teacher_forced_logprobs(model, runs[1]), atol=1e-5, rtol=0)
    other_seed = StaticRolloutEngine(model, qwen_tokenizer).generate(
        varied_prompts, stop=stop, **(kw | {"seed": 4})
    )
    assert not torch.equal(other_seed.response_ids, runs[0].response_ids)


def test_counter_uniforms_are_uniform_keyed_and_sample_the_nucleus():
    keys = counter_token_keys(5, "cpu")
    rows = torch.arange(40_000)
    u = counter_uniforms(11, rows, torch.full_like(rows, 2), keys)
    assert u.shape == (40_000, 5) and u.min() > 0 and u.max() < 1
    # Uniform: each decile holds a tenth of the draws (+-3 standard errors); neighbours uncorrelated.
    deciles = torch.bincount((u.flatten() * 10).long(), minlength=10).float() / u.numel()
    assert (deciles - 0.1).abs().max() < 3 * (0.1 * 0.9 / u.numel()) ** 0.5
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1]) < 0.02
    # Keyed by (seed, row, step, token) only: a row's draws do not depend on the rest of the batch.
    sub = counter_uniforms(11, rows[[7, 3]], torch.tensor([2, 2]), keys)
    assert torch.equal(sub, u[[7, 3]])
    assert not torch.equal(counter_uniforms(11, rows[:5], torch.full((5,), 3), keys), u[:5])
    assert not torch.equal(counter_uniforms(12, rows[:5], torch.full((5,), 2), keys), u[:5])
    # Through the exponential race they draw from the renormalised nucleus.
    logits = torch.tensor([1.5, 1.0, 0.5, 0.0, -1.0])
    nucleus = ~torch.isinf(top_p_filter(logits / 0.8, 0.8))
    probs = (logits / 0.8).softmax(-1)
    expected = torch.where(nucleus, probs, 0.0) / probs[nucleus].sum()
    tokens, _ = sample_tokens(logits.expand(40_000, -1), 0.8, 0.8, uniforms=u)
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq[~nucleus] == 0).all() and torch.allclose(freq, expected, atol=0.01)


def test_race_never_picks_a_filtered_token_at_extreme_uniforms():
    logits = torch.tensor([[0.0, 10.0, 0.0, 0.0]]).expand(3, -1)  # top-p 0.5 keeps token 1 alone
    uniforms = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.3, 1.0]])
    tokens, logps = sample_tokens(logits, 1.0, 0.5, uniforms=uniforms)
    assert tokens.tolist() == [1, 1, 1] and torch.isfinite(logps).all()


def test_engine_class_by_config_name_and_vllm_missing_error(tiny, qwen_tokenizer, monkeypatch):
    assert engine_class("hf") is HFRolloutEngine and engine_class("manual") is ManualRolloutEngine
    assert engine_class("static") is StaticRolloutEngine
    with pytest.raises(ValueError, match="unknown rollout engine"):
        engine_class("fast")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(ImportError, match="pip install vllm"):
        engine_class("vllm")(tiny, qwen_tokenizer)


def test_manual_decoding_uses_no_deprecated_cache_keyword(qwen_tokenizer, prompts):
    """The KV cache goes in under the name the installed transformers declares (5.24 renamed
    ``past_key_values`` to ``cache``; the old name warns and is removed in 5.40)."""
    import warnings

    model = tiny_qwen2(qwen_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ManualRolloutEngine(model, qwen_tokenizer).generate(prompts, n=1, max_new_tokens=3, temperature=0.0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_rollout_batch_from_responses_pads_right_and_keeps_what_was_recorded():
    from align.rollout.batch import RolloutBatch

    batch = RolloutBatch.from_responses([[1, 2], [3]], [[7, 8, 9], [5]], [True, False], pad_id=0)
    assert batch.response_ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.lengths.tolist() == [3, 1] and batch.finished.tolist() == [True, False]
    assert batch.prompt_ids == [[1, 2], [3]] and batch.n == 1 and batch.logprobs is None
    assert batch.responses() == [[7, 8, 9], [5]]
    with pytest.raises(ValueError, match="one entry per row"):
        RolloutBatch.from_responses([[1]], [[2], [3]], [True, True], pad_id=0)
