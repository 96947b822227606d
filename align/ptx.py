"""The pre-training stream for the ptx term (InstructGPT's "PPO-ptx", Qwen's answer to the alignment tax).

The stream is sized and cycled independently of the PPO prompts: it has its own order, its own epoch
counter and its own position, all saved in checkpoints. The embedded default needs real text that is
on every machine without a download: it takes the docstrings of Python's standard library, which are
human-written English prose about software.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from align.data import DataError

# Modules with long, well-written docstrings; only those importable here are used.
STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def stdlib_text(min_chars: int = 200) -> list[str]:
    """Docstrings of standard-library modules, classes and functions, deduplicated."""
    seen, texts = set(), []
    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():  # some members are deprecated aliases; reading them warns
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
                members = inspect.getmembers(module)
        except ImportError:
            continue
        objects = [module] + [obj for _, obj in members if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def load_text(source: str) -> list[str]:
    """Texts from a JSONL file of `{"text": ...}` records (or plain .txt, one document per blank-line
    separated block), or `embedded` for the standard-library docstrings."""
    if source == "embedded":
        return stdlib_text()
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"{source}: no such text file (use a JSONL of {{'text': ...}}, a .txt, or 'embedded')"
        )
    if path.suffix == ".txt":
        return [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    texts = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
            texts.append(record["text"])
    if not texts:
        raise DataError(f"{path}: empty, no records")
    return texts


def chunk_tokens(texts: list[str], tokenizer: Any, length: int) -> list[list[int]]:
    """Tokenise and cut the concatenated texts (separated by eos) into rows of `length` tokens."""
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for text in texts:
        flat.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            flat.append(eos)
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, length)]


class PtxStream:
    """Endless batches of pre-training rows with its own seeded order and checkpointable position."""

    def __init__(self, rows: list[list[int]], batch_size: int, seed: int) -> None:
        if not rows:
            raise DataError("the ptx stream is empty: give more text or a shorter ptx_max_length")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.position = 0  # rows consumed so far, over all epochs

    def _row_index(self, k: int) -> int:
        epoch, offset = divmod(k, len(self.rows))
        order = torch.randperm(
            len(self.rows), generator=torch.Generator().manual_seed(self.seed + 7919 * epoch)
        )
        return int(order[offset])

    def next_batch(self) -> list[list[int]]:
        batch = [self.rows[self._row_index(self.position + i)] for i in range(self.batch_size)]
        self.position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
