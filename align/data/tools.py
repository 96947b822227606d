"""Tool definitions and tool calls in records, normalised to the OpenAI form that chat templates read.

* tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``. A bare schema
  (``{"name", ...}``, as in LLaMA-Factory's ShareGPT ``tools`` string) is wrapped in that form, as
  LLaMA-Factory and Qwen's own function-calling examples do, so the Qwen2.5 template writes each tool
  as ``{"type": "function", "function": {...}}`` inside ``<tools></tools>``.
* calls: ``{"type": "function", "function": {"name", "arguments"}}`` with ``arguments`` an object: the
  template writes it with ``tojson``, so a JSON string (the OpenAI API's form) is decoded first, or the
  model would learn to write a quoted string of JSON.
"""

from __future__ import annotations

import json
from typing import Any

from align.data.records import RecordError, _get, _json_type


def _decode(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"'{where}': {what} is not valid JSON: {e.msg} (column {e.colno})") from None
    except (RecursionError, ValueError) as e:
        raise RecordError(f"'{where}': {what} is not valid JSON: {e}") from None


def parse_tools(value: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """A record's ``tools``: a list of schemas, or a JSON string of one; None when absent or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        value = _decode(value, where, "the tool list")
    if not isinstance(value, list):
        raise RecordError(f"'{where}' must be an array of tool definitions, found {_json_type(value)}")
    tools = []
    for i, tool in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise RecordError(f"'{here}' must be an object, found {_json_type(tool)}")
        if "function" in tool:
            _get(tool, "function", here, dict)
            _get(tool["function"], "name", f"{here}.function", str)
            tools.append(tool)
        else:
            _get(tool, "name", here, str)
            tools.append({"type": "function", "function": tool})
    return tools or None


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or ()]


def parse_call(call: Any, where: str) -> dict[str, Any]:
    """One call: ``{"name", "arguments"}`` or OpenAI's ``{"type", "function": {...}, "id"}``."""
    if not isinstance(call, dict):
        raise RecordError(f"'{where}' must be an object, found {_json_type(call)}")
    if "function" in call:
        where, call = f"{where}.function", _get(call, "function", where, dict)
    name = _get(call, "name", where, str)
    if not name.strip():
        raise RecordError(f"'{where}.name' is empty")
    args = call.get("arguments", {})
    if isinstance(args, str):
        args = _decode(args, f"{where}.arguments", "the call's arguments") if args.strip() else {}
    if not isinstance(args, dict):
        raise RecordError(f"'{where}.arguments' must be an object, found {_json_type(args)}")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def parse_calls(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """OpenAI ``tool_calls`` (a list) or a ShareGPT ``function_call`` value (a JSON string of one call or
    a list of calls)."""
    if isinstance(value, str):
        value = _decode(value, where, "the function call")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RecordError(f"'{where}' holds no call")
    return tuple(
        parse_call(c, f"{where}[{i}]" if isinstance(value, list) else where) for i, c in enumerate(calls)
    )
