"""The one place that knows which transformers names changed between the versions we support."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _cache_kwarg_name(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model.forward``: transformers 5.24 renamed ``past_key_values`` to ``cache``
    (the old name warns and goes in 5.40); earlier versions know only ``past_key_values``. A peft or
    data-parallel wrapper forwards keywords to the model inside, so that model's signature decides."""
    inner = model
    while True:
        get_base = getattr(inner, "get_base_model", None)
        nxt = get_base() if callable(get_base) else getattr(inner, "module", None)
        if not isinstance(nxt, torch.nn.Module) or nxt is inner:
            break
        inner = nxt
    return {_cache_kwarg_name(type(inner)): cache}
