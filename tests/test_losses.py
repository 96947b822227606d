"""Loss functions on worked numbers."""

import math

import pytest
import torch

from align.losses import (
    dpo_loss,
    ensemble_pairwise_loss,
    grouped_pairwise_loss,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)


def test_sft_loss_sums_then_divides_by_the_global_count():
    logits = torch.zeros(2, 4)  # uniform: each token costs log 4
    loss, stats = sft_loss(logits, torch.tensor([0, 3]), normalizer=8)
    assert loss.item() == pytest.approx(2 * math.log(4) / 8)
    assert stats["tokens"].item() == 2


def test_ppo_first_epoch_ratio_is_one_and_nothing_is_clipped():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(lp, lp.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0 and stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)  # -mean(A) over the two real tokens


def test_ppo_policy_clipping_worked_example():
    # ratio = e^{0.5} = 1.6487 for both tokens, eps = 0.2.
    # token 0, A = +1: unclipped -1.6487, clipped -1.2 -> max = -1.2 (clipped branch active).
    # token 1, A = -1: unclipped +1.6487, clipped +1.2 -> max = +1.6487 (unclipped).
    lp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.5, -0.5]])
    loss, stats = ppo_policy_loss(lp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + math.exp(0.5)) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # No gradient through the clipped token; d/dlp of ratio * (-A) / 2 = e^{0.5} / 2 on token 1.
    assert lp.grad.tolist()[0] == pytest.approx([0.0, math.exp(0.5) / 2])


def test_value_loss_clipping_worked_example():
    # old V = 0, new V = 0.5, return R = 1, clip 0.15:
    # unclipped error (0.5 - 1)^2 = 0.25; clipped V = 0.15, error (0.15 - 1)^2 = 0.7225 -> 0.5 * 0.7225.
    v = torch.tensor([[0.5, 0.1]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 0.2]])
    # token 1: V = 0.1 within the clip range: errors equal (0.01), not counted as clipped.
    loss, stats = ppo_value_loss(v, old, ret, torch.ones(1, 2), value_clip=0.15)
    assert loss.item() == pytest.approx(0.5 * (0.7225 + 0.01) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    unclipped, _ = ppo_value_loss(v, old, ret, torch.ones(1, 2), value_clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 0.01) / 2)


def _dpo(loss_type, ls=0.0, beta=0.5):
    # chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1 -> h = 2, beta * h = 1.
    return dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=ls,
    )


def test_dpo_losses_on_worked_numbers():
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    loss, stats = _dpo("sigmoid")
    assert loss.item() == pytest.approx(-logsig(1.0))  # 0.31326
    assert stats["chosen_rewards"].item() == pytest.approx(0.5)
    assert stats["rejected_rewards"].item() == pytest.approx(-0.5)
    assert stats["margins"].item() == pytest.approx(1.0) and stats["accuracy"].item() == 1.0
    assert _dpo("sigmoid", ls=0.1)[0].item() == pytest.approx(-0.9 * logsig(1.0) - 0.1 * logsig(-1.0))
    assert _dpo("robust", ls=0.1)[0].item() == pytest.approx((-0.9 * logsig(1.0) + 0.1 * logsig(-1.0)) / 0.8)
    assert _dpo("hinge")[0].item() == pytest.approx(0.0)  # max(0, 1 - 1)
    assert _dpo("hinge", beta=0.25)[0].item() == pytest.approx(0.5)  # max(0, 1 - 0.5)
    assert _dpo("ipo")[0].item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # (2 - 1)^2
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        _dpo("kto")


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _grouped_example():
    # Group 7: responses a, b, c scored 2, 0, 1; comparisons a>b (diff 2), a>c (1), c>b (1).
    # Group 9: responses d, e scored 0, 1; comparison d>e (diff -1, wrong).
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0, 1.0], requires_grad=True)
    chosen = torch.tensor([0, 0, 2, 3])
    rejected = torch.tensor([1, 2, 1, 4])
    group = torch.tensor([7, 7, 7, 9])
    return scores, chosen, rejected, group


def test_grouped_pairwise_loss_worked_example():
    scores, chosen, rejected, group = _grouped_example()
    loss, stats = grouped_pairwise_loss(scores, chosen, rejected, group)
    nls = lambda d: math.log1p(math.exp(-d))  # noqa: E731  -log sigmoid(d)
    group_7 = (nls(2) + 2 * nls(1)) / 3  # (0.126928 + 2 x 0.313262) / 3 = 0.251151
    group_9 = nls(-1)  # 1.313262
    assert loss.item() == pytest.approx((group_7 + group_9) / 2)  # each prompt counts once: 0.782206
    assert loss.item() == pytest.approx(0.782206, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(0.5)  # group 7 all right, group 9 wrong
    assert (stats["pairs"].item(), stats["correct_pairs"].item()) == (4, 3)
    assert (stats["groups"].item(), stats["responses"].item()) == (2, 5)
    assert stats["margin"].item() == pytest.approx((4 / 3 - 1) / 2)
    loss.backward()
    # d/dr_c of -log s(r_c - r_r) = -s(-(r_c - r_r)); group 7 terms weigh 1/3, group 9's 1, then / 2 groups.
    a = -(_sig(-2) + _sig(-1)) / 6  # a is chosen twice
    assert scores.grad.tolist() == pytest.approx([a, -a, 0.0, -_sig(1) / 2, _sig(1) / 2])
    # c: chosen once and rejected once at the same difference, so its gradients cancel.


def test_grouped_loss_with_one_pair_per_group_is_the_pairwise_loss_exactly():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    margin = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0, 0.25])
    scores = torch.stack([chosen, rejected], dim=1).reshape(-1)  # c1, r1, c2, r2, ...
    idx = torch.arange(6)
    for kw in (dict(), dict(margin=margin, center_coef=0.01, normalizer=16)):
        got, got_stats = grouped_pairwise_loss(scores, 2 * idx, 2 * idx + 1, idx * 3 + 1, **kw)
        want, want_stats = pairwise_reward_loss(chosen, rejected, **kw)
        assert torch.equal(got, want)
        for key in ("loss_sum", "center_sum", "correct", "ties", "margin_sum", "pairs", "accuracy", "margin"):
            assert torch.equal(got_stats[key], want_stats[key]), key


def _scorer() -> torch.nn.Linear:
    model = torch.nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -0.5, 0.1, 0.1, 0.1]]))
        model.bias.zero_()
    return model


def test_scoring_each_distinct_response_once_gives_the_per_pair_loss_and_gradients():
    # Three prompts with 4, 2 and 3 distinct responses; every score comes from one small model.
    features = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    group_of_response = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    comparisons = [(0, 1), (0, 2), (3, 1), (3, 2), (0, 3), (4, 5), (6, 7), (6, 8), (8, 7)]
    group = torch.tensor([group_of_response[c] for c, _ in comparisons])
    margin = torch.linspace(0, 0.8, len(comparisons))
    n = len(comparisons)

    def loss_and_grads(per_pair: bool):
        model = _scorer()
        if per_pair:  # every pair scores both of its responses again, duplicates included
            x = torch.stack([features[i] for pair in comparisons for i in pair])
            ci, ri = torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)
        else:  # 9 scores instead of 18
            x = features
            ci, ri = torch.tensor([c for c, _ in comparisons]), torch.tensor([r for _, r in comparisons])
        loss, _ = grouped_pairwise_loss(model(x).squeeze(-1), ci, ri, group, margin, center_coef=0.1)
        loss.backward()
        return loss.detach(), model.weight.grad, model.bias.grad

    once, again = loss_and_grads(per_pair=False), loss_and_grads(per_pair=True)
    for a, b in zip(once, again, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # ... and it is the mean over prompts of the existing pairwise loss of each prompt's pairs.
    with torch.no_grad():
        scores = _scorer()(features).squeeze(-1)
    per_prompt = []
    for g in range(3):
        sel = [k for k in range(n) if group[k] == g]
        c, r = scores[[comparisons[k][0] for k in sel]], scores[[comparisons[k][1] for k in sel]]
        per_prompt.append(pairwise_reward_loss(c, r, margin[sel], center_coef=0.1)[0])
    assert once[0].item() == pytest.approx(torch.stack(per_prompt).mean().item(), abs=1e-6)


def test_grouped_loss_splits_over_micro_batches_by_group_and_ignores_repeated_comparisons():
    scores, chosen, rejected, group = _grouped_example()
    whole, _ = grouped_pairwise_loss(scores, chosen, rejected, group)
    # The two groups in two micro-batches, each divided by the global group count (2): the same sum.
    first, _ = grouped_pairwise_loss(scores, chosen[:3], rejected[:3], group[:3], normalizer=2)
    second, _ = grouped_pairwise_loss(scores, chosen[3:], rejected[3:], group[3:], normalizer=2)
    assert (first + second).item() == pytest.approx(whole.item(), abs=1e-7)
    # Listing group 7's comparisons twice changes nothing: a prompt counts once, whatever its pair count.
    twice = [0, 1, 2, 0, 1, 2, 3]
    again, stats = grouped_pairwise_loss(scores, chosen[twice], rejected[twice], group[twice])
    assert again.item() == pytest.approx(whole.item(), abs=1e-7)
    assert stats["pairs"].item() == 7 and stats["accuracy"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"of one shape \(P,\)"):
        grouped_pairwise_loss(scores, chosen, rejected[:2], group)


# --------------------------------------------------------------------------------------------------
# K reward heads, each on its own (bootstrap) weighting of the pairs


def _ensemble_example():
    # 2 pairs x 2 heads: margins r_c - r_r = [[1, 0], [-1, 2]]; head 0 draws pair 0 twice and pair 1 once,
    # head 1 never draws pair 0.
    chosen = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    rejected = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    weights = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    return chosen, rejected, weights


def test_ensemble_pairwise_loss_worked_example():
    chosen, rejected, weights = _ensemble_example()
    loss, stats = ensemble_pairwise_loss(chosen, rejected, weights)
    nls = lambda d: math.log1p(math.exp(-d))  # noqa: E731  -log sigmoid(d)
    head_0 = (2 * nls(1) + nls(-1)) / 3  # (2 x 0.313262 + 1.313262) / 3 = 0.646595
    head_1 = nls(2) / 1  # 0.126928: pair 0 (weight 0) is not in head 1's loss
    assert loss.item() == pytest.approx((head_0 + head_1) / 2)
    assert loss.item() == pytest.approx(0.386762, abs=1e-6)
    assert stats["loss_sum"].tolist() == pytest.approx([2 * nls(1) + nls(-1), nls(2)])
    assert stats["weight_sum"].tolist() == [3.0, 1.0]
    # head 0: pair 0 right (weight 2), pair 1 wrong; head 1: pair 1 right (pair 0 a tie, weight 0)
    assert stats["correct"].tolist() == [2.0, 1.0]
    # population std over the two heads of each pair's margin: |1 - 0| / 2 and |-1 - 2| / 2
    assert stats["disagreement_sum"].item() == pytest.approx(0.5 + 1.5)
    assert stats["pairs"].item() == 2
    loss.backward()
    # d/dr_c[p, k] = (1 / K) w[p, k] / W_k x -s(-(r_c - r_r)); no gradient where a head did not draw the pair.
    assert chosen.grad.tolist() == [
        pytest.approx([-_sig(-1) / 3, 0.0]),
        pytest.approx([-_sig(1) / 6, -_sig(-2) / 2]),
    ]


def test_ensemble_loss_divides_by_the_global_weights_so_micro_batches_add_up():
    chosen, rejected, weights = _ensemble_example()
    whole, _ = ensemble_pairwise_loss(chosen, rejected, weights)
    # One pair per micro-batch, each divided by the global batch's weight sum per head ([3, 1]).
    parts = [
        ensemble_pairwise_loss(
            chosen[p : p + 1], rejected[p : p + 1], weights[p : p + 1], normalizer=[3.0, 1.0]
        )
        for p in (0, 1)
    ]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(whole.item(), abs=1e-7)
    # Pair 0 alone: head 1 drew nothing (W = 0 in its own normalizer): it adds 0, not NaN.
    alone, _ = ensemble_pairwise_loss(chosen[:1], rejected[:1], weights[:1])
    assert alone.item() == pytest.approx(math.log1p(math.exp(-1)) / 2)
    with pytest.raises(ValueError, match="weights"):
        ensemble_pairwise_loss(chosen, rejected, weights[:1])


def test_ensemble_loss_with_one_head_and_unit_weights_is_the_pairwise_loss_exactly():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    margin = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0, 0.25])
    for kw in (dict(), dict(margin=margin, center_coef=0.01, normalizer=16)):
        c1, c2 = chosen.clone().requires_grad_(), chosen.clone().requires_grad_()
        got, got_stats = ensemble_pairwise_loss(c1[:, None], rejected[:, None], torch.ones(6, 1), **kw)
        want, want_stats = pairwise_reward_loss(c2, rejected, **kw)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        assert torch.equal(c1.grad, c2.grad)
        for key in ("loss_sum", "center_sum", "correct"):
            assert torch.equal(got_stats[key][0], want_stats[key]), key
        assert got_stats["disagreement_sum"].item() == 0.0  # one head agrees with itself
