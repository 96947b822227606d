"""Per-rank memory of a full fine-tune under sharding (FSDP2, `sharding: fsdp`): parameter, gradient and
AdamW bytes for 1, 2 and 8 processes (or any rank counts), the figures that decide how many GPUs a model needs.

    python bench/memory.py                                   # tiny (also measured) + Qwen2.5 0.5B-72B shapes
    python bench/memory.py --models qwen2.5-7b --ranks 1,2,8,16,64

Each rank's bytes come from `align.train.sharding.planned_memory`: FSDP2 cuts every parameter along its
first dimension into `torch.chunk` pieces, so a rank's share follows from the parameter shapes alone. The
model is built on the meta device (no memory: 72B costs nothing), and 8 or 64 ranks need not be launched.
A full fine-tune: fp32 parameters and gradients, AdamW's two fp32 moments (16 bytes per parameter, divided
over the ranks). Not counted: activations, the one or two units a forward gathers, the KV cache, and with
accumulation over micro-batches the unsharded gradients (`grads_accumulating` in a run's memory.json).

With --measure (default: the tiny model only) the 1- and 2-process figures are also measured: the model
built for real, `shard_model` on 2 gloo processes under torchrun, `memory_report` on each rank; the JSON
says whether they equal the plan byte for byte. Writes JSON (default bench/results/memory_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

# Qwen2.5-7B/14B/72B (config.json of the Qwen/Qwen2.5-*-Instruct releases): untied embeddings, 8 K/V heads
# (4 for 7B), a 152,064-word head; the smaller shapes are bench/common.py's.
LARGE = dict(common.QWEN25, vocab_size=152_064, tie_word_embeddings=False)
SHAPES = {
    **common.MODELS,
    "qwen2.5-7b": dict(
        LARGE, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4,
    ),
    "qwen2.5-14b": dict(
        LARGE, hidden_size=5120, intermediate_size=13_824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8,
    ),
    "qwen2.5-72b": dict(
        LARGE, hidden_size=8192, intermediate_size=29_568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8,
    ),
}  # fmt: skip
DEFAULT_MODELS = ["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-72b"]


def build(shape: str, device: str = "meta") -> torch.nn.Module:
    """A Qwen2ForCausalLM of `shape` in fp32, on the meta device (shapes only) or for real (seeded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def plan(shape: str, ranks: list[int]) -> dict:
    """The model's parameter count and, per rank count, every rank's bytes and the largest against one process's."""
    from align.train.sharding import planned_memory

    model = build(shape)
    one = planned_memory(model, 1)[0]["total"]
    per_world = {}
    for world in ranks:
        rows = planned_memory(model, world)
        largest = max(r["total"] for r in rows)
        per_world[str(world)] = {
            "per_rank": rows,
            "largest_total": largest,
            "largest_gb": round(largest / 1e9, 3),
            "largest_over_one_process": round(largest / one, 4),
        }
    embeddings = model.get_input_embeddings().weight
    return {
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "tied_embeddings": model.get_output_embeddings().weight is embeddings,
        "ranks": per_world,
    }


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(shape: str) -> dict[str, list[dict[str, int]]]:
    """`memory_report` of the real model on 1 process (unsharded) and on each of 2 sharded gloo processes."""
    from align.train.sharding import memory_report

    measured = {"1": [memory_report(build(shape, "cpu"))]}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.ROOT)}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
             __file__, "--worker", shape, "--out", tmp],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"the 2-process measurement failed:\n{proc.stderr[-3000:]}")
        measured["2"] = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
    return measured


def worker(shape: str, out: Path) -> None:
    """Under torchrun: shard the real model over the ranks and write this rank's `memory_report`."""
    from datetime import timedelta

    import torch.distributed as dist

    from align.train.sharding import memory_report, shard_model

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model = shard_model(build(shape, "cpu"))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(memory_report(model)))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench/memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--ranks", default="1,2,8", help="comma-separated rank counts (simulated from the shapes)")
    p.add_argument(
        "--measure", default="tiny", help="models also measured on 1 and 2 processes ('' for none)"
    )
    p.add_argument("--out", default=str(common.RESULTS / "memory_cpu.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.out))
        return {}
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        p.error(f"unknown models {unknown}; known: {sorted(SHAPES)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    record: dict = {
        "what": "per-rank bytes of a full fine-tune under sharding=fsdp: fp32 parameters + fp32 gradients + "
        "AdamW's two fp32 moments (align.train.sharding.planned_memory, from the parameter shapes; "
        "activations, gathered units and KV cache not counted)",
        "models": {},
    }
    for shape in models:
        entry = plan(shape, ranks)
        if shape in args.measure.split(","):
            entry["measured"] = measure(shape)
            entry["measured_equals_plan"] = all(
                entry["measured"][w] == plan_rows
                for w, plan_rows in (("1", entry["ranks"].get("1", {}).get("per_rank")),
                                     ("2", entry["ranks"].get("2", {}).get("per_rank")))
                if plan_rows is not None
            )  # fmt: skip
        record["models"][shape] = entry
        largest = ", ".join(f"{w}: {v['largest_gb']} GB" for w, v in entry["ranks"].items())
        print(
            f"{shape} ({entry['parameters'] / 1e9:.3f}B parameters) largest rank per process count: {largest}"
        )
    record["machine"] = common.machine("cpu")
    record["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record["command"] = "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
