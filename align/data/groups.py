"""Prompt groups: the pairs of one prompt trained together (`align.losses.grouped_pairwise_loss`).

`prompt_groups` groups loaded preference pairs by their ``group`` id and refuses a group that mixes prompts,
naming ``file:line`` (found again by `pair_locations`). Above `align.data.loading` and
`align.data.preference`, which it reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.data.loading import _parse_record
from align.data.records import _FORMATS, BadRecord, DataError, RecordError
from align.data.sources import _expand, _iter_raw, iter_jsonl_values
from align.tasks import write_jsonl

GROUP_MIXES_PROMPTS = "mixes prompts"


def pair_locations(source: Any, *, format: str | None = None) -> list[BadRecord]:
    """Where each pair `load_preference` returns for ``source`` comes from (``file:line``), in its order;
    the pairs of one OpenAssistant tree share their record's. Reads the source again (it is called only to
    name the records of an error); records that fail to parse are passed over, as ``skip_bad`` does."""
    fmts = _FORMATS["preference"]
    where: list[BadRecord] = []
    for item in _expand(source):
        for raw in _iter_raw(item):
            if raw.error is not None:
                continue
            try:
                _, parsed = _parse_record(raw, fmts, format)
            except (RecordError, RecursionError):
                continue
            where += [BadRecord(raw.source, raw.line, "", record=raw.record)] * len(parsed.value)
    return where


def prompt_groups(
    pairs: Sequence[dict[str, Any]], source: Any = None, *, format: str | None = None
) -> list[list[int]]:
    """The indices of ``pairs`` grouped by prompt: pairs with the same ``group`` id form one group (in the
    order their ids first appear), and a pair without one is a group of its own, in its place.

    The pairs of a group must share their prompt (and tools): a group that mixes prompts is a `DataError`
    naming ``file:line`` of each pair that differs from its group's first (``source`` and ``format``: what
    ``pairs`` was loaded from, to find the lines; without a source the pairs are named by index).
    """
    groups: list[list[int]] = []
    where_group: dict[Any, int] = {}
    mixed: list[tuple[int, int]] = []  # (pair, the first pair of its group)
    for i, pair in enumerate(pairs):
        gid = pair.get("group")
        if gid is None:
            groups.append([i])
            continue
        # 3 and "3" are different ids, as they are different JSON values.
        key = (type(gid).__name__, gid)
        if key not in where_group:
            where_group[key] = len(groups)
            groups.append([i])
            continue
        first = groups[where_group[key]][0]
        if _prompt_key(pair) != _prompt_key(pairs[first]):
            mixed.append((i, first))
        groups[where_group[key]].append(i)
    if mixed:
        where = pair_locations(source, format=format) if source is not None else []
        if len(where) != len(pairs):  # not loaded from `source` as given: name pairs by their index
            where = [BadRecord(str(source or "pairs"), None, "", record=i) for i in range(len(pairs))]
        bad = []
        for i, first in mixed:
            at = where[first]
            first_at = f"line {at.line}" if at.line is not None else f"record {at.record}"
            reason = (
                f"group {pairs[i]['group']!r} {GROUP_MIXES_PROMPTS}: this pair's prompt differs from that of "
                f"the group's first pair ({at.source} {first_at}); give each prompt its own group id"
            )
            bad.append(BadRecord(where[i].source, where[i].line, reason, record=where[i].record))
        shown = [str(b) for b in bad[:20]] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else [])
        raise DataError("\n".join([f"{len(bad)} pair(s) in a group of another prompt:", *shown]), bad)
    return groups


def _prompt_key(pair: dict[str, Any]) -> str:
    return json.dumps([pair["prompt"], pair.get("tools")], sort_keys=True, ensure_ascii=False)


def merge_grouped_pairs(paths: Sequence[str | Path], out: str | Path) -> dict[str, int]:
    """Concatenate preference JSONL files whose ``group`` ids are each file's own (one file per
    `recipes/sample_pairs.py` run or refresh round) into ``out``, regrouped so one prompt is one group.

    Each run numbers its groups from 0, so a plain ``cat`` puts two prompts under one id, which
    `prompt_groups` refuses. Here a grouped pair's id becomes ``p<k>`` for the k-th distinct prompt (and
    tools) across all files, in order of first appearance: the same prompt sampled in two rounds is one
    group, as InstructGPT trains all comparisons of a prompt together. A pair repeated exactly (same prompt,
    chosen and rejected) is kept once, so no comparison weighs double. Pairs without a group stay without.
    Every other field is kept. A line that is not JSON raises `DataError` as ``file:line: reason``; ``out``
    is written whole or not at all. Returns counts: files, read, written, duplicates, groups.
    """
    group_of_prompt: dict[str, str] = {}
    seen: set[str] = set()
    merged: list[dict[str, Any]] = []
    counts = {"files": len(paths), "read": 0, "written": 0, "duplicates": 0, "groups": 0}
    for path in paths:
        for line, record in iter_jsonl_values(path):
            counts["read"] += 1
            if not isinstance(record, dict) or "prompt" not in record:
                raise DataError(
                    f"{path}:{line}: not a pair with a prompt (merge-pairs reads {{prompt, chosen, rejected}})"
                )
            key = _prompt_key(record)
            pair_key = json.dumps([key, record.get("chosen"), record.get("rejected")], sort_keys=True)
            if pair_key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(pair_key)
            if record.get("group") is not None:
                record = {**record, "group": group_of_prompt.setdefault(key, f"p{len(group_of_prompt)}")}
            merged.append(record)
    counts["written"], counts["groups"] = len(merged), len(group_of_prompt)
    write_jsonl(out, merged)  # atomic: a temp file beside it, then a rename
    return counts
