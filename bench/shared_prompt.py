"""Shared-prompt log-prob pass against the per-row pass it replaces (GRPO/online DPO/PPO scoring and update).

    python bench/shared_prompt.py --mode smoke --device cpu     # tiny random Qwen2, 4 queries x 8 samples
    python bench/shared_prompt.py --mode real --device cpu      # SmolLM2-135M-Instruct + LoRA r16 (embedded)
    python bench/shared_prompt.py --mode real --device cuda

Both sides score the same rollout batch: `queries` prompts of about `prompt_tokens` tokens, `samples` short
responses each (the embedded GRPO task's shape: ~50-token prompts with the system prompt, 3-4-token
answers). Per row (`align.train.rl_common.response_logprobs` over the left-padded sequences: every prompt
token runs once per sample) against shared (`align.rollout.shared_prefix.shared_prompt_logprobs`: each prompt
once, its KV cache gathered to its rows). Timed: the update's forward + backward (LoRA, train mode, no
dropout: the RL loops' setting) and the reference's no-grad forward, the two sides taking turns so load
from other jobs falls on both; the median of ``repeats`` rounds after one warm-up. The largest log-prob
difference between the sides is recorded with the timings. Writes JSON with the machine and shapes.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(queries=4, samples=8, prompt_tokens=50, response_tokens=(1, 4), repeats=5, lora_r=16),
    "real": dict(queries=4, samples=8, prompt_tokens=50, response_tokens=(1, 4), repeats=5, lora_r=16),
}


def load_policy(mode: str, device: str, lora_r: int, seed: int) -> tuple[torch.nn.Module, str, int]:
    """(model with a LoRA adapter in train mode, a description, vocab size): SmolLM2-135M-Instruct from the
    embedded asset (real) or a tiny random Qwen2 (smoke)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if mode == "real":
        from align.assets import smollm2_dir

        base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
        name = "SmolLM2-135M-Instruct"
    else:
        base = common.build_lm("tiny", "cpu", seed)
        name = "tiny Qwen2 (random)"
    torch.manual_seed(seed)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, lora).to(device).train()
    return model, name, base.config.vocab_size


def rollout_batch(s: dict, vocab: int, device: str, seed: int):
    """A rollout batch of `queries` x `samples` rows, grouped by prompt as the engines return them."""
    from align.rollout.batch import RolloutBatch

    rng = random.Random(seed)
    prompts = [
        common.random_ids(s["prompt_tokens"] + rng.randint(-8, 8), vocab, rng) for _ in range(s["queries"])
    ]
    rows = s["queries"] * s["samples"]
    lengths = torch.tensor([rng.randint(*s["response_tokens"]) for _ in range(rows)])
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.tensor([common.random_ids(width, vocab, rng) for _ in range(rows)]).masked_fill(mask == 0, 0)
    index = torch.arange(s["queries"]).repeat_interleave(s["samples"])
    return RolloutBatch(
        prompt_ids=[prompts[int(i)] for i in index],
        response_ids=ids.to(device),
        response_mask=mask.to(device),
        logprobs=None,
        finished=torch.ones(rows, dtype=torch.bool, device=device),
        prompt_index=index.to(device),
        lengths=lengths.to(device),
        n=s["samples"],
        pad_id=0,
    )


def side_logprobs(side: str, model, batch) -> torch.Tensor:
    from align.rollout.shared_prefix import shared_prompt_logprobs
    from align.train.rl_common import response_logprobs

    if side == "shared":
        return shared_prompt_logprobs(model, batch, 1.0)
    return response_logprobs(model, batch.sequences(left_pad=True), batch.response_ids, 1.0)


def timed(side: str, model, batch, device: str, train: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one pass (forward + backward when `train`, else a no-grad forward) and its log-probs."""
    common.sync(device)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(train), common.autocast(device):
        logp = side_logprobs(side, model, batch)
        if train:
            (logp * batch.response_mask).sum().backward()
    common.sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, logp.detach().float()


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("shared_prompt", __doc__, argv)
    s = SETTINGS[args.mode]
    model, name, vocab = load_policy(args.mode, args.device, s["lora_r"], args.seed)
    batch = rollout_batch(s, vocab, args.device, args.seed)
    mask = batch.response_mask.bool()
    results = {}
    for train in (True, False):
        seconds: dict[str, list[float]] = {"per_row": [], "shared": []}
        outputs = {}
        for i in range(s["repeats"] + 1):
            for side in seconds:
                t, outputs[side] = timed(side, model, batch, args.device, train)
                if i:  # the first round warms up
                    seconds[side].append(t)
        medians = {side: statistics.median(ts) for side, ts in seconds.items()}
        pass_name = "update (forward + backward)" if train else "reference (no-grad forward)"
        diff = (outputs["shared"] - outputs["per_row"])[mask].abs().max().item()
        results["update" if train else "reference"] = {
            "pass": pass_name,
            "per_row_median_s": round(medians["per_row"], 5),
            "shared_median_s": round(medians["shared"], 5),
            "speedup": round(medians["per_row"] / medians["shared"], 3),
            "max_abs_logprob_difference": diff,
            "seconds": {side: [round(t, 5) for t in ts] for side, ts in seconds.items()},
        }
        print(
            f"[shared_prompt] {name}, {pass_name}: per row {medians['per_row']:.4f} s, shared "
            f"{medians['shared']:.4f} s ({medians['per_row'] / medians['shared']:.2f}x), max |dlogp| {diff:.2e}",
            flush=True,
        )
    record = {
        "stage": "shared_prompt",
        "mode": args.mode,
        "unit": "seconds per pass over the batch (median); speedup = per row / shared",
        "model": name,
        "shapes": {
            "queries": s["queries"],
            "samples_per_query": s["samples"],
            "prompt_tokens_median": s["prompt_tokens"],
            "response_tokens": list(s["response_tokens"]),
            "lora_r": s["lora_r"],
        },
        "results": results,
        "precision": common.precision(args.device),
    }
    common.write_record(args, record)
    return record


if __name__ == "__main__":
    main()
