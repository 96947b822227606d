"""Loading a config: defaults < YAML file < `key=value` overrides, and `--help` for a recipe.

Loading is strict: an unknown key or a value of the wrong type is a `ConfigError` that names the key,
because a typo in a sweep (`kl_coeff=0.1`) that silently does nothing wastes a whole run. Values are
parsed with `yaml.safe_load` only; nothing from a config is ever evaluated. The configs themselves (each
stage's keys) are in `align.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


C = TypeVar("C")


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its documentation line, for `--help` output."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string; users write it so
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # `dataset=123` from YAML
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        # YAML scalars: 1e-4, true, null, [a, b]. safe_load never constructs Python objects.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make `cls` from a mapping, refusing unknown keys and wrong types with the key named."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")
        kwargs[key] = _coerce(f"{source}: {key}", value, hints[key])
    return cls(**kwargs)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Defaults, then the YAML file (if any), then `key=value` overrides, strictly checked."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with path.open(encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        build_config(cls, loaded, source=str(path))  # name the file in errors before merging
        values.update(loaded)
    for item in overrides:
        key, value = _parse_override(item)
        build_config(cls, {key: value}, source="command line")
        values[key] = value
    return build_config(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_cli(cls: type[C], argv: Sequence[str], prog: str) -> C:
    """`[--config FILE] [key=value ...]`, with `--help` listing every key and its meaning."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(cls.__doc__ or "")
        + "\n\nkeys (override with key=value):\n"
        + "\n".join(f"  {k:<26} {h}" for k, h in field_help(cls).items()),
    )
    parser.add_argument("--config", help="YAML file with key: value pairs")
    parser.add_argument("overrides", nargs="*", help="key=value pairs applied after the file")
    args = parser.parse_args(list(argv))
    return load_config(cls, args.config, args.overrides)
