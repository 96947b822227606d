"""SFT tokens/s against sequence length and model size (align's packed step), with a plot.

    python bench/scaling.py --mode real --device cuda       # 512..8192 tokens, Qwen2.5-0.5B and 1.5B
    python bench/scaling.py --mode smoke --device cpu       # tiny lengths and shape, CPU

Every row is one document of exactly the swept length (so attention's share grows with it), and every
step trains the same number of tokens (``tokens_per_step``, split into as many documents as fit).
Writes the JSON (``--out``) and a PNG next to it; on a GPU each point also has its MFU.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.sft import sft_step  # noqa: E402

SWEEPS = {
    "smoke": dict(lengths=[32, 64, 128], models=["tiny"], tokens_per_step=256, steps=3),
    "real": dict(
        lengths=[512, 1024, 2048, 4096, 8192],
        models=["qwen2.5-0.5b", "qwen2.5-1.5b"],
        tokens_per_step=16_384,
        steps=6,
    ),
}


def point(args, shape: str, length: int) -> dict:
    """tokens/s (median over the steps after the first) of documents of `length` tokens."""
    sweep = SWEEPS[args.mode]
    vocab = common.MODELS[shape]["vocab_size"]
    rng = random.Random(args.seed)
    docs = max(1, sweep["tokens_per_step"] // length)
    model = common.build_lm(shape, args.device, args.seed)
    model.train()
    optimizer = common.our_optimizer(model)
    clock = common.StepClock(args.device)
    result: dict = {"model": shape, "length": length, "documents_per_step": docs}
    with common.peak_memory(args.device, result):
        for _ in range(sweep["steps"]):
            rows = []
            for _ in range(docs):
                ids = common.random_ids(length, vocab, rng)
                rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
            clock.start()
            _, tokens = sft_step(model, optimizer, rows, args.device)
            clock.stop(tokens)
    result["tokens_per_s"] = round(clock.rate(1), 1)
    peak, _ = common.peak_flops(args.device)
    if peak:
        flops = common.train_flops(shape, [length] * docs)
        result["mfu"] = round(flops * clock.rate(1) / (docs * length) / peak, 4)
    del model, optimizer
    common.release_memory(args.device)
    return result


def plot(points: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape in dict.fromkeys(p["model"] for p in points):
        mine = [p for p in points if p["model"] == shape]
        ax.plot([p["length"] for p in mine], [p["tokens_per_s"] for p in mine], marker="o", label=shape)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = common.stage_args("scaling", __doc__, argv)
    sweep = SWEEPS[args.mode]
    points = [point(args, shape, n) for shape in sweep["models"] for n in sweep["lengths"]]
    for p in points:
        print(f"[scaling] {p['model']} length {p['length']}: {p['tokens_per_s']} tokens/s", flush=True)
    out = Path(args.out)
    png = plot(
        points, out.with_suffix(".png"), f"align SFT step, {args.mode}, {common.machine(args.device)['name']}"
    )
    record = {
        "stage": "scaling",
        "mode": args.mode,
        "sweep": sweep,
        "points": points,
        "plot": str(png.name),
    }
    common.write_record(args, record)
    return record


if __name__ == "__main__":
    main()
