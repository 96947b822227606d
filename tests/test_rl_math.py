"""Pure RL maths on worked numbers and against independent references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.rl_math import (
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    token_logprobs,
)


def test_token_logprobs_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), ref)


def test_entropy_of_uniform_is_log_v():
    assert entropy_from_logits(torch.zeros(3, 8)).tolist() == pytest.approx([math.log(8)] * 3)


def test_kl_estimators_on_worked_numbers():
    # log pi = log 0.5, log pi_ref = log 0.25: log r = log(0.25/0.5) = -log 2, r = 0.5.
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    ln2 = math.log(2)
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(ln2)  # -log r
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)  # (log r)^2 / 2
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + ln2)  # r - 1 - log r
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(lp, ref, "k4")


def test_k1_and_k3_estimate_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[x][None], q.log()[x][None]
    assert kl_estimate(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(lp, lq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def reference_gae(rewards, values, lengths, gamma, lam):
    """A plain per-row loop, written from the definition."""
    out = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            out[b, t] = running
    return out


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    gamma=st.sampled_from([1.0, 0.99]),
    lam=st.sampled_from([0.95, 1.0, 0.0]),
    seed=st.integers(0, 1000),
)
def test_gae_matches_a_plain_loop(lengths, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    T = 7
    rewards, values = rng.normal(size=(len(lengths), T)), rng.normal(size=(len(lengths), T))
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
    expected = reference_gae(rewards * mask, values * mask, lengths, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), (expected + values) * mask, atol=1e-10)


def test_gae_worked_example():
    # One row, 2 tokens, gamma 1, lambda 0.5: r = [0, 1], V = [0.5, 0.2].
    # delta_1 = 1 + 0 - 0.2 = 0.8; A_1 = 0.8
    # delta_0 = 0 + 0.2 - 0.5 = -0.3; A_0 = -0.3 + 0.5 * 0.8 = 0.1
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([0.1, 0.8])
    assert ret.tolist()[0] == pytest.approx([0.6, 1.0])


def test_masked_statistics_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    white = masked_whiten(values, mask)
    picked = white[mask.bool()]
    assert picked.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert picked.std().item() == pytest.approx(1.0, abs=1e-4)
    assert white[~mask.bool()].abs().sum().item() == 0
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # empty: 0, not NaN


def test_explained_variance():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(target, target, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, 2.5), target, mask).item() == pytest.approx(0.0)


def test_running_moments_against_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 17, 64, 2)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(torch.tensor(batch))
    everything = np.concatenate(batches)
    assert moments.count == len(everything)
    assert moments.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert moments.std == pytest.approx(everything.std(), rel=1e-12)
    x = torch.tensor([1.0, 5.0])
    expected = (x.numpy() - everything.mean()) / everything.std()
    np.testing.assert_allclose(moments.normalise(x, use_std=True).numpy(), expected, rtol=1e-6)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()
