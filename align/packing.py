"""Packing tokenised examples into fixed-budget rows, and the collators of the SFT loop.

A packed row holds several examples back to back; ``position_ids`` restart at 0 at each example.
Passed to a transformers (>= 5) model *without* an attention mask, those positions separate the examples
(a new one starts wherever the position does not go up by one), so each example attends only to itself
and its logits equal those it gets alone: the default attention (``align.attention``) runs attention per
example with no mask at all; the sdpa and eager kernels get a dense block-diagonal (T, T) mask
(``masking_utils.find_packed_sequence_indices``). Any other attention is refused with packed rows
(`check_packed_attention`, called by each stage's setup).

The forward pass must get ``use_cache=False``: with a KV cache (``config.use_cache`` is True by
default, in training mode too) transformers 5 skips that detection and silently applies one causal
mask over the whole row, so examples would attend to each other.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100

# Attention implementations whose packed rows are proven equal to each document run alone (logits and
# gradients, tests/test_matrix_attention.py) when called as the stages call them: no attention mask and
# use_cache=False. Ours separates the documents itself; sdpa/eager get transformers' block-diagonal mask.
DOCUMENT_SEPARATING = ("auto", "align_varlen", "sdpa", "eager")


def check_packed_attention(
    attn_implementation: str | None, *, packs: bool, passes_document_kwargs: bool, what: str
) -> None:
    """Refuse, before any training, packed rows under an attention not known to keep their documents apart.

    ``packs``: the stage puts several sequences in one row (``what`` says where, for the message);
    ``passes_document_kwargs``: its forward passes the rows' ``cu_seq_lens_q/k`` and ``max_length_q/k``
    (`align.attention.document_kwargs`). ``flash_attention_2`` is allowed only where they are passed (its
    guess from ``position_ids`` is not checked here); any other name (flex_attention, a hub kernel, ...) is
    unchecked and refused. Raises ValueError naming ``packing`` and ``attn_implementation``.
    """
    name = attn_implementation or "auto"
    if not packs or name in DOCUMENT_SEPARATING:
        return
    if name == "flash_attention_2" and passes_document_kwargs:
        return
    why = (
        "this stage's packed forward passes no cu_seq_lens (flash_attention_2 would guess them from "
        "position_ids in every layer, a path not checked here)"
        if name == "flash_attention_2"
        else "not checked to keep packed documents apart"
    )
    raise ValueError(
        f"packing ({what}) with attn_implementation={name}: {why}; use attn_implementation auto, sdpa "
        "or eager"
    )


def pack_examples(
    examples: Sequence[dict], max_length: int, *, shuffle_seed: int | None = None
) -> list[dict]:
    """Pack examples (``input_ids``, ``labels``) into rows of at most ``max_length`` tokens.

    Best-fit decreasing: examples are placed longest first, each into the fullest row that still has
    room (ties: the earliest row), which is deterministic and wastes little. Within a row examples keep
    their input order, and rows are ordered by their first example, so a shuffle of ``examples``
    carries over; ``shuffle_seed`` additionally shuffles the rows.

    Each row: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per example), ``seq_lens``
    and ``example_indices`` (lists). The first label of each example is set to -100: it is never a
    target on its own, but in a row it would make the previous example learn to predict it.
    Raises ValueError for an empty example or one longer than ``max_length`` (truncate first).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    lengths = []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n == 0:
            raise ValueError(f"example {i} is empty")
        if n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_length {max_length}; truncate it first "
                "(tokenize_sft does)"
            )
        if len(ex["labels"]) != n:
            raise ValueError(f"example {i}: {len(ex['labels'])} labels for {n} input ids")
        lengths.append(n)

    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            row, room = len(bins) - 1, max_length - n
        else:
            room, row = free.pop(k)
            bins[row].append(i)
            room -= n
        if room > 0:
            insort(free, (room, row))

    rows = [_make_row(examples, sorted(b)) for b in sorted(bins, key=min)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows


def _make_row(examples: Sequence[dict], indices: list[int]) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lens: list[int] = []
    for i in indices:
        ids = list(examples[i]["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(examples[i]["labels"][1:])
        position_ids += range(len(ids))
        seq_lens.append(len(ids))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "seq_lens": seq_lens,
        "example_indices": indices,
    }


def collate_padded(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: ``input_ids``, ``labels`` (-100 on padding) and
    ``attention_mask``, each (batch, max_len) int64."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows: ``input_ids``, ``labels`` (-100 on padding) and ``position_ids``, each
    (batch, max_len) int64, and deliberately no ``attention_mask`` (its absence is what makes the
    model build the per-example mask from ``position_ids``). Padding gets positions 0, 1, ... so it
    forms a segment of its own instead of extending the row's last example. Call the model with
    ``use_cache=False`` (see the module docstring)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(width - n, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
