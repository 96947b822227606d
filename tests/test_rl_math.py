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


# --- reward shaping (issue #13) ------------------------------------------------------------------

from align.rl_math import (  # noqa: E402
    closed_responses,
    group_scores,
    grpo_kl_term,
    shape_scores,
    token_rewards,
)


def test_a_response_that_stopped_on_another_id_is_not_closed_for_the_rm():
    # Row 1 stopped on the tokenizer's eos: finished, but the RM (pooling at <|im_end|>) did not find its
    # end token and returned its -10 placeholder. PPO used to gate on `finished` alone.
    finished = torch.tensor([True, True, False])
    found = torch.tensor([True, False, False])
    assert closed_responses(finished, found).tolist() == [True, False, False]
    assert closed_responses(finished, None).tolist() == [True, True, False]


def test_unclosed_responses_rank_below_every_closed_one_when_the_rm_spread_exceeds_one():
    # RM spread 3: a closed bad answer is 2 std (6 raw) below the mean. The old rule gave an unclosed row
    # `penalty` = -1 on centred, unscaled scores: -1 > -6, so never closing paid.
    raw = torch.tensor([4.0, -6.0, 0.0, -10.0])  # row 3: the RM's placeholder for an unreadable response
    closed = torch.tensor([True, True, False, False])
    out = shape_scores(raw, closed, mean=0.0, std=3.0, use_std=False, missing_eos_penalty=-1.0)
    # closed rows: raw - mean; unclosed: worst closed (-6) - 1 x std (3) = -9, the placeholder ignored.
    torch.testing.assert_close(out, torch.tensor([4.0, -6.0, -9.0, -9.0]))
    scaled = shape_scores(raw, closed, mean=0.0, std=3.0, use_std=True, missing_eos_penalty=-1.0)
    torch.testing.assert_close(scaled, torch.tensor([4 / 3, -2.0, -3.0, -3.0]))
    # When every closed score is above the mean, the penalty is counted from the mean (0), not from them.
    good = shape_scores(torch.tensor([5.0, 7.0, 0.0]), torch.tensor([True, True, False]), 1.0, 2.0,
                        use_std=False, missing_eos_penalty=-0.5)  # fmt: skip
    torch.testing.assert_close(good, torch.tensor([4.0, 6.0, -1.0]))
    # No penalty: an unclosed row the scorer could read keeps its score (row 2, a rule-based reward reads
    # any text); one it could not (row 3, the RM's -10 placeholder) carries no signal (the running mean).
    readable = torch.tensor([True, True, True, False])
    none = shape_scores(raw, closed, 1.0, 3.0, use_std=False, missing_eos_penalty=None, readable=readable)
    torch.testing.assert_close(none, torch.tensor([3.0, -7.0, -1.0, 0.0]))


class _GatherOf:
    """What `ppo_scores` needs of an accelerator: `gather` (other ranks' rows around ours) and our rank."""

    def __init__(self, process_index: int = 0, others: dict[int, torch.Tensor] | None = None):
        self.process_index = process_index
        self.others = others or {}  # gathered tensors by id: what the other rank contributes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        other = self.others.get(id(tensor))
        if other is None:
            return tensor
        parts = [other, tensor] if self.process_index == 1 else [tensor, other]
        return torch.cat(parts)


def test_ppo_scores_normalise_by_closed_scores_only_and_rank_unclosed_below():
    """`ppo_scores` itself: the running mean sees the closed scores (never the RM's -10 placeholders), then
    unclosed rows score the worst closed one minus |penalty| x std, for either sign of the penalty."""
    from types import SimpleNamespace

    from align.train.ppo import ppo_scores

    raw = torch.tensor([4.0, 0.0, -10.0, -10.0])
    found = torch.tensor([True, True, False, False])
    closed = closed_responses(torch.tensor([True, True, True, False]), found)
    for penalty in (-1.0, 1.0):
        cfg = SimpleNamespace(missing_eos_penalty=penalty, reward_norm="running_mean")
        moments = RunningMoments()
        shaped = ppo_scores(cfg, moments, raw, closed, found, _GatherOf())
        # mean 2, std 2 over [4, 0] (with the placeholders the mean would be -4).
        assert moments.mean == pytest.approx(2.0) and moments.std == pytest.approx(2.0)
        # closed: raw - 2 = [2, -2]; unclosed: min(-2, 0) - 1 x 2 = -4.
        torch.testing.assert_close(shaped, torch.tensor([2.0, -2.0, -4.0, -4.0]))
    # No penalty: every readable score feeds the mean; the unreadable placeholder scores the mean (0).
    cfg = SimpleNamespace(missing_eos_penalty=None, reward_norm="running_mean")
    readable = torch.tensor([True, True, True, False])
    moments = RunningMoments()
    shaped = ppo_scores(cfg, moments, torch.tensor([4.0, 0.0, -1.0, -10.0]), closed, readable, _GatherOf())
    assert moments.mean == pytest.approx(1.0)
    torch.testing.assert_close(shaped, torch.tensor([3.0, -1.0, -2.0, 0.0]))


def test_ppo_scores_use_every_rank_statistics_and_return_this_rank_rows():
    from types import SimpleNamespace

    from align.train.ppo import ppo_scores

    cfg = SimpleNamespace(missing_eos_penalty=-1.0, reward_norm="running_mean_std")
    raw, closed, readable = (
        torch.tensor([6.0, -10.0]),
        torch.tensor([True, False]),
        torch.tensor([True, False]),
    )
    # Rank 0 holds [2, 4], both closed; this is rank 1.
    others = {id(raw): torch.tensor([2.0, 4.0]), id(closed): torch.tensor([True, True])}
    others[id(readable)] = torch.tensor([True, True])
    moments = RunningMoments()
    shaped = ppo_scores(cfg, moments, raw, closed, readable, _GatherOf(1, others))
    # All ranks' closed scores [2, 4, 6]: mean 4, std sqrt(8/3); rank 1's rows are the last two.
    std = math.sqrt(8 / 3)
    assert moments.mean == pytest.approx(4.0) and moments.std == pytest.approx(std)
    worst = (2.0 - 4.0) / std
    torch.testing.assert_close(shaped, torch.tensor([(6.0 - 4.0) / std, worst - 1.0]))


def test_token_rewards_put_the_score_on_the_last_token_and_charge_kl_everywhere():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # k1 = logprobs - ref: row 0 [0.5, -1, 0], row 1 [-0.5] then padding.
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.05 - 1.0, 0.0, 0.0]]))


def test_grpo_kl_term_is_k3_token_mean_and_pulls_towards_the_reference():
    logprobs = torch.tensor([[-0.5, -1.0], [-2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, kl = grpo_kl_term(logprobs, ref, mask, kl_coef=0.5, n_tokens=3)
    k3 = [math.expm1(-0.5) + 0.5, 0.0, math.expm1(1.0) - 1.0]  # (r - 1) - log r, log r = ref - logp
    torch.testing.assert_close(kl, torch.tensor([[k3[0], 0.0], [k3[2], 0.0]]))
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 3)
    loss.backward()
    # d/dlogp k3 = 1 - r: positive where the policy put more mass than the reference (push it down).
    assert logprobs.grad[0, 0] > 0 and logprobs.grad[1, 0] < 0 and logprobs.grad[1, 1] == 0


def test_group_scores_put_unclosed_responses_below_the_group():
    raw = torch.tensor([1.0, 0.0, -10.0, 0.5])
    closed = torch.tensor([True, True, False, False])
    torch.testing.assert_close(group_scores(raw, closed, -0.5), torch.tensor([1.0, 0.0, -0.5, -0.5]))
    torch.testing.assert_close(group_scores(raw, closed, None), raw)


@pytest.mark.parametrize("penalty", [-0.5, 0.5], ids=["negative", "positive"])
def test_unclosed_rows_score_below_zero_when_every_closed_score_is_positive(penalty):
    """The `clamp(max=0)` and the sign: with closed scores [1, 2] an unclosed row scores 0 - 0.5 (not the
    worst closed 1 - 0.5, nor 0 + 0.5), whichever sign the config gives the penalty (the committed GRPO
    config uses +0.5)."""
    raw = torch.tensor([1.0, 2.0, -10.0])
    closed = torch.tensor([True, True, False])
    torch.testing.assert_close(group_scores(raw, closed, penalty), torch.tensor([1.0, 2.0, -0.5]))
    # shape_scores with mean 1, std 2: centred closed scores [4, 6], the worst clamps to 0, so unclosed
    # scores 0 - 0.5 x 2 = -1 (the penalty is in units of the spread); scaled: [2, 3] and 0 - 0.5.
    raw = torch.tensor([5.0, 7.0, 0.0])
    out = shape_scores(raw, closed, 1.0, 2.0, use_std=False, missing_eos_penalty=penalty)
    torch.testing.assert_close(out, torch.tensor([4.0, 6.0, -1.0]))
    out = shape_scores(raw, closed, 1.0, 2.0, use_std=True, missing_eos_penalty=penalty)
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, -0.5]))


def test_reference_anchored_reward_on_worked_numbers():
    from align.rl_math import reference_anchored_reward

    # The exploited 2.71 against a reference answer at 1.2: sigmoid(1.51) = 0.8191; equal scores give 0.5.
    scores = torch.tensor([2.71, 1.2, -0.8])
    ref = torch.tensor([1.2, 1.2, 1.2])
    want = torch.tensor([1 / (1 + math.exp(-1.51)), 0.5, 1 / (1 + math.exp(2.0))])
    torch.testing.assert_close(reference_anchored_reward(scores, ref), want)
    # Several references per prompt: the mean of the sigmoids, not the sigmoid of the mean.
    refs = torch.tensor([[0.0, 2.0]])
    got = reference_anchored_reward(torch.tensor([1.0]), refs)
    assert got.item() == pytest.approx((1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(1))) / 2)


def test_clip_rewards():
    from align.rl_math import clip_rewards

    scores = torch.tensor([-7.0, 0.5, 12.0])
    torch.testing.assert_close(clip_rewards(scores, 5.0), torch.tensor([-5.0, 0.5, 5.0]))
    torch.testing.assert_close(clip_rewards(scores, None), scores)
    with pytest.raises(ValueError, match="positive"):
        clip_rewards(scores, 0.0)


def test_ensemble_reward_objectives_on_worked_numbers():
    from align.rl_math import ensemble_reward

    members = torch.tensor([[1.0, 3.0], [2.0, 2.0], [-1.0, 5.0]])  # 3 responses x 2 heads
    torch.testing.assert_close(ensemble_reward(members, "mean"), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(ensemble_reward(members, "min"), torch.tensor([1.0, 2.0, -1.0]))
    # Population std over the heads: 1, 0, 3; with penalty 0.5 the disputed response loses most.
    torch.testing.assert_close(ensemble_reward(members, "uncertainty", 0.5), torch.tensor([1.5, 2.0, 0.5]))
    with pytest.raises(ValueError, match="objective"):
        ensemble_reward(members, "max")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        ensemble_reward(torch.ones(3), "mean")


def test_adaptive_kl_controller_on_worked_numbers():
    from align.rl_math import AdaptiveKLController

    ctl = AdaptiveKLController(0.04, target=1.0, horizon=100)
    # KL 1.5 (50% over target) is clipped to +20%, scaled by 10/100 steps: x1.02.
    assert ctl.update(1.5, steps=10) == pytest.approx(0.04 * 1.02)
    # KL 0.9 (10% under): x(1 - 0.1 x 10/100) = x0.99.
    assert ctl.update(0.9, steps=10) == pytest.approx(0.04 * 1.02 * 0.99)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(0.04, target=0.0, horizon=10)
