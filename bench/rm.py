"""Reward model side by side: align's RM loop step vs TRL 1.16's RewardTrainer.

    python bench/rm.py --mode real --model qwen2.5-0.5b --device cuda
    python bench/rm.py --mode smoke --device cpu

Both train the same randomly initialised backbone with a scalar head on the same length-varied
pairs (each sequence closed by ``<|im_end|>``, where align reads the reward; TRL reads it at the last
non-pad token, the same position), ``pairs`` pairs per optimiser step, one epoch, Bradley-Terry loss,
AdamW (0.9, 0.95), clipping 1.0. Ours is `align.train.reward`'s packed path: `pack_pairs` (one
padding-free row) -> `RewardModel` -> `pairwise_reward_loss` -> backward -> clip -> fused AdamW.
TRL pads each micro-batch to its longest sequence. Reports pairs/s and peak memory.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(pairs_total=16, median=40, max_length=128, pairs=4, warmup=1),
    "real": dict(pairs_total=512, median=320, max_length=1024, pairs=8, warmup=3),
}


def make_pairs(mode: str, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """A shared prompt and two replies per pair; each sequence ends with <|im_end|>."""
    s = SETTINGS[mode]
    rng = random.Random(seed)
    n = s["pairs_total"]
    prompts = common.lengths(n, s["median"] // 2, 4, s["max_length"] // 2, seed)
    replies = common.lengths(2 * n, s["median"] // 2, 2, s["max_length"] // 2 - 1, seed + 1)
    out = []
    for i, p in enumerate(prompts):
        prompt = common.random_ids(p, vocab, rng)
        out.append(
            {
                side: prompt + common.random_ids(replies[2 * i + k], vocab, rng) + [common.IM_END_ID]
                for k, side in enumerate(("chosen_ids", "rejected_ids"))
            }
        )
    return out


def run_ours(args, pairs: list[dict]) -> dict:
    from transformers import Qwen2Model

    from align.losses import pairwise_reward_loss
    from align.reward import RewardConfig, RewardModel, pack_pairs

    s = SETTINGS[args.mode]
    torch.manual_seed(args.seed)
    config = common.model_config(args.shape, args.device)
    model = RewardModel(Qwen2Model(config), RewardConfig(end_token_id=common.IM_END_ID)).to(args.device)
    model.train()
    optimizer = common.our_optimizer(model)
    clock = common.StepClock(args.device)
    result: dict = {"name": "align (train_reward_model step, packed pairs)"}
    with common.peak_memory(args.device, result):
        for i in range(0, len(pairs), s["pairs"]):
            chunk = pairs[i : i + s["pairs"]]
            clock.start()
            batch = pack_pairs(chunk, args.device)
            with common.autocast(args.device):
                rewards = model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    end_index=batch["end_index"],
                ).rewards
                loss, _ = pairwise_reward_loss(rewards[0::2], rewards[1::2])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.stop(len(chunk))
    result.update(_rates(clock, s["warmup"]))
    result["final_loss"] = round(float(loss.detach()), 5)
    return result


def run_trl(args, pairs: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import Qwen2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    s = SETTINGS[args.mode]
    torch.manual_seed(args.seed)
    config = common.model_config(args.shape, args.device, side="peer")
    config.num_labels = 1
    model = Qwen2ForSequenceClassification(config).to(args.device)
    tokenizer = common.synthetic_tokenizer(common.MODELS[args.shape]["vocab_size"])
    clock = common.StepClock(args.device)
    trainer_cls, timer = common.timed_trainer(
        RewardTrainer, clock, lambda b: float(b["input_ids"].shape[0] // 2)
    )
    cfg = RewardConfig(
        output_dir=str(Path(args.tmp) / "trl-rm"),
        per_device_train_batch_size=s["pairs"],
        max_length=s["max_length"],
        num_train_epochs=1,
        **common.peer_args(args.device),
    )
    trainer = trainer_cls(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    result: dict = {"name": f"TRL {__import__('trl').__version__} RewardTrainer (padded batches)"}
    with common.peak_memory(args.device, result):
        out = trainer.train()
    result.update(_rates(clock, s["warmup"]))
    result["final_loss"] = round(float(out.training_loss), 5)
    return result


def _rates(clock: common.StepClock, warmup: int) -> dict:
    return {
        "pairs_per_s": round(clock.rate(warmup), 3),
        "pairs_processed": int(sum(clock.work)),
        **clock.summary(warmup),
    }


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("rm", __doc__, argv)
    pairs = make_pairs(args.mode, common.MODELS[args.shape]["vocab_size"], args.seed)
    ours, peer = common.run_sides(args, pairs, run_ours, run_trl)
    setting = {
        **SETTINGS[args.mode],
        "tokens": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs),
        "epochs": 1,
        "precision": common.precision(args.device),
    }
    return common.compare(args, "pairs_per_s", ours, peer, setting)


if __name__ == "__main__":
    main()
