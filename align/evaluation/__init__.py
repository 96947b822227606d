"""Measuring policies and reward models.

Public entry points: `policy.compare_policies` (gold accuracy with a paired test, win rates by an RM, KL,
alignment tax; `eval/policy.py`), `reward_model.evaluate_pairs` (pairwise RM accuracy; `eval/rm_accuracy.py`),
and `generation` (batched generation for them). The best-of-n gate, which samples and scores with the RL
score phase, is `align.pipeline.best_of_n`. Import them from their modules: this package imports nothing itself, so a light module can use
one of them without loading the others.
"""
