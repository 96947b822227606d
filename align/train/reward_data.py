"""The reward-model stage's data: embedded pairs, the training/held-out split, named held-out sets, and
tokenised pairs merged into prompt groups (``pair_grouping: prompt``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from accelerate import PartialState

from align.config import RMConfig
from align.data import DataReport, load_preference
from align.data.groups import prompt_groups
from align.train.process import RunSetupError


def embedded_pairs(
    n: int, seed: int, *, split: str, label_noise: float = 0.0, format_error_rate: float = 0.0
) -> list[dict[str, Any]]:
    """Generated comparisons (`align.tasks.preference_pairs`): the right answer against a plausible wrong
    one; with ``label_noise`` that share of pairs is swapped (chosen and rejected), seeded."""
    from align.tasks import generate_tasks, preference_pairs

    pairs = preference_pairs(generate_tasks(n, seed, split=split), seed, format_error_rate=format_error_rate)
    rng = random.Random(f"label-noise:{seed}:{split}")
    for pair in pairs:
        if rng.random() < label_noise:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    return pairs


def _write_embedded(path: Path, pairs: list[dict[str, Any]], is_main: bool) -> str:
    from align.tasks import write_jsonl

    if is_main and not path.exists():
        write_jsonl(path, pairs)
    PartialState().wait_for_everyone()
    return str(path)


def load_rm_data(
    cfg: RMConfig, out: Path, is_main: bool
) -> tuple[list[dict], DataReport, str, list[dict], str | None]:
    """(train pairs, their report, source, held-out pairs, held-out name)."""
    source = cfg.dataset
    if source == "embedded":
        if cfg.stage == "pmp":
            # PMP: a large comparison set with label noise (the "web" comparisons of the Qwen report).
            pairs = embedded_pairs(
                cfg.embedded_pmp_pairs,
                cfg.seed,
                split="train",
                label_noise=cfg.embedded_label_noise,
                format_error_rate=cfg.embedded_format_error_rate,
            )
        else:
            # RM: a smaller clean set on other problems (another seed).
            pairs = embedded_pairs(
                cfg.embedded_rm_pairs,
                cfg.seed + 1,
                split="train",
                format_error_rate=cfg.embedded_format_error_rate,
            )
        source = _write_embedded(out / "data" / "train.jsonl", pairs, is_main)
    rejects = out / "rejects.jsonl" if cfg.skip_bad else None
    pairs, report = load_preference(
        source, skip_bad=cfg.skip_bad, rejects_path=rejects, format=cfg.dataset_format
    )
    if cfg.pair_grouping == "prompt":
        prompt_groups(pairs, source, format=cfg.dataset_format)  # a group mixing prompts: file:line
    eval_pairs: list[dict] = []
    eval_name: str | None = None
    eval_source = cfg.eval_dataset
    if eval_source is None and cfg.dataset == "embedded":
        eval_source = "embedded"
    if eval_source == "embedded":
        held = embedded_pairs(
            cfg.embedded_eval_pairs,
            cfg.seed,
            split="heldout",
            format_error_rate=cfg.embedded_format_error_rate,
        )
        eval_source = _write_embedded(out / "data" / "heldout.jsonl", held, is_main)
        eval_name = "heldout"
    if eval_source is not None:
        eval_pairs, _ = load_preference(eval_source, skip_bad=cfg.skip_bad, format=cfg.dataset_format)
        eval_name = eval_name or dataset_name(eval_source)
    elif cfg.eval_fraction > 0:
        if not 0 < cfg.eval_fraction < 1:
            raise RunSetupError(f"eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
        # Whole prompt groups under grouping (a held-out pair must not share its prompt with a trained one);
        # single pairs otherwise, the same draw as before grouping existed.
        units = prompt_groups(pairs) if cfg.pair_grouping == "prompt" else [[i] for i in range(len(pairs))]
        order = list(range(len(units)))
        random.Random(f"eval-split:{cfg.seed}").shuffle(order)
        k = max(1, round(cfg.eval_fraction * len(units)))
        held_idx = {i for unit in order[:k] for i in units[unit]}
        eval_pairs = [p for i, p in enumerate(pairs) if i in held_idx]
        pairs = [p for i, p in enumerate(pairs) if i not in held_idx]
        eval_name = "heldout"
    return pairs, report, source, eval_pairs, eval_name


def dataset_name(source: str) -> str:
    """A short name for a data file: its name without .jsonl/.json/.gz."""
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or str(source)


def eval_set_specs(entries: list[str], taken: str | None = None) -> list[tuple[str, str]]:
    """(name, path) of each `eval_datasets` entry: ``name=path``, or a path named by `dataset_name`.

    ``taken``: the main held-out set's name. Raises RunSetupError for an empty name or path, or two sets
    of one name (two sample_pairs outputs are both ``pairs``: name them)."""
    specs: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or Path(entry).exists():  # a path that itself holds '=' stays a path
            name, path = dataset_name(entry), entry
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise RunSetupError(f"eval_datasets: {entry!r} is not `name=path` or a path")
        specs.append((name, path))
    names = [taken, *(n for n, _ in specs)] if taken else [n for n, _ in specs]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            paths = [p for n, p in specs if n == name]
            raise RunSetupError(
                f"eval_datasets: {names.count(name)} held-out sets are named {name!r} ({', '.join(paths)}"
                f"{' and the main held-out set' if name == taken else ''}); name each, e.g. "
                f"{name}2={paths[-1]}"
            )
    return specs


def load_eval_sets(cfg: RMConfig, taken: str | None = None) -> dict[str, list[dict]]:
    """The pairs of each `eval_datasets` set, by name (a `group` field is read and ignored)."""
    return {
        name: load_preference(path, skip_bad=cfg.skip_bad, format=cfg.dataset_format)[0]
        for name, path in eval_set_specs(cfg.eval_datasets, taken)
    }


def group_examples(
    examples: list[dict[str, Any]], groups: list[list[int]]
) -> tuple[list[dict[str, Any]], int]:
    """Tokenised pairs merged into prompt groups (`prompt_groups` indices): each group's distinct sequences
    once, in first-seen order, with each comparison's two positions among them.

    Returns (groups, pairs left out): a group is ``{"seqs": [ids, ...], "chosen_index": [...],
    "rejected_index": [...], "margin": [float | None, ...]}``; a pair with an unclosed side is left out (as
    in the per-pair path) and a group left with no pair is dropped."""
    out: list[dict[str, Any]] = []
    left_out = 0
    for members in groups:
        seqs: list[list[int]] = []
        position: dict[tuple[int, ...], int] = {}
        group: dict[str, list] = {"chosen_index": [], "rejected_index": [], "margin": []}
        for i in members:
            ex = examples[i]
            if not (ex["chosen_closed"] and ex["rejected_closed"]):
                left_out += 1
                continue
            for side in ("chosen", "rejected"):
                ids = ex[f"{side}_ids"]
                key = tuple(ids)
                if key not in position:
                    position[key] = len(seqs)
                    seqs.append(ids)
                group[f"{side}_index"].append(position[key])
            group["margin"].append(ex.get("margin"))
        if group["chosen_index"]:
            out.append({"seqs": seqs, **group})
    return out, left_out
