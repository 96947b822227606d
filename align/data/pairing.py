"""Pairing sampled responses into preferences: pure pieces of `align.pipeline.sample_pairs` (no model, no files).

Distinct responses of a prompt (`merge_candidates`), labelled by a verifier/checker (`checker_value`,
`import_checker`) or a reward model, and paired (`verified_pairs`: correct against incorrect;
`scored_pairs`: by score margin), in a deterministic order that a cap cuts.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from align.config_loader import ConfigError


def normalise_text(text: str) -> str:
    """The text two responses are compared by: surrounding whitespace stripped; inside, nothing changes
    (indentation is meaning in code, case in the uppercase task)."""
    return text.strip()


@dataclasses.dataclass
class Candidate:
    """One distinct response to a prompt: its first spelling, how many samples gave it, whether any of them
    closed, and its label (`correct` for a verifier/checker, `score` for a reward model)."""

    text: str
    samples: int = 0
    closed: bool = False
    is_reference: bool = False
    value: float | None = None  # the checker's number (1/0 for the verifier)
    correct: bool | None = None
    score: float | None = None


def merge_candidates(
    texts: Sequence[str], closed: Sequence[bool], reference: str | None = None
) -> tuple[list[Candidate], list[int]]:
    """Distinct responses in first-occurrence order (the reference, when given, first), and each sample's
    index into them. A duplicate of the reference is merged into it; a candidate is closed when any of its
    samples closed (the text is the same, and one copy ended properly)."""
    cands: list[Candidate] = []
    index: dict[str, int] = {}
    if reference is not None:
        cands.append(Candidate(reference, closed=True, is_reference=True))
        index[normalise_text(reference)] = 0
    which = []
    for text, done in zip(texts, closed, strict=True):
        key = normalise_text(text)
        if key not in index:
            index[key] = len(cands)
            cands.append(Candidate(text))
        c = cands[index[key]]
        c.samples += 1
        c.closed = c.closed or bool(done)
        which.append(index[key])
    return cands, which


def correct_incorrect_pairs(n_correct: int, n_incorrect: int, cap: int | None) -> list[tuple[int, int]]:
    """Every (correct i, incorrect j) index pair, in square shells: (0,0); (0,1), (1,0), (1,1); (0,2), ...
    (sorted by max(i, j), then i, then j), cut at `cap`. A cap of k*k keeps the first k responses of each
    side against each other, so a cap spreads the pairs over distinct responses instead of pairing the first
    correct one with every incorrect one."""
    pairs = sorted(((i, j) for i in range(n_correct) for j in range(n_incorrect)), key=lambda p: (max(p), p))
    return pairs if cap is None else pairs[:cap]


def score_pairs(scores: Sequence[float], margin: float, cap: int | None) -> list[tuple[int, int]]:
    """(chosen a, rejected b) index pairs with scores[a] > scores[b] and scores[a] - scores[b] >= margin,
    largest difference first (then a, then b), cut at `cap`: a cap of 1 is the best-vs-worst pair."""
    pairs = [
        (a, b)
        for a in range(len(scores))
        for b in range(len(scores))
        if scores[a] > scores[b] and scores[a] - scores[b] >= margin
    ]
    pairs.sort(key=lambda p: (-(scores[p[0]] - scores[p[1]]), p))
    return pairs if cap is None else pairs[:cap]


def checker_value(result: Any) -> float:
    """A checker's result as a number: a bool (True = 1) or a finite real; anything else is a ValueError."""
    import numpy as np

    if isinstance(result, bool | np.bool_):
        return float(bool(result))
    if isinstance(result, numbers.Real) and math.isfinite(float(result)):
        return float(result)
    shown = repr(result)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"returned {type(result).__name__} {shown}, not a bool or a finite number")


def import_checker(spec: str) -> Callable[[Any, str], Any]:
    """The user's checker named `module:function` (`module:Class.method` too), imported by name: the module
    from sys.path or the current directory, then attribute look-ups; never evaluated from a string."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"checker: {spec!r} is not of the form module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # searched last: a checker module beside the user's data imports
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"checker: cannot import module {module_name!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"checker: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"checker: {spec} is a {type(obj).__name__}, not a function")
    return obj


def verified_pairs(cands: list[Candidate], cap: int | None) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) candidates: every correct against every incorrect, in `correct_incorrect_pairs`
    order. A reference labelled incorrect is neither (the source's own answer failing its checker)."""
    good = [c for c in cands if c.correct]
    bad = [c for c in cands if not c.correct and not c.is_reference]
    return [(good[i], bad[j]) for i, j in correct_incorrect_pairs(len(good), len(bad), cap)]


def scored_pairs(cands: list[Candidate], margin: float, cap: int | None) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) candidates by reward-model score, over the responses the RM could read."""
    readable = [c for c in cands if c.score is not None]
    return [(readable[a], readable[b]) for a, b in score_pairs([c.score for c in readable], margin, cap)]
