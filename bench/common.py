"""What every side-by-side benchmark in bench/ shares: model shapes, a synthetic tokenizer and data,
timing, peak memory, MFU and the result file.

Models are built from the Qwen2.5 configs written out below (random init, no hub download). The
synthetic tokenizer is a word-level vocabulary ``w<id>``: the text ``"w17 w4003"`` tokenises to exactly
``[17, 4003]``, so a peer that insists on tokenising text sees the very ids our side gets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The peers' trainers report usage to the Hugging Face hub from a background thread; benchmarks are
# offline, and that thread is one more contender for the CPU being measured.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Qwen2.5-0.5B / 1.5B (config.json of the Qwen/Qwen2.5-*-Instruct releases), and a tiny shape with the
# same layout for CPU smoke runs. What the releases share is written once.
QWEN25 = dict(
    num_key_value_heads=2,
    vocab_size=151_936,
    max_position_embeddings=32_768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14
    ),
    "qwen2.5-1.5b": dict(
        QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12
    ),
    "tiny": dict(
        QWEN25,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=8192,
        max_position_embeddings=4096,
    ),
}
# Peak dense bf16 tensor throughput (FLOP/s) for MFU, from the vendors' data sheets (SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
PAD_ID = EOS_ID = 0
IM_END_ID = 2
FIRST_WORD = len(SPECIALS)


def stage_args(
    stage: str, doc: str, argv: list[str] | None, extra: Callable | None = None
) -> argparse.Namespace:
    """The options every stage script takes: --mode, --model, --device, --out (+ the stage's own)."""
    p = argparse.ArgumentParser(prog=f"bench/{stage}.py", description=doc.split("\n\n")[0])
    p.add_argument("--mode", choices=["smoke", "real"], default="smoke", help="smoke: tiny shapes for CPU")
    p.add_argument("--model", choices=["qwen2.5-0.5b", "qwen2.5-1.5b"], default="qwen2.5-0.5b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    p.add_argument("--out", default=None, help=f"default: bench/results/{stage}_<mode>_<device>.json")
    p.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu" and args.mode == "smoke":
        # One intra-op thread: on a small shared host an OpenMP team spin-waits whenever another job
        # holds one of its cores, which made steps 10-50x slower at random and swamped the comparison.
        torch.set_num_threads(1)
    args.shape = "tiny" if args.mode == "smoke" else args.model
    args.out = args.out or str(RESULTS / f"{stage}_{args.mode}_{args.device}.json")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.stage = stage
    return args


def attn_implementation(device: str, side: str = "ours") -> str:
    """The attention each side gets: ours its default (`attn_implementation=auto`: align's document-masked
    attention, FlashAttention-2 varlen on CUDA); a peer flash_attention_2 where flash-attn is installed,
    else sdpa (what its users get; under sdpa a packed row attends through a dense (T, T) mask)."""
    import importlib.util

    if side == "ours":
        from align.attention import DOC_ATTENTION

        return DOC_ATTENTION
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_config(shape: str, device: str = "cpu", side: str = "ours"):
    from transformers import Qwen2Config

    config = Qwen2Config(
        **MODELS[shape], bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID, use_cache=False
    )
    config._attn_implementation = attn_implementation(device, side)
    return config


def build_lm(shape: str, device: str, seed: int = 0, dtype: torch.dtype = torch.float32, side: str = "ours"):
    """A randomly initialised Qwen2ForCausalLM of `shape`, fp32 master weights unless `dtype` says; `side`
    picks the attention (`attn_implementation`)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(model_config(shape, device, side)).to(device=device, dtype=dtype)


def synthetic_tokenizer(vocab_size: int):
    """Word-level tokenizer over ``<|endoftext|> <|im_start|> <|im_end|> <unk> w4 ... w<V-1>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.model_max_length = 1 << 20
    return tok


def to_text(ids: list[int]) -> str:
    """The text our synthetic tokenizer turns back into exactly `ids` (word ids only)."""
    return " ".join(f"w{i}" for i in ids)


def lengths(n: int, median: int, lo: int, hi: int, seed: int) -> list[int]:
    """`n` log-normal lengths (sigma 0.6, as chat data) with the given median, clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, 0.6))))) for _ in range(n)]


def random_ids(n: int, vocab_size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(FIRST_WORD, vocab_size) for _ in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Per-step wall times (CUDA-synchronised), with the units of work each step processed."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: list[float] = []
        self.work: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self, work: float) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._t0)
        self.work.append(work)

    def rate(self, warmup: int) -> float:
        """Work per second: the median of the per-step rates after the first `warmup` steps (compilation,
        allocator, caches). The median, not total work / total time, so that a few steps stalled by
        other jobs on a shared host do not decide the figure."""
        secs, work = self.seconds[warmup:] or self.seconds, self.work[warmup:] or self.work
        return statistics.median(w / max(t, 1e-12) for w, t in zip(work, secs, strict=True))

    def mean_rate(self, warmup: int) -> float:
        """Total work / total time after the warm-up steps (stalls included)."""
        secs, work = self.seconds[warmup:] or self.seconds, self.work[warmup:] or self.work
        return sum(work) / max(sum(secs), 1e-12)

    def summary(self, warmup: int) -> dict[str, Any]:
        timed = self.seconds[warmup:] or self.seconds
        return {
            "steps": len(self.seconds),
            "warmup_steps": min(warmup, len(self.seconds) - 1),
            "median_step_s": round(statistics.median(timed), 5),
            "mean_rate": round(self.mean_rate(warmup), 3),
            "timed_seconds": round(sum(timed), 4),
        }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: str) -> None:
    """Return freed memory to the system between sides, so each side's peak starts from a clean base."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # not glibc: RSS deltas are then less exact
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str, into: dict[str, Any]):
    """Peak memory of the block: CUDA max_memory_allocated, or on CPU the peak resident set size above
    the RSS at the start (tracemalloc would miss torch's own allocator): the kernel's high-water mark
    where it can be reset, else sampled every 2 ms."""
    release_memory(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        sync(device)
        into["peak_memory_mb"] = round((torch.cuda.max_memory_allocated()) / 2**20, 1)
        into["peak_memory_above_start_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        into["memory_method"] = "torch.cuda.max_memory_allocated"
        return
    if _reset_peak_rss():
        # The kernel's own high-water mark: exact, and no sampling thread competing for the CPU.
        base = _status_kb("VmRSS")
        yield
        into["peak_memory_above_start_mb"] = round((_status_kb("VmHWM") - base) / 1024, 1)
        into["memory_method"] = "CPU peak resident set size above the start (VmHWM after clear_refs)"
        return
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        into["peak_memory_above_start_mb"] = round((peak[0] - base) / 2**20, 1)
        into["memory_method"] = "CPU resident set size above the start, sampled every 2 ms (/proc/self/statm)"


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") >= 0
    except (OSError, KeyError):
        return False


def machine(device: str) -> dict[str, Any]:
    import transformers
    import trl

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": device,
        "name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def peak_flops(device: str) -> tuple[float | None, str]:
    """The named bf16 dense peak of this GPU (None on CPU or an unknown part)."""
    if device != "cuda":
        return None, "no MFU on CPU: no vendor bf16 peak to compare with"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, f"{key} bf16 dense peak {value / 1e12:.0f} TFLOP/s"
    return None, f"unknown peak for {name}"


def train_flops(shape: str, doc_lengths: list[int]) -> float:
    """Training FLOPs of one pass over documents of these lengths (each attending causally within
    itself): 6 N per token for the matmuls (N = parameters excluding the embedding lookup, the LM head
    counted) plus 12 L d per attended (query, key) pair for attention scores and values."""
    m = MODELS[shape]
    d, layers, ff, v = m["hidden_size"], m["num_hidden_layers"], m["intermediate_size"], m["vocab_size"]
    kv = d * m["num_key_value_heads"] // m["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff
    matmul_params = layers * per_layer + v * d
    tokens = sum(doc_lengths)
    pairs = sum(n * (n + 1) / 2 for n in doc_lengths)
    return 6 * matmul_params * tokens + 12 * layers * d * pairs


def write_record(args: argparse.Namespace, record: dict[str, Any]) -> Path:
    """Write a stage's JSON result to `args.out`, stamped with the machine, date and command unless the
    record has them; returns the path."""
    record.setdefault("machine", machine(args.device))
    record.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    record.setdefault("command", f"python bench/{args.stage}.py " + " ".join(args.argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def compare(
    args: argparse.Namespace,
    unit: str,
    ours: dict[str, Any],
    peer: dict[str, Any] | None,
    setting: dict[str, Any],
    higher_is_better: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """The result record (and its file), printing the one-line comparison."""
    key = unit
    ratio = None
    if peer and peer.get(key) and ours.get(key):
        ratio = ours[key] / peer[key] if higher_is_better else peer[key] / ours[key]
        ratio = round(ratio, 3)
    record = {
        "stage": args.stage,
        "mode": args.mode,
        "model": args.shape,
        "unit": unit,
        "ratio_ours_over_peer": ratio,
        "ratio_meaning": "speed-up: >1 means ours is faster"
        + ("" if higher_is_better else " (peer seconds / our seconds)"),
        "ours": ours,
        "peer": peer,
        "setting": setting,
        "machine": machine(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"python bench/{args.stage}.py " + " ".join(args.argv),
        "note": note,
    }
    out = write_record(args, record)
    peer_txt = f"{peer[key]:.4g}" if peer and peer.get(key) else "not run"
    print(
        f"[{args.stage} {args.mode} {args.device} {args.shape}] {unit}: ours {ours.get(key, float('nan')):.4g}"
        f" | peer ({(peer or {}).get('name', '-')}) {peer_txt} | ours/peer {ratio} -> {out}",
        flush=True,
    )
    return record


def run_sides(
    args: argparse.Namespace, data: Any, run_ours: Callable, run_peer: Callable
) -> tuple[dict, dict]:
    """Ours, then the peer, on the same `data`: each gets a scratch folder (`args.tmp`, removed after)
    and starts from a clean memory base. Returns (ours, peer)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        ours = run_ours(args, data)
        release_memory(args.device)
        peer = run_peer(args, data)
    return ours, peer


def precision(device: str) -> str:
    """The training precision both sides use on `device` (see `autocast` and `peer_args`)."""
    return "bf16 autocast, fp32 master weights" if device == "cuda" else "fp32"


def autocast(device: str):
    """bf16 autocast over fp32 master weights on GPU (as align's loops); nothing on CPU."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


def timed_trainer(trainer_cls: type, clock: StepClock, count: Callable[[dict], float]) -> tuple[type, Any]:
    """A subclass of a transformers/TRL trainer that counts the work in every micro-batch it trains on,
    and a callback that times each optimiser step (forward, backward and update, CUDA-synchronised)."""
    from transformers import TrainerCallback

    pending = [0.0]

    class Timed(trainer_cls):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, *a, **k):
            pending[0] += count(inputs)
            return super().training_step(model, inputs, *a, **k)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.stop(pending[0])
            pending[0] = 0.0

    return Timed, StepTimer()


def peer_args(device: str) -> dict[str, Any]:
    """Training-arguments shared by every TRL peer: the same optimiser, precision and no extra work
    (no checkpoints, no logging to services, no gradient checkpointing: ours does not use it either)."""
    return dict(
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=False,
        dataloader_drop_last=False,
        disable_tqdm=True,
        seed=0,
    )


def our_optimizer(model: torch.nn.Module):
    """align's AdamW (the same settings as `peer_args`), built as the loops build it."""
    from types import SimpleNamespace

    from align.train.optimization import build_optimizer

    cfg = SimpleNamespace(
        weight_decay=0.0, learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8
    )
    return build_optimizer(model, cfg)  # type: ignore[arg-type]
