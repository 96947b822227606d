"""Batched generation for evaluation: ChatML prompts, left padding, KV cache, stop at ``<|im_end|>``.

Small on purpose: the rollout engine for PPO/online methods (``align/rollout.py``) is separate. Prompts are
sorted by length before batching (less padding) and results are returned in the caller's order.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

import chatml
from align.tasks import Task, verify


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less stub
        return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    # Seed sampling without disturbing the caller's global RNG state (a training loop's dropout stream).
    if seed is None:
        yield
        return
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def stop_token_ids(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` first, then the tokenizer's eos if it differs (a base model may end with that)."""
    _, im_end = chatml.chatml_token_ids(tokenizer)
    stops = [im_end]
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in stops:
        stops.append(eos)
    return stops


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts_messages: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    default_system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    show_progress: bool = True,
) -> list[list[int]]:
    """New token ids per prompt, up to and including the stop token (absent when cut by ``max_new_tokens``).

    Same arguments as ``generate``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_ids = [chatml.encode_prompt(m, tokenizer, default_system=default_system) for m in prompts_messages]
    if not prompt_ids:
        return []
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = _device_of(model)

    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "use_cache": True,
        # Explicit, so a checkpoint's generation_config (Qwen2 ships repetition_penalty 1.05, top_k 20)
        # cannot change what an evaluation measures.
        "repetition_penalty": 1.0,
    }
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)

    # Longest first: the biggest batch is met at once (memory), and similar lengths share a batch.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[int] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompt_ids), desc="generate", unit="seq", leave=False)
    t0, n_new = time.perf_counter(), 0
    try:
        with _seeded(seed, device), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                    ids = prompt_ids[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs
                )
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    # Finished rows are padded with pad_id (== eos for SmolLM2); cut at the first stop.
                    cut = next((k for k, t in enumerate(new) if t in stops), None)
                    results[i] = new if cut is None else new[: cut + 1]
                    n_new += len(results[i])
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix(tok_s=f"{n_new / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [r if r is not None else [] for r in results]


def generate(
    model: Any,
    tokenizer: Any,
    prompts_messages: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    default_system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    show_progress: bool = True,
) -> list[str]:
    """The assistant reply to each conversation (special tokens removed), in input order.

    ``prompts_messages``: conversations ending with a user turn; each is rendered with
    ``chatml.encode_prompt`` (``default_system`` prepended when it has no system turn). Greedy unless
    ``do_sample``; ``seed`` makes sampling repeatable without touching the global RNG.
    """
    ids = generate_ids(
        model,
        tokenizer,
        prompts_messages,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        default_system=default_system,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        show_progress=show_progress,
    )
    # batch_decode([]) returns [""] in transformers 5: an empty input must give an empty output.
    return tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []


def verifier_accuracy(
    model: Any, tokenizer: Any, tasks: Sequence[Task], *, n_samples: int = 8, **kw: Any
) -> dict[str, Any]:
    """Generate a reply per task and score it with the gold verifier.

    Returns ``{"accuracy", "n", "correct", "per_kind": {kind: {"accuracy", "n", "correct"}}, "samples":
    [{"kind", "prompt", "response", "answer", "ok"}, ...], "new_tokens", "seconds"}``; samples cover the
    kinds round-robin. ``kw`` goes to ``generate_ids`` (max_new_tokens, batch_size, default_system, ...).
    """
    t0 = time.perf_counter()
    ids = generate_ids(model, tokenizer, [t.messages for t in tasks], **kw)
    seconds = time.perf_counter() - t0
    responses = tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
    oks = [verify(t, r) for t, r in zip(tasks, responses, strict=True)]

    per_kind: dict[str, dict[str, Any]] = defaultdict(lambda: {"n": 0, "correct": 0})
    for t, ok in zip(tasks, oks, strict=True):
        per_kind[t.kind]["n"] += 1
        per_kind[t.kind]["correct"] += int(ok)
    for stats in per_kind.values():
        stats["accuracy"] = stats["correct"] / stats["n"]

    # A few samples, one kind after another, so the report shows each kind's behaviour.
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        by_kind[t.kind].append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n_samples, len(tasks)):
        for kind in sorted(by_kind):
            if depth < len(by_kind[kind]) and len(picked) < n_samples:
                picked.append(by_kind[kind][depth])
        depth += 1
    samples = [
        {
            "kind": tasks[i].kind,
            "prompt": tasks[i].prompt,
            "response": responses[i],
            "answer": tasks[i].answer,
            "ok": oks[i],
        }
        for i in picked
    ]
    correct = sum(oks)
    return {
        "accuracy": correct / len(tasks) if tasks else 0.0,
        "n": len(tasks),
        "correct": correct,
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "samples": samples,
        "new_tokens": sum(len(x) for x in ids),
        "seconds": seconds,
    }
