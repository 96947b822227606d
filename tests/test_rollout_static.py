"""StaticRolloutEngine's decoding step (the function CUDA graphs capture), run eager and compiled on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_qwen2

from align.config import GRPOConfig, OnlineDPOConfig, PPOConfig
from align.rollout import HFRolloutEngine
from align.rollout_engines import engine_options
from align.rollout_static import StaticRolloutEngine, _bucket, cudagraph_skips, require_graphs
from align.sampling import counter_token_keys, counter_uniforms, sample_tokens

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


def test_the_compiled_steps_sampler_pieces_equal_the_eager_ones():
    """Inside the graph the seed is a tensor and top-p sorts the whole vocabulary (k = V, no host sync):
    the same uniforms and the same nucleus as the int seed and the top-k search."""
    rows, steps = torch.tensor([0, 5, 9]), torch.tensor([0, 2, 7])
    keys = counter_token_keys(300, "cpu")
    u_int = counter_uniforms(1234, rows, steps, keys)
    assert torch.equal(counter_uniforms(torch.tensor(1234), rows, steps, keys), u_int)
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 4
    eager = sample_tokens(logits, 0.8, 0.9, uniforms=u_int)
    full_sort = sample_tokens(logits, 0.8, 0.9, uniforms=u_int, initial_k=1 << 62)
    assert torch.equal(eager[0], full_sort[0]) and torch.equal(eager[1], full_sort[1])


def test_skipped_graphs_fail_loudly():
    from torch._dynamo.utils import counters

    before = cudagraph_skips()
    require_graphs(before)  # nothing skipped: passes
    counters["inductor"]["cudagraph_skips"] += 1
    try:
        with pytest.raises(RuntimeError, match="skipped CUDA graphs"):
            require_graphs(before)
    finally:
        counters["inductor"]["cudagraph_skips"] -= 1


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


@pytest.mark.slow  # ~85 s of inductor compilation on 2 CPU cores
def test_compiled_step_on_cpu_equals_eager(tok, prompts):
    """compile='on' on CPU: the decoding step traced whole (fullgraph, no graph break) and compiled once
    per shape bucket; sampled tokens equal the eager step's, and a second call reuses the compilation."""
    from torch._dynamo.utils import counters

    counters.clear()  # process-wide: earlier compiled tests in the same session leave their graph breaks here
    model = tiny_qwen2(tok, head_scale=10.0)
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    eager = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate").generate(prompts[:4], **kw)
    engine = StaticRolloutEngine(model, tok, batch_size=3, logprobs="generate", compile="on")
    compiled = engine.generate(prompts[:4], **kw)
    assert torch.equal(compiled.response_ids, eager.response_ids)
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    again = engine.generate(prompts[:4], **kw)
    assert torch.equal(again.response_ids, eager.response_ids)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
