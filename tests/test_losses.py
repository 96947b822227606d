"""Loss functions on worked numbers."""

import math

import pytest
import torch

from align.losses import dpo_loss, ppo_policy_loss, ppo_value_loss, sft_loss


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
