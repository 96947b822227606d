"""align: a toolkit for aligning chat models the Qwen way (SFT, PMP + RM, PPO, DPO)."""

import importlib.metadata
import os
import re

# TRL trainers and the hub client phone home when created; a training tool should not.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

# The oldest versions align runs on, and why (pyproject.toml's floors; tests/test_dependencies.py keeps the
# two equal). Older ones fail deep inside a first forward pass, far from the cause: refuse them at import.
MINIMUM_VERSIONS: dict[str, tuple[tuple[int, int], str]] = {
    # F.scaled_dot_product_attention(enable_gqa=...) in the per-document attention (align/attention.py).
    "torch": ((2, 5), "grouped K/V in scaled_dot_product_attention (enable_gqa)"),
    # The attention-mask and cache interfaces align/attention.py and the packed log-prob pass use; 5.20 fails
    # the packed-row tests (checked: 5.20.2 fails, 5.21.1 passes the attention and shared-prompt tests).
    "transformers": ((5, 21), "the attention-mask and cache interfaces of transformers 5.21"),
}


def _major_minor(version: str) -> tuple[int, int]:
    numbers = re.findall(r"\d+", version)[:2]
    return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0


def require_versions(installed: dict[str, str]) -> None:
    """Raise ImportError naming the package, the version found and the one needed, for any installed
    version below `MINIMUM_VERSIONS` (`installed`: distribution name -> version string)."""
    for dist, (need, why) in MINIMUM_VERSIONS.items():
        have = installed.get(dist)
        if have is not None and _major_minor(have) < need:
            raise ImportError(
                f"align needs {dist}>={need[0]}.{need[1]} ({why}); found {dist} {have}. "
                f"Upgrade it: pip install '{dist}>={need[0]}.{need[1]}'"
            )


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


require_versions({dist: v for dist in MINIMUM_VERSIONS if (v := _installed(dist)) is not None})
