"""Per-token cost of a packed training step against row length (issue 12, part 1).

    python bench/packed_rows.py --mode smoke --device cpu              # rows of 1,024 and 8,192 tokens
    python bench/packed_rows.py --mode smoke --device cpu --attn auto,sdpa  # and through sdpa's (T, T) mask
    python bench/packed_rows.py --mode real --device cuda              # Qwen2.5-0.5B, rows of 2k and 16k

The default loading path end to end: a tiny Qwen2 (grouped K/V) saved to a temporary directory, loaded
by `align.models.load_causal_lm` with a default `SFTConfig` (so `attn_implementation=auto`), then
`align.train.sft.packed_row` and `packed_logprobs`, forward and backward. Every row is made of
documents of the same length (128 tokens), so the work per token is the same at every row length
except for attention across documents: the ratio of seconds per token (longest row / shortest row) is
1.0 for document-masked attention and grows with the row length under a dense mask. Timed: forward +
backward of the same tokens at every row length (one longest row, or as many shorter ones), the lengths
taking turns so that load from other jobs falls on both; no optimiser step (its cost is per step, not
per token); the median of ``repeats`` rounds after one warm-up round. Writes the JSON with the machine
and shapes.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(shape="tiny", row_lengths=[1024, 8192], doc_length=128, repeats=5),
    "real": dict(shape=None, row_lengths=[2048, 16384], doc_length=512, repeats=5),
}


def extra(p) -> None:
    p.add_argument(
        "--attn",
        default=None,
        help="attn_implementation(s), comma-separated (default: auto; real: auto,sdpa)",
    )


def load_default(shape: str, device: str, attn: str, seed: int):
    """`load_causal_lm` with a default SFTConfig on a saved random model of `shape`."""
    from align.config import SFTConfig
    from align.models import load_causal_lm

    model = common.build_lm(shape, "cpu", seed)
    tokenizer = common.synthetic_tokenizer(common.MODELS[shape]["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = SFTConfig(model_name_or_path=tmp, attn_implementation=attn)
        loaded, _ = load_causal_lm(cfg)
    return loaded.to(device).train()


def _rows(row_length: int, total: int, doc_length: int, vocab: int, device: str, seed: int) -> list[dict]:
    """``total // row_length`` packed rows of ``row_length`` tokens, each made of ``doc_length``-token documents."""
    from align.train.sft import packed_row

    rng = random.Random(seed)
    rows = []
    for _ in range(max(1, total // row_length)):
        docs = []
        for _ in range(row_length // doc_length):
            ids = common.random_ids(doc_length, vocab, rng)
            docs.append({"input_ids": ids, "labels": [-100] + ids[1:]})
        rows.append(packed_row(docs, torch.device(device)))
    return rows


def _step(model, rows: list[dict], device: str) -> float:
    """Seconds of forward + backward over ``rows``, one row at a time."""
    from align.train.sft import packed_logprobs

    common.sync(device)
    t0 = time.perf_counter()
    for row in rows:
        with common.autocast(device):
            loss = -packed_logprobs(model, row).mean()
        loss.backward()
    common.sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def measure(args, shape: str, attn: str) -> dict:
    """Seconds per token at each row length, and the ratio longest / shortest, under one attention.

    Every timing covers the same tokens (the longest row's; shorter rows several of them) and the row
    lengths take turns, so load from other jobs on a shared host falls on both alike."""
    s = SETTINGS[args.mode]
    model = load_default(shape, args.device, attn, args.seed)
    vocab = common.MODELS[shape]["vocab_size"]
    total = max(s["row_lengths"])
    batches = {n: _rows(n, total, s["doc_length"], vocab, args.device, args.seed) for n in s["row_lengths"]}
    seconds: dict[int, list[float]] = {n: [] for n in s["row_lengths"]}
    for i in range(s["repeats"] + 1):
        for n, rows in batches.items():
            t = _step(model, rows, args.device)
            if i:  # the first round warms up
                seconds[n].append(t)
    points = []
    for n, times in seconds.items():
        median = statistics.median(times)
        points.append(
            {
                "row_tokens": n,
                "rows_per_timing": len(batches[n]),
                "documents_per_row": n // s["doc_length"],
                "median_s": round(median, 5),
                "us_per_token": round(1e6 * median / (n * len(batches[n])), 3),
                "seconds": [round(t, 5) for t in times],
            }
        )
    name = model.config._attn_implementation
    del model
    common.release_memory(args.device)
    ratio = points[-1]["us_per_token"] / points[0]["us_per_token"]
    for p in points:
        print(f"[packed_rows] {name}: rows of {p['row_tokens']}: {p['us_per_token']} us/token", flush=True)
    print(
        f"[packed_rows] {name}: per-token cost {points[-1]['row_tokens']} vs {points[0]['row_tokens']}: {ratio:.2f}x"
    )
    return {
        "attn_implementation": name,
        "requested": attn,
        "points": points,
        "per_token_ratio": round(ratio, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("packed_rows", __doc__, argv, extra)
    s = SETTINGS[args.mode]
    shape = s["shape"] or args.model
    attns = (args.attn or ("auto,sdpa" if args.mode == "real" else "auto")).split(",")
    runs = [measure(args, shape, a.strip()) for a in attns]
    record = {
        "stage": "packed_rows",
        "mode": args.mode,
        "unit": "per-token cost of the longest row / the shortest (1.0: no growth with row length)",
        "attn_implementation": runs[0]["attn_implementation"],
        "per_token_ratio_longest_vs_shortest": runs[0]["per_token_ratio"],
        "runs": runs,
        "model": {"shape": shape, **common.MODELS[shape]},
        "settings": s,
        "precision": common.precision(args.device),
    }
    common.write_record(args, record)
    return record


if __name__ == "__main__":
    main()
