"""Seeded chat tasks with checkable answers: the project's own embedded data.

Every task is a short ChatML conversation ending in a user turn, a canonical answer, and what the gold
verifier needs to check a reply. One generator feeds SFT (conversations with the answer), preference pairs
(the answer vs. a plausible wrong reply), PPO/GRPO prompts, and the reward (``verify``).

Design choices, for a 135M model on 2 CPU cores:

* prompts and answers are short (a conversation is tens of tokens) and each prompt states the strict answer
  format ("Answer with just the number."), one fixed phrasing per kind, so ~100 SFT steps can teach it;
* ``split="train"`` and ``split="heldout"`` draw from disjoint problem sets: each problem has a semantic key
  (kind + operands) and its hash decides its split, so no held-out problem, in any phrasing, is ever trained;
* ``generate_tasks(n, seed)`` is deterministic and prefix-stable (the first k of n tasks equal
  ``generate_tasks(k, seed)``), and the kinds are interleaved so any prefix is balanced across kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 5  # one hash bucket in five is held out: ~20% of every kind's problem space

NUMBER_SUFFIX = "Answer with just the number."
WORD_SUFFIX = "Reply with just the word."
YESNO_SUFFIX = "Answer with yes or no."

# Common short lowercase words, tokenised sensibly by BPE vocabularies. No palindromes (a reversed
# palindrome would equal its input, which makes "reverse" trivially satisfiable by echoing).
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "bread", "chair", "green", "house", "light",
    "music", "ocean", "paper", "plant", "queen", "robot", "snake", "table", "water", "zebra",
    "horse", "lemon", "mouse", "night", "pilot", "sugar", "train", "whale", "candy", "dream",
    "eagle", "flame", "grape", "heart", "juice", "knife", "money", "north", "olive", "piano",
    "radio", "smile", "tooth", "video", "world", "yellow", "garden", "orange", "planet", "silver",
    "winter", "summer", "forest", "bridge", "castle", "dragon", "island", "jacket", "kitten", "market",
    "pencil", "rabbit", "rocket", "window", "cat", "dog", "sun", "cup", "box", "hat",
    "pen", "car", "bus", "egg", "fox", "map", "key", "bed", "ice", "owl",
    "book", "fish", "moon", "rain", "star", "tree", "bird", "door", "milk", "lamp",
    "frog", "ship", "wind", "snow", "gold", "rose", "desk", "coin", "farm", "nest",
)  # fmt: skip

# (unit from, unit to, factor): "How many meters are in 7 kilometers?"
CONVERSIONS = (
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)

# Follow-up operations on the previous answer: (instruction, function).
FOLLOWUPS: dict[str, tuple[str, Callable[[int], int]]] = {
    "double": ("Now double it.", lambda x: 2 * x),
    "triple": ("Now triple it.", lambda x: 3 * x),
    "add10": ("Now add 10 to it.", lambda x: x + 10),
    "sub5": ("Now subtract 5 from it.", lambda x: x - 5),
    "half": ("Now halve it.", lambda x: x // 2),  # only applied to even numbers (see _followup)
}

MATCH_MODES = ("number", "exact", "yesno")


@dataclass
class Task:
    """One chat task with a checkable answer.

    ``messages`` is the conversation up to and including the final user turn (earlier assistant turns
    carry their answers); ``answer`` is the canonical reply to the final turn; ``match`` says how
    ``verify`` compares a reply ("number": integer value, "exact": case-sensitive text, "yesno":
    yes/no in any case); ``key`` identifies the problem independent of phrasing (it decides the split);
    ``meta`` holds the operands, for wrong answers and analysis.
    """

    kind: str
    messages: list[dict[str, str]]
    answer: str
    match: str
    key: str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """One line of JSON (no newline inside)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Task:
        """Inverse of ``to_json`` (also accepts the already-parsed dict)."""
        d = json.loads(data) if isinstance(data, str | bytes) else dict(data)
        return cls(
            kind=d["kind"],
            messages=[dict(m) for m in d["messages"]],
            answer=str(d["answer"]),
            match=d["match"],
            key=d["key"],
            split=d.get("split", "train"),
            meta=dict(d.get("meta", {})),
        )

    @property
    def prompt(self) -> str:
        """The final user turn's text."""
        return self.messages[-1]["content"]


# --------------------------------------------------------------------------------------------------
# Problem makers. Each takes an RNG and returns (messages, answer, match, key, meta); keys contain only
# what determines the problem, so the same problem always gets the same key and hence the same split.


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _arith(rng: random.Random, op: str) -> tuple[str, int, dict[str, Any]]:
    if op == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} + {b}?", a + b, {"a": a, "b": b}
    if op == "subtract":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)  # non-negative results: negative numbers add nothing but difficulty
        return f"What is {a} - {b}?", a - b, {"a": a, "b": b}
    if op == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", a * b, {"a": a, "b": b}
    raise ValueError(op)


def _make_arith(op: str) -> Callable[[random.Random], tuple]:
    def make(rng: random.Random) -> tuple:
        q, value, meta = _arith(rng, op)
        return [_user(f"{q} {NUMBER_SUFFIX}")], str(value), "number", f"{op}:{meta['a']}:{meta['b']}", meta

    return make


def _make_convert(rng: random.Random) -> tuple:
    src, dst, factor = rng.choice(CONVERSIONS)
    x = rng.randint(2, 12)  # >= 2 keeps the plural unit names grammatical
    meta = {"x": x, "from": src, "to": dst, "factor": factor}
    q = f"How many {dst} are in {x} {src}? {NUMBER_SUFFIX}"
    return [_user(q)], str(x * factor), "number", f"convert:{src}:{dst}:{x}", meta


def _make_uppercase(rng: random.Random) -> tuple:
    w = rng.choice(WORDS)
    q = f'Write the word "{w}" in uppercase letters. {WORD_SUFFIX}'
    return [_user(q)], w.upper(), "exact", f"uppercase:{w}", {"word": w}


def _make_reverse(rng: random.Random) -> tuple:
    w = rng.choice([w for w in WORDS if len(w) <= 5])  # reversal is hard for a small model: keep it short
    q = f'Write the word "{w}" backwards. {WORD_SUFFIX}'
    return [_user(q)], w[::-1], "exact", f"reverse:{w}", {"word": w}


def _make_count_letters(rng: random.Random) -> tuple:
    w = rng.choice(WORDS)
    q = f'How many letters are in the word "{w}"? {NUMBER_SUFFIX}'
    return [_user(q)], str(len(w)), "number", f"count_letters:{w}", {"word": w}


def _make_compare(rng: random.Random) -> tuple:
    a, b = rng.sample(range(1, 100), 2)
    relation = rng.choice(("greater", "less"))
    truth = a > b if relation == "greater" else a < b
    q = f"Is {a} {relation} than {b}? {YESNO_SUFFIX}"
    meta = {"a": a, "b": b, "relation": relation}
    return [_user(q)], "yes" if truth else "no", "yesno", f"compare:{a}:{relation}:{b}", meta


def _make_followup(rng: random.Random) -> tuple:
    op = rng.choice(("add", "subtract", "multiply"))
    q1, first, meta = _arith(rng, op)
    choices = [f for f in FOLLOWUPS if not (f == "half" and first % 2) and not (f == "sub5" and first < 5)]
    follow = rng.choice(choices)
    instruction, fn = FOLLOWUPS[follow]
    messages = [
        _user(f"{q1} {NUMBER_SUFFIX}"),
        _assistant(str(first)),
        _user(f"{instruction} {NUMBER_SUFFIX}"),
    ]
    meta = {**meta, "op": op, "first": first, "followup": follow}
    return messages, str(fn(first)), "number", f"followup:{op}:{meta['a']}:{meta['b']}:{follow}", meta


MAKERS: dict[str, Callable[[random.Random], tuple]] = {
    "add": _make_arith("add"),
    "subtract": _make_arith("subtract"),
    "multiply": _make_arith("multiply"),
    "convert": _make_convert,
    "uppercase": _make_uppercase,
    "reverse": _make_reverse,
    "count_letters": _make_count_letters,
    "compare": _make_compare,
    "followup": _make_followup,
}
KINDS: tuple[str, ...] = tuple(MAKERS)


# --------------------------------------------------------------------------------------------------
# Generation


def _int_seed(*parts: object) -> int:
    # A stable seed from parts: Python's hash() of a str changes per process (PYTHONHASHSEED).
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big")


def split_of_key(key: str) -> str:
    """The split a problem belongs to, from its key alone (so train and held-out never share a problem)."""
    return "heldout" if _int_seed("split", key) % HELDOUT_BUCKETS == 0 else "train"


def _kind_stream(kind: str, seed: int, split: str) -> Iterable[Task]:
    """Endless distinct tasks of one kind and split (repeats only once the kind's space is exhausted)."""
    rng = random.Random(_int_seed("tasks", seed, split, kind))
    make = MAKERS[kind]
    seen: set[str] = set()
    while True:
        fallback = None
        for _ in range(200):
            messages, answer, match, key, meta = make(rng)
            if split_of_key(key) != split:
                continue
            fallback = fallback or (messages, answer, match, key, meta)
            if key not in seen:
                break
        else:
            if fallback is None:  # cannot happen for the kinds above; guard against a new tiny kind
                raise RuntimeError(f"kind {kind!r} produced no {split} problem in 200 tries")
            messages, answer, match, key, meta = fallback
        seen.add(key)
        yield Task(kind=kind, messages=messages, answer=answer, match=match, key=key, split=split, meta=meta)


def _check_kinds(kinds: Sequence[str] | None) -> list[str]:
    if kinds is None:
        return list(KINDS)
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in MAKERS]
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {unknown or '(none given)'}; known: {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def generate_tasks(n: int, seed: int, kinds: Sequence[str] | None = None, split: str = "train") -> list[Task]:
    """``n`` tasks, deterministic for ``(seed, kinds, split)``; kinds interleaved in seeded order per round.

    ``split="heldout"`` draws from problems that ``split="train"`` never produces (whatever the seeds).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kinds = _check_kinds(kinds)
    streams = {k: iter(_kind_stream(k, seed, split)) for k in kinds}
    tasks: list[Task] = []
    rnd = 0
    while len(tasks) < n:
        # Each round takes one task of every kind in a shuffled order: any prefix stays balanced, and
        # task i depends only on i (prefix-stable), not on n.
        order = random.Random(_int_seed("order", seed, split, rnd)).sample(kinds, len(kinds))
        for k in order[: n - len(tasks)]:
            tasks.append(next(streams[k]))
        rnd += 1
    return tasks


# --------------------------------------------------------------------------------------------------
# Verification

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def normalise_response(response: str) -> str:
    """Strip surrounding whitespace and one trailing period (the only tolerated decorations)."""
    s = response.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def verify(task: Task, response: str) -> bool:
    """The gold verifier: does ``response`` answer ``task`` exactly (modulo whitespace and a final '.')?

    Strict about the value and the stated format: "68" passes for 68, "The answer is 68." does not; words
    are case-sensitive (the uppercase task is about case); yes/no is case-insensitive.
    """
    if not isinstance(response, str):
        return False
    s = normalise_response(response)
    if task.match == "number":
        if not _NUMBER_RE.fullmatch(s):
            return False
        return int(s.replace(",", "")) == int(task.answer)
    if task.match == "exact":
        return s == task.answer
    if task.match == "yesno":
        return s.lower() == task.answer.lower()
    raise ValueError(f"unknown match mode {task.match!r}")


def rewards(tasks: Sequence[Task], responses: Sequence[str]) -> list[float]:
    """1.0 for each verified response, else 0.0 (the gold reward for PPO/GRPO)."""
    if len(tasks) != len(responses):
        raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
    return [1.0 if verify(t, r) else 0.0 for t, r in zip(tasks, responses, strict=True)]


# --------------------------------------------------------------------------------------------------
# Wrong answers and derived data sets


def _as_rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _wrong_number(task: Task, rng: random.Random) -> list[str]:
    """Plausible mistakes for a numeric task: slips of the right operation, or the wrong operation."""
    value, m = int(task.answer), task.meta
    cands = [value + d for d in (-10, -2, -1, 1, 2, 10)]
    if task.kind == "add":
        cands += [m["a"] - m["b"], m["a"] * m["b"]]
    elif task.kind == "subtract":
        cands += [m["a"] + m["b"], m["b"] - m["a"]]
    elif task.kind == "multiply":
        cands += [m["a"] + m["b"], m["a"] * (m["b"] + 1), (m["a"] - 1) * m["b"]]
    elif task.kind == "convert":
        other = [f for f in (10, 100, 1000, 60, 24, 7) if f != m["factor"]]
        cands += [m["x"], m["x"] * rng.choice(other)]
    elif task.kind == "count_letters":
        cands = [value - 1, value + 1, value + 2]
    elif task.kind == "followup":
        cands += [m["first"]]  # forgot to apply the follow-up
    return [str(c) for c in cands if c >= 0 and c != value]


def _wrong_word(task: Task, rng: random.Random) -> list[str]:
    w = task.meta["word"]
    if task.kind == "uppercase":
        cands = [w, w.capitalize(), w.upper()[:-1], w.upper() + w.upper()[-1]]
    else:  # reverse
        r = w[::-1]
        cands = [w, r[1:] + r[0], r.upper(), r[:-1]]
        if len(r) >= 3:  # two neighbouring letters swapped
            i = rng.randrange(len(r) - 1)
            cands.append(r[:i] + r[i + 1] + r[i] + r[i + 2 :])
    return cands


def wrong_answer(
    task: Task, rng: random.Random | int | None = None, *, format_error_rate: float = 0.0
) -> str:
    """A plausible reply that ``verify`` rejects: a wrong value in the right format.

    With probability ``format_error_rate`` it is instead the right value in the wrong format (a sentence),
    for preference data that should also teach the format.
    """
    rng = _as_rng(rng)
    if format_error_rate > 0 and rng.random() < format_error_rate:
        wrapped = f"The answer is {task.answer}."
        if not verify(task, wrapped):
            return wrapped
    if task.match == "yesno":
        cands = ["no" if task.answer.lower() == "yes" else "yes"]
    elif task.match == "number":
        cands = _wrong_number(task, rng)
    else:
        cands = _wrong_word(task, rng)
    cands = [c for c in dict.fromkeys(cands) if not verify(task, c)]
    if not cands:  # every task kind has candidates; this is a last-resort guarantee
        cands = [task.answer + ("0" if task.match == "number" else "x")]
    return rng.choice(cands)


def prompts(tasks: Iterable[Task]) -> list[list[dict[str, str]]]:
    """The prompt conversations (copies), for generation and RL."""
    return [[dict(m) for m in t.messages] for t in tasks]


def sft_conversations(tasks: Iterable[Task]) -> list[list[dict[str, str]]]:
    """Each task's messages followed by its canonical assistant answer."""
    return [[*(dict(m) for m in t.messages), _assistant(t.answer)] for t in tasks]


def preference_pairs(
    tasks: Iterable[Task], seed: int, *, format_error_rate: float = 0.0
) -> list[dict[str, Any]]:
    """``{"prompt": messages, "chosen": answer, "rejected": wrong reply}`` per task, deterministic in seed."""
    rng = random.Random(_int_seed("pairs", seed))
    return [
        {
            "prompt": [dict(m) for m in t.messages],
            "chosen": t.answer,
            "rejected": wrong_answer(t, rng, format_error_rate=format_error_rate),
        }
        for t in tasks
    ]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSONL atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: a fresh file of our own; mode 0o666 less the umask, as open() gives (mkstemp's would be 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_sft_jsonl(
    path: str | os.PathLike, n: int, seed: int, kinds: Sequence[str] | None = None, split: str = "train"
) -> Path:
    """Write ``n`` SFT conversations as OpenAI-style ``{"messages": [...]}`` JSONL, atomically."""
    convs = sft_conversations(generate_tasks(n, seed, kinds=kinds, split=split))
    return write_jsonl(path, ({"messages": c} for c in convs))


def write_preference_jsonl(
    path: str | os.PathLike,
    n: int,
    seed: int,
    kinds: Sequence[str] | None = None,
    split: str = "train",
    *,
    format_error_rate: float = 0.0,
) -> Path:
    """Write ``n`` ``{"prompt", "chosen", "rejected"}`` pairs as JSONL, atomically."""
    pairs = preference_pairs(
        generate_tasks(n, seed, kinds=kinds, split=split), seed, format_error_rate=format_error_rate
    )
    return write_jsonl(path, pairs)


def write_tasks_jsonl(path: str | os.PathLike, tasks: Iterable[Task]) -> Path:
    """Write tasks (with everything ``verify`` needs) as JSONL, atomically."""
    return write_jsonl(path, (t.to_dict() for t in tasks))


def read_tasks_jsonl(path: str | os.PathLike) -> list[Task]:
    """Read tasks written by ``write_tasks_jsonl``."""
    with open(path, encoding="utf-8") as fh:
        return [Task.from_json(line) for line in fh if line.strip()]
