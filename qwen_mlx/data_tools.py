"""Function calling in datasets: tool lists and tool calls in their one normalized shape.

Datasets spell these several ways: OpenAI (and mlx-lm) put ``tools`` beside ``messages`` and
``tool_calls`` in assistant turns with the arguments as a JSON string; LLaMA-Factory's sharegpt
keeps ``tools`` as a JSON string and writes each call as a ``function_call`` turn holding
``{"name", "arguments"}``. All become what Qwen's chat template renders:
``tools = [{"type": "function", "function": {"name", "description", "parameters"}}]`` and
``tool_calls = [{"type": "function", "function": {"name", "arguments": {…}}}]``, the arguments
an object, since the template writes them with ``tojson`` (a string would be quoted twice).
"""

from __future__ import annotations

import json
from typing import Any


class RecordError(ValueError):
    """One record is unusable; the message is the reason shown to the user."""


JSON_TYPES = {dict: "an object", list: "a list", str: "text", bool: "true/false"}


def json_type(value: Any) -> str:
    """What a JSON value is, in the words of the file's author."""
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return JSON_TYPES.get(type(value), type(value).__name__)


def _parsed(value: Any, what: str) -> Any:
    """``value``, or what the JSON text in it holds (tools and arguments come both ways)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RecordError(f"{what}: not valid JSON ({err.msg} at column {err.colno})") from None


def _function_name(fn: Any, what: str) -> str:
    name = fn.get("name") if isinstance(fn, dict) else None
    if not (isinstance(name, str) and name.strip()):
        raise RecordError(f"{what}: expected a function with a name, got {json_type(fn)}")
    return name


def tool_list(value: Any, what: str = "tools") -> list[dict]:
    """A record's tools (a list, or JSON text of one) as OpenAI-style function entries."""
    tools = _parsed(value, what)
    if not isinstance(tools, list):
        raise RecordError(f"{what}: expected a list of functions, got {json_type(tools)}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else tool
        _function_name(fn, f"{what}[{i}]")
        out.append({"type": "function", "function": fn})
    return out


def _arguments(value: Any, what: str) -> dict:
    args = _parsed({} if value is None else value, what)
    if not isinstance(args, dict):
        raise RecordError(f"{what}: expected an object of arguments, got {json_type(args)}")
    return args


def _call(call: Any, what: str) -> dict:
    fn = call.get("function", call) if isinstance(call, dict) else call
    name = _function_name(fn, what)
    args = _arguments(fn.get("arguments"), f"{what}.arguments")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def tool_calls(value: Any, what: str) -> list[dict]:
    """Calls as OpenAI writes them (a list), or one call or a list of them as JSON text
    (LLaMA-Factory's ``function_call`` turn, OpenAI's older ``function_call`` field)."""
    calls = _parsed(value, what)
    if isinstance(calls, dict):
        calls = [calls]
    if not (isinstance(calls, list) and calls):
        raise RecordError(f"{what}: expected a list of tool calls, got {json_type(calls)}")
    return [_call(call, f"{what}[{i}]") for i, call in enumerate(calls)]
