"""The chain of stages: SFT -> PMP -> RM -> PPO and SFT -> DPO (`run.run_pipeline`, its directory `layout`
and `report`), ablation sweeps (`ablate`), rejection-sampled preference data (`sample_pairs`), and the best-of-n gate
before PPO (`best_of_n`).

Import from the modules: this package imports nothing itself.
"""
