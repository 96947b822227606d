"""Conversation data: loading, format detection, validation and tokenisation, plus a `validate` CLI.

Records come from JSONL / JSON files (optionally gzip-compressed), directories of them, or `datasets`
objects. Each record is recognised as one of several formats (OpenAI messages, ShareGPT, Alpaca,
HH-RLHF transcripts), normalised to a list of ``{"role", "content"}`` turns and checked. A bad record
is never dropped silently: it becomes a `BadRecord` (``file:line: reason``) that either stops the load
(`DataError`) or, with ``skip_bad``, is counted in the `DataReport` and written to a rejects file.

Parsers are registered per data *kind* (``"sft"`` conversations, ``"preference"`` pairs) so that
every kind shares the same reading, error-reporting and accounting machinery via `register_format`.

    python -m align.data validate data.jsonl --kind sft --tokenizer qwen --max-length 2048
    python -m align.data validate pairs.jsonl --kind preference

Modules: `records` (errors, report, format registry, field checks), `conversations` (SFT formats),
`preference` (pair formats), `sources` (file and data-set readers), `loading` (detect, parse,
account), `tokenize` (ChatML ids and loss masks), `cli` (``python -m align.data``).
"""

from align.data.cli import main
from align.data.conversations import SHAREGPT_ROLES, TRAILING_NOTE, check_conversation
from align.data.loading import load_preference, load_records, load_sft
from align.data.preference import (
    EMPTY_RESPONSE_NOTE,
    IDENTICAL_REASON,
    OASST_PAIRS_NOTE,
    OASST_SAME_TEXT_NOTE,
    OASST_TIE_NOTE,
    make_pair,
)
from align.data.records import (
    _FORMATS,
    ROLES,
    BadRecord,
    DataError,
    DataReport,
    DataSourceError,
    Parsed,
    RecordError,
    RecordFormat,
    TokenStats,
    formats,
    register_format,
)
from align.data.sources import JSON_SUFFIXES, JSONL_SUFFIXES, WRAPPER_KEYS, iter_jsonl_values
from align.data.tokenize import (
    PROGRESS_MIN_RECORDS,
    UNCLOSED_NOTE,
    encode_scored,
    end_token_id,
    tokenize_preference,
    tokenize_sft,
)

__all__ = [
    "_FORMATS",
    "EMPTY_RESPONSE_NOTE",
    "IDENTICAL_REASON",
    "JSON_SUFFIXES",
    "JSONL_SUFFIXES",
    "OASST_PAIRS_NOTE",
    "OASST_SAME_TEXT_NOTE",
    "OASST_TIE_NOTE",
    "PROGRESS_MIN_RECORDS",
    "ROLES",
    "SHAREGPT_ROLES",
    "TRAILING_NOTE",
    "UNCLOSED_NOTE",
    "WRAPPER_KEYS",
    "BadRecord",
    "DataError",
    "DataReport",
    "DataSourceError",
    "Parsed",
    "RecordError",
    "RecordFormat",
    "TokenStats",
    "check_conversation",
    "encode_scored",
    "end_token_id",
    "formats",
    "iter_jsonl_values",
    "load_preference",
    "load_records",
    "load_sft",
    "main",
    "make_pair",
    "register_format",
    "tokenize_preference",
    "tokenize_sft",
]
