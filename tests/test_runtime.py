"""Batch plans, data order and learning-rate schedules, on worked numbers."""

import math

import pytest
import torch

from align.config import SFTConfig
from align.train.batching import BatchPlan, epoch_permutation, global_batch_indices
from align.train.optimization import build_optimizer, build_scheduler, lr_factor
from align.train.process import RunSetupError, prepare_output_dir


def test_batch_plan_derives_accumulation():
    plan = BatchPlan(batch_size=128, micro_batch_size=4, num_processes=8)
    assert plan.accumulation_steps == 4
    assert plan.per_process == 16
    assert plan.local_micro_batches(list(range(128)), rank=1) == [
        [16, 17, 18, 19],
        [20, 21, 22, 23],
        [24, 25, 26, 27],
        [28, 29, 30, 31],
    ]


def test_batch_plan_refuses_sizes_that_do_not_divide():
    with pytest.raises(RunSetupError, match=r"batch_size=10 is not divisible by micro_batch_size=4 x 1"):
        BatchPlan(batch_size=10, micro_batch_size=4, num_processes=1)


def test_data_order_depends_only_on_seed_and_epoch():
    assert epoch_permutation(10, seed=1, epoch=0) == epoch_permutation(10, seed=1, epoch=0)
    assert epoch_permutation(10, seed=1, epoch=0) != epoch_permutation(10, seed=1, epoch=1)
    # 10 items, batch 4: two steps per epoch; step 2 is the first batch of epoch 1.
    assert global_batch_indices(2, 10, 4, seed=1) == epoch_permutation(10, 1, 1)[:4]
    seen = global_batch_indices(0, 10, 4, seed=1) + global_batch_indices(1, 10, 4, seed=1)
    assert len(set(seen)) == 8


def test_lr_schedules_on_worked_numbers():
    # Warm-up: step 0 -> 1/4, step 3 -> 1.
    assert lr_factor(0, warmup_steps=4, total=14, shape="cosine", min_ratio=0.1) == 0.25
    assert lr_factor(3, warmup_steps=4, total=14, shape="cosine", min_ratio=0.1) == 1.0
    # Cosine halfway through the 10 decay steps: 0.1 + 0.9 * 0.5 = 0.55.
    assert lr_factor(9, warmup_steps=4, total=14, shape="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(14, warmup_steps=4, total=14, shape="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, warmup_steps=4, total=14, shape="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(1000, warmup_steps=1430, total=4000, shape="constant", min_ratio=0.0) == pytest.approx(
        1001 / 1430
    )
    assert lr_factor(2000, warmup_steps=1430, total=4000, shape="constant", min_ratio=0.0) == 1.0


def test_scheduler_follows_lr_factor():
    model = torch.nn.Linear(2, 2)
    cfg = SFTConfig(learning_rate=1e-3, warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    expected = [1e-3 * lr_factor(s, warmup_steps=2, total=6, shape="cosine", min_ratio=0.0) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_weight_decay_spares_biases():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, SFTConfig(weight_decay=0.1))
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(2, 3): 0.1, (2,): 0.0}


def test_output_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunSetupError, match="already holds files that align did not write"):
        prepare_output_dir(tmp_path, overwrite=False, is_main=True, stage="sft")
    prepare_output_dir(tmp_path, overwrite=True, is_main=True, stage="sft")
    prepare_output_dir(tmp_path, overwrite=False, is_main=True, stage="sft")  # ours now: accepted
