"""The shared shape of a recipe script: parse `[--config FILE] [key=value ...]`, run, report.

Errors a user can fix (a bad config key, malformed data, batch sizes that do not divide) print as one
clear line and exit with status 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from align.checkpoint import CheckpointError
from align.config_loader import ConfigError, parse_cli
from align.data import DataError
from align.train.process import RunSetupError

C = TypeVar("C")
USER_ERRORS = (ConfigError, DataError, RunSetupError, CheckpointError, FileNotFoundError)


def run_recipe(
    config_cls: type[C], run: Callable[[C], dict[str, Any]], argv: Sequence[str] | None = None, prog: str = ""
) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_cli(config_cls, argv, prog=prog)
        summary = run(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.get("output_dir"):
        print(f"\nmodel:   {summary.get('final_model', '-')}\nmetrics: {summary.get('metrics', '-')}")
        print(
            json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, default=str)
        )
    return 0
