"""SFT side by side: align's packed loop step vs TRL 1.16's SFTTrainer with packing (padding-free).

    python bench/sft.py --mode real --model qwen2.5-0.5b --device cuda
    python bench/sft.py --mode smoke --device cpu

Both train the same randomly initialised model on the same length-varied conversations (prompt tokens
untrained, completion tokens trained), packed into rows of ``max_length`` tokens, ``rows`` rows per
optimiser step, one epoch, AdamW (0.9, 0.95), clipping 1.0; bf16 autocast over fp32 weights on GPU.
Ours is the step of `align.train.sft.run_sft`: `packed_row` -> `lm_logprobs` (chunked LM head) ->
`sft_loss_from_logprobs` -> backward -> clip -> fused AdamW. Reports real (non-padding) tokens/s,
peak memory and, on a GPU, MFU.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(docs=24, median=40, min_len=8, max_length=256, rows=2, warmup=1),
    "real": dict(docs=1200, median=384, min_len=32, max_length=2048, rows=8, warmup=3),
}


def make_examples(mode: str, vocab: int, seed: int) -> list[dict]:
    """Length-varied conversations: the first ~30% of each (system + user turn) untrained."""
    s = SETTINGS[mode]
    rng = random.Random(seed)
    out = []
    for n in common.lengths(s["docs"], s["median"], s["min_len"], s["max_length"], seed):
        ids = common.random_ids(n, vocab, rng)
        prompt = max(1, int(n * rng.uniform(0.2, 0.4)))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_len": prompt})
    return out


def sft_step(model, optimizer, rows: list[dict], device: str) -> tuple[torch.Tensor, int]:
    """One optimiser step of `run_sft` on packed `rows` (one padding-free row): (loss, tokens)."""
    from align.losses import sft_loss_from_logprobs
    from align.train.sft import packed_logprobs, packed_row, trained_tokens

    batch = packed_row(rows, torch.device(device))
    with common.autocast(device):
        logps = packed_logprobs(model, batch)
        loss, _ = sft_loss_from_logprobs(logps, sum(trained_tokens(r) for r in rows))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), batch["input_ids"].numel()


def run_ours(args, examples: list[dict]) -> dict:
    from align.packing import pack_examples

    s = SETTINGS[args.mode]
    rows = pack_examples([{k: e[k] for k in ("input_ids", "labels")} for e in examples], s["max_length"])
    model = common.build_lm(args.shape, args.device, args.seed)
    model.train()
    optimizer = common.our_optimizer(model)
    clock = common.StepClock(args.device)
    result: dict = {"name": "align (run_sft step)"}
    with common.peak_memory(args.device, result):
        for i in range(0, len(rows), s["rows"]):
            clock.start()
            loss, tokens = sft_step(model, optimizer, rows[i : i + s["rows"]], args.device)
            clock.stop(tokens)
    result.update(_rates(args, clock, examples, s["warmup"]))
    result["final_loss"] = round(float(loss), 4)
    return result


def liger_unavailable(device: str) -> str:
    """Why TRL's Liger configuration cannot run here ("" when it can): liger-kernel is Triton, CUDA only."""
    import importlib.util

    if device != "cuda":
        return "liger-kernel runs Triton kernels on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return ""


def run_trl(args, examples: list[dict], liger: bool = False) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = SETTINGS[args.mode]
    model = common.build_lm(args.shape, args.device, args.seed, side="peer")
    tokenizer = common.synthetic_tokenizer(common.MODELS[args.shape]["vocab_size"])
    data = Dataset.from_list(
        [
            {
                "input_ids": e["input_ids"],
                "completion_mask": [0] * e["prompt_len"] + [1] * (len(e["input_ids"]) - e["prompt_len"]),
            }
            for e in examples
        ]
    )
    clock = common.StepClock(args.device)
    trainer_cls, timer = common.timed_trainer(SFTTrainer, clock, lambda b: float(b["input_ids"].numel()))
    config = SFTConfig(
        output_dir=str(Path(args.tmp) / "trl-sft"),
        packing=True,
        max_length=s["max_length"],
        per_device_train_batch_size=s["rows"],
        completion_only_loss=True,
        num_train_epochs=1,
        use_liger_kernel=liger,
        **common.peer_args(args.device),
    )
    trainer = trainer_cls(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
    )
    liger_txt = ", Liger fused linear cross-entropy" if liger else ""
    result: dict = {
        "name": f"TRL {__import__('trl').__version__} SFTTrainer (packing, padding-free{liger_txt})"
    }
    with common.peak_memory(args.device, result):
        out = trainer.train()
    result.update(_rates(args, clock, examples, s["warmup"]))
    result["final_loss"] = round(float(out.training_loss), 4)
    return result


def _rates(args, clock: common.StepClock, examples: list[dict], warmup: int) -> dict:
    result = {
        "tokens_per_s": round(clock.rate(warmup), 1),
        "tokens_processed": int(sum(clock.work)),
        **clock.summary(warmup),
    }
    peak, peak_name = common.peak_flops(args.device)
    if peak:
        # Every step processes whole documents; scale the epoch's FLOPs to the timed steps' share.
        flops = common.train_flops(args.shape, [len(e["input_ids"]) for e in examples])
        share = sum(clock.work[warmup:]) / max(sum(clock.work), 1)
        result["mfu"] = round(flops * share / sum(clock.seconds[warmup:]) / peak, 4)
    result["mfu_peak"] = peak_name
    return result


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("sft", __doc__, argv)
    examples = make_examples(args.mode, common.MODELS[args.shape]["vocab_size"], args.seed)
    tokens = sum(len(e["input_ids"]) for e in examples)
    ours, peer = common.run_sides(args, examples, run_ours, run_trl)
    why_not = liger_unavailable(args.device)
    liger: dict | None = None
    if not why_not:
        common.release_memory(args.device)
        liger = common.run_sides(args, examples, lambda *_: {}, lambda a, e: run_trl(a, e, liger=True))[1]
    # The ratio is against the faster TRL configuration.
    plain = peer
    if liger and liger["tokens_per_s"] > peer["tokens_per_s"]:
        peer = liger
    setting = {
        **SETTINGS[args.mode],
        "documents": len(examples),
        "dataset_tokens": tokens,
        "epochs": 1,
        "precision": common.precision(args.device),
        "attention": {
            "ours": common.attn_implementation(args.device),
            "peer": common.attn_implementation(args.device, "peer"),
        },
        "trl_plain": plain,
        "trl_liger": liger if liger else f"not run: {why_not}",
    }
    return common.compare(
        args, "tokens_per_s", ours, peer, setting, note="peer = the faster TRL configuration"
    )


if __name__ == "__main__":
    main()
