"""Batched generation for evaluation: ChatML prompts, left padding, KV cache, stop at ``<|im_end|>``.

A thin front over the rollout engine (``align/rollout/batch.py``), so evaluation and PPO sample through one path:
conversations in, text out, no log-probs. Prompts are sorted by length before batching (less padding) and
results are returned in the caller's order.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import chatml
from align.rollout.batch import HFRolloutEngine, stop_token_ids
from align.tasks import Task, verify

__all__ = ["generate", "generate_ids", "stop_token_ids", "verifier_accuracy"]


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
    engine = HFRolloutEngine(
        model, tokenizer, batch_size=batch_size, logprobs="none", show_progress=show_progress
    )
    batch = engine.generate(
        prompt_ids,
        n=1,
        max_new_tokens=max_new_tokens,
        # The engine's greedy is temperature 0.
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        seed=seed,
    )
    return batch.responses()


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

    Returns ``{"accuracy", "n", "correct", "oks" (per task, in order), "per_kind": {kind: {"accuracy", "n", "correct"}}, "samples":
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
        "oks": oks,
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "samples": samples,
        "new_tokens": sum(len(x) for x in ids),
        "seconds": seconds,
    }
