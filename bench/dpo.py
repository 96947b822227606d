"""DPO side by side: align's DPO loop step vs TRL 1.16's DPOTrainer.

    python bench/dpo.py --mode real --model qwen2.5-0.5b --device cuda
    python bench/dpo.py --mode smoke --device cpu

Both train the same randomly initialised policy (the reference is a frozen copy) on the same
length-varied pairs (prompt, chosen, rejected; completions end with EOS), ``pairs`` pairs per optimiser
step, one epoch, sigmoid loss with beta 0.1, AdamW (0.9, 0.95), clipping 1.0. TRL tokenises the text
with the synthetic word-level tokenizer, which gives exactly our ids. Ours is `align.train.dpo`'s
path: reference log-probs computed once before training (`compute_reference_logps`, its time
included in ours), then per step one padding-free packed forward of the policy over the chosen and
rejected sequences (`pair_logps`, chunked LM head) -> `dpo_loss` -> backward -> clip -> fused AdamW.
Reports pairs/s over the whole epoch (reference pass included) and peak memory.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(pairs_total=16, prompt_median=24, reply_median=24, max_length=128, pairs=4, warmup=1),
    "real": dict(pairs_total=512, prompt_median=160, reply_median=160, max_length=1024, pairs=8, warmup=3),
}


def make_pairs(mode: str, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Token ids of length-varied pairs; each side's total (prompt + reply + EOS) fits max_length."""
    s = SETTINGS[mode]
    rng = random.Random(seed)
    half = s["max_length"] // 2
    prompts = common.lengths(s["pairs_total"], s["prompt_median"], 4, half, seed)
    chosen = common.lengths(s["pairs_total"], s["reply_median"], 2, half - 1, seed + 1)
    rejected = common.lengths(s["pairs_total"], s["reply_median"], 2, half - 1, seed + 2)
    return [
        {
            "prompt": common.random_ids(p, vocab, rng),
            "chosen": common.random_ids(c, vocab, rng) + [common.EOS_ID],
            "rejected": common.random_ids(r, vocab, rng) + [common.EOS_ID],
        }
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]


def _examples(pairs: list[dict]) -> list[dict]:
    """align's DPO examples: each side's ids with labels on the reply only."""
    return [
        {
            side: {
                "input_ids": p["prompt"] + p[side],
                "labels": [-100] * len(p["prompt"]) + p[side],
            }
            for side in ("chosen", "rejected")
        }
        for p in pairs
    ]


def run_ours(args, pairs: list[dict]) -> dict:
    from align.losses import dpo_loss
    from align.train.dpo import compute_reference_logps, pair_logps

    s = SETTINGS[args.mode]
    device = torch.device(args.device)
    examples = _examples(pairs)
    policy = common.build_lm(args.shape, args.device, args.seed)
    reference = common.build_lm(args.shape, args.device, args.seed).eval().requires_grad_(False)
    optimizer = common.our_optimizer(policy)
    clock = common.StepClock(args.device)
    result: dict = {"name": "align (run_dpo step, precomputed reference)"}
    with common.peak_memory(args.device, result):
        common.sync(args.device)
        ref_clock = common.StepClock(args.device)
        ref_clock.start()
        with common.autocast(args.device):
            ref = compute_reference_logps(reference, examples, s["pairs"], device)
        ref_clock.stop(len(examples))
        policy.train()
        for i in range(0, len(examples), s["pairs"]):
            batch = examples[i : i + s["pairs"]]
            clock.start()
            with common.autocast(args.device):
                pc, pr, _, _ = pair_logps(policy, batch, device)
                rc = ref["chosen"][i : i + len(batch)].to(device)
                rr = ref["rejected"][i : i + len(batch)].to(device)
                loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.stop(len(batch))
    result.update(_rates(clock, s["warmup"], extra_seconds=ref_clock.seconds[0]))
    result["reference_pass_seconds"] = round(ref_clock.seconds[0], 4)
    result["final_loss"] = round(float(loss.detach()), 5)
    return result


def run_trl(args, pairs: list[dict]) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = SETTINGS[args.mode]
    model = common.build_lm(args.shape, args.device, args.seed, side="peer")
    reference = common.build_lm(args.shape, args.device, args.seed, side="peer")
    tokenizer = common.synthetic_tokenizer(common.MODELS[args.shape]["vocab_size"])
    # TRL appends EOS to each reply itself, so the text carries the reply without it.
    data = Dataset.from_list(
        [
            {
                "prompt": common.to_text(p["prompt"]),
                "chosen": " " + common.to_text(p["chosen"][:-1]),
                "rejected": " " + common.to_text(p["rejected"][:-1]),
            }
            for p in pairs
        ]
    )
    clock = common.StepClock(args.device)
    trainer_cls, timer = common.timed_trainer(
        DPOTrainer, clock, lambda b: float(b["input_ids"].shape[0] // 2)
    )
    config = DPOConfig(
        output_dir=str(Path(args.tmp) / "trl-dpo"),
        per_device_train_batch_size=s["pairs"],
        max_length=s["max_length"],
        beta=0.1,
        num_train_epochs=1,
        **common.peer_args(args.device),
    )
    trainer = trainer_cls(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    first = trainer.train_dataset[0]
    same_ids = first["prompt_ids"] + first["chosen_ids"] == pairs[0]["prompt"] + pairs[0]["chosen"]
    result: dict = {"name": f"TRL {__import__('trl').__version__} DPOTrainer (reference model on the fly)"}
    with common.peak_memory(args.device, result):
        out = trainer.train()
    result.update(_rates(clock, s["warmup"]))
    result["final_loss"] = round(float(out.training_loss), 5)
    result["tokenised_like_ours"] = bool(same_ids)
    return result


def _rates(clock: common.StepClock, warmup: int, extra_seconds: float = 0.0) -> dict:
    """Pairs/s for the whole epoch: the timed steps' mean rate, applied to every pair, plus any
    one-off pass (ours: the reference log-probs) in full."""
    pairs = sum(clock.work)
    epoch_seconds = pairs / clock.rate(warmup) + extra_seconds
    return {
        "pairs_per_s": round(pairs / epoch_seconds, 3),
        "pairs_processed": int(pairs),
        "epoch_seconds_est": round(epoch_seconds, 3),
        **clock.summary(warmup),
    }


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("dpo", __doc__, argv)
    pairs = make_pairs(args.mode, common.MODELS[args.shape]["vocab_size"], args.seed)
    ours, peer = common.run_sides(args, pairs, run_ours, run_trl)
    setting = {
        **SETTINGS[args.mode],
        "tokens": sum(len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for p in pairs),
        "epochs": 1,
        "precision": common.precision(args.device),
    }
    return common.compare(args, "pairs_per_s", ours, peer, setting)


if __name__ == "__main__":
    main()
