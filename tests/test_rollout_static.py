"""StaticRolloutEngine's decoding step (the function CUDA graphs capture), run eager and compiled on CPU;
its recompile guard; the dtype RL rollouts decode in."""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_tokenizer, tiny_qwen2

import align.rollout.static as rollout_static
from align.config import GRPOConfig, OnlineDPOConfig, PPOConfig
from align.rollout.batch import HFRolloutEngine
from align.rollout.engines import engine_options
from align.rollout.sampling import counter_token_keys, counter_uniforms, sample_tokens
from align.rollout.static import StaticRolloutEngine, _bucket, cudagraph_skips, require_graphs
from align.train.process import make_accelerator
from align.train.rl_run import RLRun

TEXTS = ["hello there", "abc", "a longer prompt for the model", "x", "two words"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def _stops(free) -> list[int]:
    """Stop ids taken from a free-running batch, so that rows end at different steps (or never)."""
    rows = free.responses()
    return [rows[0][1], rows[2][4], rows[4][6]]


def test_looking_every_few_steps_changes_nothing(tok, prompts):
    """check_every (steps between host looks at the finished slots) with refilling: same tokens, lengths,
    log-probs; greedy equals HF generate."""
    model = tiny_qwen2(tok, head_scale=10.0)
    sample = dict(n=2, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=5)
    stop = _stops(StaticRolloutEngine(model, tok, batch_size=16).generate(prompts, stop=[], **sample))
    sampled = [
        StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate", check_every=k).generate(
            prompts, stop=stop, **sample
        )
        for k in (1, 3, 7)
    ]
    assert len(set(sampled[0].lengths.tolist())) >= 3 and sampled[0].finished.any()
    for run in sampled[1:]:
        assert torch.equal(run.response_ids, sampled[0].response_ids)
        assert torch.equal(run.lengths, sampled[0].lengths)
        assert torch.equal(run.finished, sampled[0].finished)
        assert torch.allclose(run.logprobs, sampled[0].logprobs, atol=1e-6, rtol=0)
    greedy = dict(n=2, max_new_tokens=8, temperature=0.0)
    stop = _stops(HFRolloutEngine(model, tok, batch_size=16).generate(prompts, stop=[], **greedy))
    hf = HFRolloutEngine(model, tok, batch_size=16).generate(prompts, stop=stop, **greedy)
    ours = StaticRolloutEngine(model, tok, batch_size=3, check_every=4).generate(prompts, stop=stop, **greedy)
    assert len(set(hf.lengths.tolist())) >= 2 and hf.finished.any()
    assert torch.equal(ours.response_ids, hf.response_ids)
    assert torch.equal(ours.finished, hf.finished)


def _near_ties(vocab: int, seed: int) -> torch.Tensor:
    """(4, vocab) logits where the nucleus cut and the top choice fall on ties: rounded values (exact ties),
    a top token one ulp above the next, and a flat row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, vocab, generator=g) * 4
    logits[0] = logits[0].round()
    top = logits[1].argmax()
    logits[1, (top + 1) % vocab] = torch.nextafter(logits[1, top], torch.tensor(-1e9))
    logits[2] = (logits[2] * 0.05).round(decimals=1)
    return logits


@pytest.mark.parametrize("vocab", [300, 20_000])  # sample_tokens sorts all of 300; searches top-k of 20k
def test_graph_sampler_draws_what_sample_tokens_draws(vocab):
    """The sampler of the static engine (eager and compiled alike: a full sort, the knobs as tensors) gives
    the very tokens and log-probs of the reference sampler (top-k search, float knobs) on the same counter
    uniforms, across temperatures and top-p values, with ties at the cut and at the top."""
    from align.rollout.sampling import sample_tokens_graph

    rows, steps = torch.arange(4) * 7, torch.tensor([0, 2, 7, 30])
    keys = counter_token_keys(vocab, "cpu")
    u = counter_uniforms(1234, rows, steps, keys)
    # Inside the graph the seed is a 0-d tensor: the same noise as the int seed.
    assert torch.equal(counter_uniforms(torch.tensor(1234), rows, steps, keys), u)
    for seed in range(3):
        logits = _near_ties(vocab, seed)
        for temperature, top_p in itertools.product((0.3, 1.0, 1.6), (0.05, 0.5, 0.9, 0.999, 1.0)):
            want = sample_tokens(logits, temperature, top_p, uniforms=u)
            got = sample_tokens_graph(logits, torch.tensor(temperature), torch.tensor(top_p), u)
            assert torch.equal(got[0], want[0]), (seed, temperature, top_p)
            assert torch.equal(got[1], want[1]), (seed, temperature, top_p)
        want = sample_tokens(logits, 0.0)
        got = sample_tokens_graph(logits, torch.tensor(1.0), torch.tensor(0.9), None)  # greedy
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _reference_rollout(model, prompts, n, max_new_tokens, temperature, top_p, seed, stop):
    """What the static engine must sample, row by row: prompt i's j-th sample is row i * n + j, whose step t
    draws with the reference sampler (`sample_tokens`) on `counter_uniforms(seed, row, t)`, from a plain
    uncached forward over the unpadded row. Returns (tokens, log-probs) per row."""
    rows = [p for p in prompts for _ in range(n)]
    keys = None
    out = []
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids, toks, lps = list(row), [], []
            for t in range(max_new_tokens):
                logits = model(torch.tensor([ids])).logits[:, -1]
                keys = counter_token_keys(logits.shape[-1], "cpu") if keys is None else keys
                u = counter_uniforms(seed, torch.tensor([i]), torch.tensor([t]), keys)
                tok, lp = sample_tokens(logits, temperature, top_p, uniforms=u if temperature > 0 else None)
                toks.append(int(tok))
                lps.append(float(lp))
                ids.append(int(tok))
                if toks[-1] in stop:
                    break
            out.append((toks, lps))
    return out


def _assert_equals_reference(batch, reference) -> None:
    for r, (toks, lps) in enumerate(reference):
        assert batch.responses()[r] == toks, r
        assert torch.allclose(batch.logprobs[r, : len(lps)], torch.tensor(lps), atol=1e-5, rtol=0), r


def test_static_engine_samples_what_the_reference_sampler_draws(tok, prompts):
    """Eager decoding (the compiled graph's own step and sampler) with refilling draws, token for token,
    what the reference sampler draws row by row; greedy and two (temperature, top-p)."""
    model = tiny_qwen2(tok, head_scale=10.0)
    engine = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate")
    for temperature, top_p in ((0.0, 1.0), (0.7, 0.9), (1.3, 1.0)):
        kw = dict(n=2, max_new_tokens=8, temperature=temperature, top_p=top_p, seed=11)
        free = engine.generate(prompts, stop=[], **kw)
        stop = _stops(free)
        batch = engine.generate(prompts, stop=stop, **kw)
        assert batch.finished.any() and len(set(batch.lengths.tolist())) >= 2
        _assert_equals_reference(batch, _reference_rollout(model, prompts, stop=stop, **kw))


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile with dynamo's tracing, guards and recompile limit but no inductor (seconds, not a
    minute): the graph runs as traced. Yields the list of compilations (one FX graph each); a test may set
    `run_hook`, called before every run of a compiled graph."""
    real = torch.compile
    compiled: list = []
    hooks = SimpleNamespace(run_hook=None, compiled=compiled)

    def backend(gm, example_inputs):
        compiled.append(gm)

        def run(*args):
            if hooks.run_hook is not None:
                hooks.run_hook()
            return gm.forward(*args)

        return run

    @functools.wraps(real)  # the engine reads torch.compile's signature
    def compile(fn, **kw):
        kw.pop("mode", None)
        return real(fn, backend=backend, **kw)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile)
    yield hooks
    torch._dynamo.reset()


def test_skipped_graphs_fail_loudly(tok, prompts, traced_compile):
    """The engine reads inductor's skip counter around every compiled call, not only a shape's first (a
    failed guard recompiles on any call): a skip reported on the third step of a shape raises there."""
    from torch._dynamo.utils import counters

    before = cudagraph_skips()
    require_graphs(before)  # nothing skipped: passes
    runs = itertools.count(1)
    bumped = []

    def skip_on_third_run() -> None:
        if next(runs) == 3:
            counters["inductor"]["cudagraph_skips"] += 1
            bumped.append(1)

    traced_compile.run_hook = skip_on_third_run
    engine = StaticRolloutEngine(tiny_qwen2(tok), tok, batch_size=2, compile="on")
    try:
        with pytest.raises(RuntimeError, match="skipped CUDA graphs"):
            engine.generate(prompts[:2], n=1, max_new_tokens=6, temperature=1.0, stop=[], seed=0)
    finally:
        counters["inductor"]["cudagraph_skips"] -= len(bumped)
    assert bumped and len(traced_compile.compiled) == 1  # one shape, one compilation, raised at run 3
    assert next(runs) == 4


def test_new_temperature_top_p_seed_or_length_do_not_recompile(tok, prompts, traced_compile):
    """The call's scalars are tensors in the decoding state: one compilation serves every temperature,
    top-p (1.0 included), seed and max_new_tokens of a shape bucket, and samples what eager does."""
    model = tiny_qwen2(tok, head_scale=10.0)
    engine = StaticRolloutEngine(model, tok, batch_size=4, logprobs="generate", compile="on")
    eager = StaticRolloutEngine(model, tok, batch_size=4, logprobs="generate")
    for temperature, top_p, seed, max_new in ((0.7, 0.9, 1, 5), (1.3, 0.5, 2, 6), (1.0, 1.0, 3, 8)):
        kw = dict(n=1, max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed, stop=[])
        got, want = engine.generate(prompts[:4], **kw), eager.generate(prompts[:4], **kw)
        assert torch.equal(got.response_ids, want.response_ids)
        assert torch.allclose(got.logprobs, want.logprobs, atol=1e-6, rtol=0)
    assert len(traced_compile.compiled) == 1
    assert engine.compiled_shapes == {(4, 64, 8, 4, "sampled", torch.float32)}
    engine.generate(prompts[:4], n=1, max_new_tokens=5, temperature=0.0, stop=[])  # greedy: its own shape
    assert len(traced_compile.compiled) == 2


def test_recompile_limit_raises_a_clear_error(tok, prompts, traced_compile):
    """Past torch's recompile limit the engine raises its own error naming the shapes and the ways out,
    not torch's FailOnRecompileLimitHit; each engine counts only its own compilations."""
    model = tiny_qwen2(tok)
    kw = dict(n=1, max_new_tokens=4, temperature=1.0, stop=[], seed=0)
    engine = StaticRolloutEngine(model, tok, batch_size=4, compile="on")
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the setting from torch's config module.
    with torch._dynamo.config.patch(recompile_limit=1):
        engine.generate(prompts[:2], **kw)
        engine.generate(prompts[:2], **(kw | {"temperature": 0.5, "top_p": 0.8}))  # same shape: fine
        with pytest.raises(RuntimeError, match="recompile limit") as caught:
            engine.generate(prompts[:4], **kw)  # 4 rows: a new slot bucket
        # Another engine's first shape is its own first compilation, whatever the first engine compiled.
        other = StaticRolloutEngine(model, tok, batch_size=4, compile="on")
        other.generate(prompts[:4], **kw)
    message = str(caught.value)
    assert "recompile_limit = 1" in message and "rollout_compile=off" in message
    assert "(2, 64, 4, 4, 'sampled', torch.float32)" in message  # the shape it had compiled
    assert isinstance(caught.value.__cause__, torch._dynamo.exc.FailOnRecompileLimitHit)
    assert len(traced_compile.compiled) == 2


@pytest.fixture
def cache_dtypes(monkeypatch):
    """The dtype of every SlotKVCache the static engine allocates, in order."""
    seen: list[torch.dtype] = []

    class Spy(rollout_static.SlotKVCache):
        def __init__(self, config, slots, capacity, dtype, device):
            seen.append(dtype)
            super().__init__(config, slots, capacity, dtype, device)

    monkeypatch.setattr(rollout_static, "SlotKVCache", Spy)
    return seen


def test_cache_takes_the_autocast_dtype_and_logprobs_stay_float32(tok, prompts, cache_dtypes):
    """Under autocast the KV cache is allocated in the autocast dtype (what the layers compute in), not the
    fp32 weights'; the log-probs stay float32. Greedy bf16 decoding is the model's own: the manual engine
    (dynamic cache) decodes the same tokens under the same autocast."""
    from align.rollout.manual import ManualRolloutEngine

    model = tiny_qwen2(tok, head_scale=10.0)
    engine = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate")
    kw = dict(n=1, max_new_tokens=6, temperature=0.0, stop=[])
    engine.generate(prompts, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = engine.generate(prompts, **kw)
        manual = ManualRolloutEngine(model, tok, batch_size=3, logprobs="generate").generate(prompts, **kw)
    assert cache_dtypes == [torch.float32, torch.bfloat16] and engine.cache_dtype == torch.bfloat16
    assert bf16.logprobs.dtype == torch.float32
    assert torch.equal(bf16.response_ids, manual.response_ids)
    assert torch.allclose(bf16.logprobs, manual.logprobs, atol=0.05, rtol=0)  # bf16 keys vs fp32 keys


@pytest.mark.parametrize("name", ["static", "manual", "hf"])
def test_rl_rollouts_decode_in_the_training_precision(name, tok, prompts, cache_dtypes):
    """RLRun.sample runs the engine under the accelerator's autocast. On CPU (the RL loops' fp32
    accelerator) that changes nothing: the same tokens and log-probs as the engine called alone (the old
    path), and for the static engine what the reference sampler draws. With a bf16 autocast (what the
    accelerator gives on GPU; a stand-in here) the static engine's KV cache is bf16."""
    from align.rollout.engines import engine_class

    model = tiny_qwen2(tok, head_scale=10.0)
    engine = engine_class(name)(model, tok, batch_size=3, logprobs="generate")
    cfg = SimpleNamespace(
        samples_per_query=2, max_new_tokens=6, temperature=0.7, top_p=0.9, rollout_engine=name
    )
    queries = [0, 2, 4]
    chosen = [prompts[i] for i in queries]
    fp32 = make_accelerator(GRPOConfig())
    batch = RLRun.sample(
        SimpleNamespace(cfg=cfg, engine=engine, prompt_ids=prompts, accelerator=fp32), queries, 5
    )
    alone = engine.generate(chosen, n=2, max_new_tokens=6, temperature=0.7, top_p=0.9, seed=5)
    assert torch.equal(batch.response_ids, alone.response_ids)
    assert torch.equal(batch.logprobs, alone.logprobs)
    if name != "static":
        return
    _assert_equals_reference(
        batch, _reference_rollout(model, chosen, 2, 6, 0.7, 0.9, seed=5, stop=engine.stop)
    )
    bf16 = SimpleNamespace(
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), device=torch.device("cpu")
    )
    out = RLRun.sample(
        SimpleNamespace(cfg=cfg, engine=engine, prompt_ids=prompts, accelerator=bf16), queries, 5
    )
    assert cache_dtypes == [torch.float32, torch.float32, torch.bfloat16]
    assert out.logprobs.dtype == torch.float32


def test_shape_buckets_and_options():
    assert [_bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert _bucket(10, 64) == 64
    with pytest.raises(ValueError):
        StaticRolloutEngine(tiny_qwen2(byte_tokenizer()), byte_tokenizer(), compile="sometimes")


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig, OnlineDPOConfig])
def test_every_rl_config_reaches_the_compiled_engine(cls):
    cfg = cls()
    assert cfg.rollout_compile == "auto"
    assert engine_options(cls(rollout_engine="static", rollout_compile="off")) == {"compile": "off"}
    assert engine_options(cls(rollout_engine="static")) == {"compile": "auto"}
    assert engine_options(cls(rollout_engine="hf")) == {}
    with pytest.raises(ValueError, match="rollout_engine=static"):
        engine_options(cls(rollout_engine="hf", rollout_compile="on"))


@pytest.mark.slow  # ~35-85 s of inductor compilation on 2 busy CPU cores
def test_compiled_step_on_cpu_equals_eager(tok, prompts):
    """compile='on' on CPU, with inductor: the decoding step traced whole (fullgraph, no graph break) and
    compiled once per shape bucket; sampled tokens equal the eager step's; a second call, with another
    temperature, top-p and seed, reuses the compilation; at a low recompile limit a new shape raises the
    engine's error."""
    from torch._dynamo.utils import counters

    counters.clear()  # process-wide: earlier compiled tests in the same session leave their graph breaks here
    model = tiny_qwen2(tok, head_scale=10.0)
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    eager = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate")
    engine = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate", compile="on")
    compiled = engine.generate(prompts[:4], **kw)
    want = eager.generate(prompts[:4], **kw)
    assert torch.equal(compiled.response_ids, want.response_ids)
    assert torch.allclose(compiled.logprobs, want.logprobs, atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    other = kw | dict(temperature=0.6, top_p=1.0, seed=4)
    again = engine.generate(prompts[:4], **other)
    assert torch.equal(again.response_ids, eager.generate(prompts[:4], **other).response_ids)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(RuntimeError, match="recompile limit"):
        engine.generate(prompts[:4], **(kw | {"temperature": 0.0}))  # greedy: a new shape, not compiled
