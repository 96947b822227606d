"""The engine registry: a config's ``rollout_engine`` name to its class.

Its own module because the engines import :mod:`align.rollout.batch` (the shared batching machinery), so the
registry cannot live there without an import circle.
"""

from __future__ import annotations

from typing import Any

from align.rollout.batch import HFRolloutEngine
from align.rollout.manual import ManualRolloutEngine


def engine_class(name: str) -> type:
    """The engine class for a config's ``rollout_engine``: ``hf``, ``manual``, ``static`` or ``vllm``.

    ``static`` (:mod:`align.rollout.static`) and ``vllm`` (:mod:`align.rollout.vllm`, optional dependency)
    are imported only when asked for.
    """
    if name == "hf":
        return HFRolloutEngine
    if name == "manual":
        return ManualRolloutEngine
    if name == "static":
        from align.rollout.static import StaticRolloutEngine

        return StaticRolloutEngine
    if name == "vllm":
        from align.rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine
    raise ValueError(f"unknown rollout engine {name!r} (hf, manual, static, vllm)")


def engine_options(cfg: Any) -> dict[str, Any]:
    """The engine constructor's extra arguments from an RL config (``rollout_engine``, ``rollout_compile``,
    ``rollout_sharded``: lockstep decoding of a sharded policy, :mod:`align.rollout.lockstep`)."""
    compile = getattr(cfg, "rollout_compile", "auto")
    options: dict[str, Any] = (
        {"lockstep": True} if getattr(cfg, "rollout_sharded", "unshard") == "lockstep" else {}
    )
    if cfg.rollout_engine == "static":
        return {"compile": compile, **options}
    if compile == "on":
        raise ValueError(f"rollout_compile=on needs rollout_engine=static, not {cfg.rollout_engine}")
    return options
