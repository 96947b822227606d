"""Rollout generation side by side: align's rollout engines vs transformers `generate`, top-p 0.9.

    python bench/generate.py --mode real --model qwen2.5-0.5b --device cuda
    python bench/generate.py --mode smoke --device cpu

What the RL loops run is what is timed: fp32 master weights under the training precision (bf16 autocast
on GPU, plain fp32 on CPU), and our engines called through ``align.train.rl_run.sample_rollouts``, the call
``RLRun.sample`` makes (so the static engine's KV cache and CUDA graphs are bf16 on GPU); the record says
which weights, compute precision, engine and KV-cache dtype were measured. The peer runs the same model
under the same autocast. The same randomly initialised model samples continuations of the same
length-varied prompts at temperature 1, top-p 0.9, no top-k (the peer's default top-k 50 is
turned off so both sample the same distribution), in one batch of ``batch`` rows, stopping at
``<|im_end|>``/EOS or ``new_tokens``. Peer: `model.generate(do_sample=True, top_p=0.9, top_k=0)` on
the left-padded batch. Ours: `align.rollout.static.StaticRolloutEngine` (pre-allocated KV slots, fixed-shape
steps, finished slots refilled); also `ManualRolloutEngine` (dynamic cache, finished rows dropped) and
`HFRolloutEngine` (generate behind the rollout interface). Reports generated tokens/s (stop tokens
included, padding not) and peak memory.

A second comparison, ``refill``: ``refill_factor`` x ``batch`` prompts and a stop set of one word in
``new_tokens // 2`` (a random model never says ``<|im_end|>``; this gives geometric response lengths, as a
real policy's vary). The peer runs ``generate`` on consecutive chunks of ``batch`` prompts (each chunk
runs until its longest row ends); ours keeps ``batch`` slots busy by refilling them.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(batch=6, prompt_median=16, prompt_max=32, new_tokens=12, repeats=2, refill_factor=4),
    "real": dict(batch=128, prompt_median=256, prompt_max=512, new_tokens=256, repeats=2, refill_factor=2),
}


def refill_stops(vocab: int, new_tokens: int) -> list[int]:
    """Stop words for the refill comparison: <|im_end|>, EOS and every (new_tokens // 2)-th word."""
    every = max(2, new_tokens // 2)
    return [common.IM_END_ID, common.EOS_ID] + list(range(common.FIRST_WORD, vocab, every))


def make_prompts(mode: str, vocab: int, seed: int, count: int | None = None) -> list[list[int]]:
    s = SETTINGS[mode]
    rng = random.Random(seed)
    return [
        common.random_ids(n, vocab, rng)
        for n in common.lengths(count or s["batch"], s["prompt_median"], 4, s["prompt_max"], seed)
    ]


def _generated(rows: list[list[int]], stops: set[int]) -> int:
    """Tokens up to and including each row's first stop token."""
    total = 0
    for row in rows:
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        total += len(row) if cut is None else cut + 1
    return total


def engine_call(
    args, model, tokenizer, prompts: list[list[int]], engine_cls, stops: list[int] | None = None
) -> Callable[[int], float]:
    """All prompts through an align rollout engine (``batch`` rows at a time), called as the RL loops call
    it (``sample_rollouts`` under the training autocast); returns the tokens generated. The engine is the
    returned function's ``engine`` attribute (its ``cache_dtype`` says what the static engine allocated)."""
    from align.train.rl_run import sample_rollouts

    s = SETTINGS[args.mode]
    engine = engine_cls(model, tokenizer, batch_size=s["batch"], logprobs="none")

    def call(seed: int) -> float:
        batch = sample_rollouts(
            engine, prompts, n=1, max_new_tokens=s["new_tokens"], temperature=1.0, top_p=0.9,
            seed=seed, autocast=lambda: common.autocast(args.device), stop=stops,
        )  # fmt: skip
        return float(batch.response_mask.sum())

    call.engine = engine  # type: ignore[attr-defined]
    return call


def generate_call(
    args, model, prompts: list[list[int]], stops: list[int] | None = None
) -> Callable[[int], float]:
    """`model.generate` on consecutive left-padded chunks of ``batch`` prompts; returns the tokens generated."""
    s = SETTINGS[args.mode]
    stops = stops or [common.IM_END_ID, common.EOS_ID]
    chunks = []
    for start in range(0, len(prompts), s["batch"]):
        chunk = prompts[start : start + s["batch"]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), common.PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        chunks.append((ids.to(args.device), mask.to(args.device)))

    def call(seed: int) -> float:
        torch.manual_seed(seed)
        total = 0.0
        with torch.inference_mode(), common.autocast(args.device):  # the precision ours decodes in
            for ids, mask in chunks:
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_p=0.9,
                    top_k=0,
                    temperature=1.0,
                    max_new_tokens=s["new_tokens"],
                    eos_token_id=stops,
                    pad_token_id=common.PAD_ID,
                )
                total += _generated(out[:, ids.shape[1] :].tolist(), set(stops))
        return total

    return call


def run_interleaved(args, sides: dict[str, Callable[[int], float]]) -> dict[str, dict]:
    """Each side once per round, round after round (so load drift on a shared host hits all sides
    alike); the first round warms up. Peak memory per side is the largest over its timed calls: the
    warm-up round also pays one-off costs (first use of kernels and code pages, ~8 MB of RSS on CPU)
    that land on whichever side happens to run first."""
    s = SETTINGS[args.mode]
    clocks = {name: common.StepClock(args.device) for name in sides}
    memory: dict[str, dict] = {name: {} for name in sides}
    for r in range(s["repeats"] + 1):
        for name, call in sides.items():
            record: dict = {}
            with common.peak_memory(args.device, record):
                clocks[name].start()
                clocks[name].stop(call(r))
            key = "peak_memory_mb" if "peak_memory_mb" in record else "peak_memory_above_start_mb"
            if r >= 1 and record[key] >= memory[name].get(key, -1.0):
                memory[name] = record
    results = {}
    for name, clock in clocks.items():
        results[name] = {
            "name": name,
            **memory[name],
            "tokens_per_s": round(clock.rate(1), 1),
            "tokens_generated": int(sum(clock.work[1:])),
            "calls": len(clock.seconds),
            "warmup_calls": 1,
            **{k: v for k, v in clock.summary(1).items() if k != "steps"},
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("generate", __doc__, argv)
    from align.rollout.batch import HFRolloutEngine
    from align.rollout.manual import ManualRolloutEngine
    from align.rollout.static import StaticRolloutEngine

    # fp32 master weights on every device, as the RL loops hold them; bf16 comes from autocast on GPU.
    # One model for every side: the peer's attention (sdpa; the engines switch to it for decoding anyway).
    model = common.build_lm(args.shape, args.device, args.seed, dtype=torch.float32, side="peer").eval()
    model.generation_config.use_cache = True
    tokenizer = common.synthetic_tokenizer(common.MODELS[args.shape]["vocab_size"])
    vocab = common.MODELS[args.shape]["vocab_size"]
    prompts = make_prompts(args.mode, vocab, args.seed)
    static, manual, hf = "align StaticRolloutEngine", "align ManualRolloutEngine", "align HFRolloutEngine"
    peer_name = f"transformers {__import__('transformers').__version__} generate"
    # Real mode times StaticRolloutEngine and the peer only: the other engines took most of the H200 run's
    # 268 s (2026-11-28) and are not what PPO uses on a GPU.
    extra = args.mode == "smoke"
    calls = {static: engine_call(args, model, tokenizer, prompts, StaticRolloutEngine)}
    measured = calls[static].engine  # type: ignore[attr-defined]
    if extra:
        calls[manual] = engine_call(args, model, tokenizer, prompts, ManualRolloutEngine)
        calls[hf] = engine_call(args, model, tokenizer, prompts, HFRolloutEngine)
    calls[peer_name] = generate_call(args, model, prompts)
    results = run_interleaved(args, calls)
    s = SETTINGS[args.mode]
    many = make_prompts(args.mode, vocab, args.seed + 1, count=s["refill_factor"] * s["batch"])
    stops = refill_stops(vocab, s["new_tokens"])
    calls = {static: engine_call(args, model, tokenizer, many, StaticRolloutEngine, stops)}
    if extra:
        calls[manual] = engine_call(args, model, tokenizer, many, ManualRolloutEngine, stops)
    calls[peer_name] = generate_call(args, model, many, stops)
    refill = run_interleaved(args, calls)
    ours, peer = results[static], results[peer_name]
    setting = {
        **SETTINGS[args.mode],
        "prompt_tokens": sum(len(p) for p in prompts),
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": "off",
        "weights": "float32",
        "precision": common.precision(args.device),
        "measured": {
            "call": "align.train.rl_run.sample_rollouts under the training autocast, as RLRun.sample",
            "engine": "StaticRolloutEngine, logprobs=none",
            "kv_cache_dtype": str(measured.cache_dtype).replace("torch.", ""),
        },
    }
    setting["static_engine_compile"] = "auto: CUDA graphs on CUDA, eager on CPU"
    setting["refill"] = {
        "prompts": len(many),
        "stop_words": len(stops),
        "ratio_ours_over_peer": round(refill[static]["tokens_per_s"] / refill[peer_name]["tokens_per_s"], 3),
        "ours": refill[static],
        "peer": refill[peer_name],
    }
    if extra:
        ours["also_ManualRolloutEngine"] = results[manual]
        ours["also_HFRolloutEngine"] = results[hf]
        setting["refill"]["manual"] = refill[manual]
        setting["refill"]["ratio_manual_over_peer"] = round(
            refill[manual]["tokens_per_s"] / refill[peer_name]["tokens_per_s"], 3
        )
    return common.compare(args, "tokens_per_s", ours, peer, setting)


if __name__ == "__main__":
    main()
