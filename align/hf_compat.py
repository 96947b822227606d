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
    inner = unwrap_data_parallel(model)
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return {_cache_kwarg_name(type(inner)): cache}


def unwrap_data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP-style wrappers (`.module`); a peft model stays as it is."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model
