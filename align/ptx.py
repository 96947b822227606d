"""The pre-training stream for the ptx term (InstructGPT's "PPO-ptx", Qwen's answer to the alignment tax).

The stream is sized and cycled independently of the PPO prompts: it has its own order, its own epoch
counter and its own position, all saved in checkpoints. The embedded default needs real text that is
on every machine without a download: it takes the docstrings of Python's standard library, which are
human-written English prose about software.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from align.data import DataError, iter_jsonl_values

# Modules with long, well-written docstrings; only those importable here are used.
STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


# One docstring in HELDOUT_BUCKETS goes to the held-out split (the alignment-tax text), the rest to the
# ptx training stream. The split is decided per docstring by a stable hash of its text, so it does not
# depend on which modules import here or in which order they are read.
HELDOUT_BUCKETS = 5
TEXT_SPLITS = ("all", "train", "heldout")


def text_split(text: str) -> str:
    """The split of one document, "heldout" or "train", from a sha256 of its text (stable across runs)."""
    digest = hashlib.sha256(("ptx-split\x1f" + text).encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0 else "train"


def stdlib_text(min_chars: int = 200, split: str = "all") -> list[str]:
    """Docstrings of standard-library modules, classes and functions, deduplicated.

    ``split``: "train" (the ptx stream), "heldout" (the alignment-tax text, disjoint from "train"), or
    "all" (both).
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"split must be one of {TEXT_SPLITS}, got {split!r}")
    return [doc for doc in _stdlib_docs(min_chars) if split == "all" or text_split(doc) == split]


@functools.lru_cache(maxsize=4)
def _stdlib_docs(min_chars: int) -> tuple[str, ...]:
    # Cached: importing and inspecting ~40 modules takes a second or two, and a run reads it more than once.
    seen, texts = set(), []
    with warnings.catch_warnings():  # some members are deprecated aliases; reading them warns
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
                members = inspect.getmembers(module)
            except ImportError:
                continue
            objects = [module] + [
                obj for _, obj in members if inspect.isclass(obj) or inspect.isfunction(obj)
            ]
            for obj in objects:
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
    return tuple(texts)


def load_text(source: str, split: str = "train") -> list[str]:
    """Texts from a JSONL file of `{"text": ...}` records (or plain .txt, one document per blank-line
    separated block), or `embedded` for the standard-library docstrings.

    ``split`` applies to `embedded` only: the ptx stream reads "train", the alignment-tax evaluation
    "heldout", so the tax is never measured on text the policy was trained on. A user file is taken whole
    (the user keeps their own held-out file).
    """
    if source == "embedded":
        return stdlib_text(split=split)
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"{source}: no such text file (use a JSONL of {{'text': ...}}, a .txt, or 'embedded')"
        )
    if path.suffix == ".txt":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:  # name the line, not a traceback
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(f"{path}:{line}: invalid UTF-8: byte 0x{data[err.start]:02x}") from None
        return [block.strip() for block in text.split("\n\n") if block.strip()]
    texts = []
    for lineno, record in iter_jsonl_values(path):  # invalid UTF-8/JSON, empty file: file:line errors
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
        texts.append(record["text"])
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
