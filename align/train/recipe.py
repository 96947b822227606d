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


def close_process_group() -> None:
    """End a multi-process run in order: every rank waits for the others, then the process group is
    destroyed (PyTorch's documented teardown). Left to interpreter exit, gloo's threads can abort a rank
    ("terminate called without an active exception"; pytorch/pytorch#190489): seen twice here in 2-process
    CPU runs under load, after the work was written. Anything that runs align's loops in several processes
    outside `run_recipe` (a user's script, the test workers) ends with this too. A one-process group (tests
    in-process) is left alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


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
    close_process_group()
    if summary.get("output_dir"):
        print(f"\nmodel:   {summary.get('final_model', '-')}\nmetrics: {summary.get('metrics', '-')}")
        print(
            json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, default=str)
        )
    return 0
