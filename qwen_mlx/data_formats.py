"""Record formats: one raw record, in any supported shape, → one normalized record.

A normalized record is ``{"messages": [...]}`` (system/user/assistant/tool turns, the last one
from the assistant; maybe ``tools`` beside them) or, for domain text meant for continued
pre-training, ``{"text": ...}``. The format is told by the record's keys (``FORMATS``). A record
that cannot be read raises :class:`RecordError` with the field at fault and, when a field is
missing, the format the record was read as and the keys it has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from qwen_mlx.data_tools import RecordError, json_type, tool_calls, tool_list

Messages = list[dict[str, Any]]

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory: the assistant calls a tool
    "observation": "tool",  # LLaMA-Factory: what the tool returned
    "tool": "tool",
}
MEDIA_KEYS = ("images", "videos", "audios")
MEDIA_PARTS = {"image", "image_url", "input_image", "video", "video_url", "audio", "input_audio"}
NOT_TEXT = "images, video and audio are not supported (a text-only model); the record is skipped"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# ---------------------------------------------------------------- fields


def text(value: Any, what: str) -> str:
    """Message content as a string; lists of text parts (OpenAI, LLaMA-Factory) are joined."""
    if value is None:
        raise RecordError(f"{what}: missing")
    if isinstance(value, list):
        value = _joined_parts(value, what)
    if not isinstance(value, str):
        raise RecordError(f"{what}: expected text, got {json_type(value)}")
    if not value.strip():
        raise RecordError(f"{what}: empty text")
    return value


def _joined_parts(parts: list, what: str) -> str:
    out = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise RecordError(f"{what}[{i}]: a {kind} part: {NOT_TEXT}")
        if kind != "text":
            raise RecordError(f'{what}[{i}]: expected a part {{"type": "text", "text": …}}')
        # OpenAI keeps the words under "text", LLaMA-Factory's v1 format under "value".
        out.append(text(part.get("text", part.get("value")), f"{what}[{i}]"))
    return "".join(out)


def _weight(turn: dict, role: str, what: str) -> dict:
    """OpenAI's per-turn ``weight`` (LLaMA-Factory v1: ``loss_weight``): 0 keeps the turn as
    context without training on it."""
    key = next((k for k in ("weight", "loss_weight") if k in turn), None)
    if key is None:
        return {}
    weight = turn[key]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{what}.{key}: expected 0 (context only) or 1 (trained), got {weight!r}")
    if role != "assistant":
        if key == "loss_weight" and weight == 0:  # what v1 writes on every other turn
            return {}
        raise RecordError(f"{what}.{key}: only assistant turns have a weight")
    return {"weight": 0} if weight == 0 else {}


# Where the reasoning of an assistant turn is kept: OpenAI's ``reasoning_content``, the short
# ``reasoning``, Easy Dataset's ``thinking`` (null when it has none).
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")


def _v1_parts(content: Any, what: str) -> tuple[Any, list[str], list[Any]]:
    """LLaMA-Factory v1 content parts taken apart: the text parts (None when there are
    none), the ``reasoning`` parts' texts and the ``tool_call`` parts' values."""
    if not isinstance(content, list):
        return content, [], []
    texts, reasoning, calls = [], [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "reasoning":
            reasoning.append(text(part.get("value", part.get("text")), f"{what}[{i}]"))
        elif kind == "tool_call":
            calls.append((part.get("value"), f"{what}[{i}].value"))
        else:
            texts.append(part)
    return texts or None, reasoning, calls


def _reasoning(turn: dict, parts: list[str], what: str) -> dict:
    given = [k for k in REASONING_KEYS if turn.get(k) not in (None, "")]
    if len(given) + bool(parts) > 1:
        found = ", ".join(given + ["reasoning parts"] * bool(parts))
        raise RecordError(f"{what}: reasoning given twice ({found}); keep one")
    if parts:
        return {"reasoning_content": "\n".join(parts)}
    if given:
        return {"reasoning_content": text(turn[given[0]], f"{what}.{given[0]}")}
    return {}


def _assistant(turn: dict, what: str) -> dict:
    content, reasoning, call_parts = _v1_parts(turn.get("content"), f"{what}.content")
    calls = turn.get("tool_calls") or turn.get("function_call")  # the latter: OpenAI's older name
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    if (calls is None and not call_parts) or content not in (None, ""):
        message["content"] = text(content, f"{what}.content")
    if calls is not None and call_parts:
        raise RecordError(f"{what}: tool calls given twice (tool_calls and tool_call parts)")
    if calls is not None:
        message["tool_calls"] = tool_calls(calls, f"{what}.tool_calls")
    if call_parts:  # LLaMA-Factory v1: each part holds one call as JSON text
        message["tool_calls"] = [c for value, at in call_parts for c in tool_calls(value, at)]
    # Thinking models (Qwen3) train it inside the think block.
    message.update(_reasoning(turn, reasoning, what))
    return {**message, **_weight(turn, "assistant", what)}


def _chat_turn(turn: Any, what: str) -> dict | None:
    if not isinstance(turn, dict):
        raise RecordError(f"{what}: expected an object with role and content")
    role = {"function": "tool"}.get(turn.get("role"), turn.get("role"))
    if role == "assistant":
        return _assistant(turn, what)
    if role not in ("system", "user", "tool"):
        raise RecordError(f"{what}: unsupported role {turn.get('role')!r}")
    if role == "system" and turn.get("content") == "":
        return None  # an empty system prompt (Easy Dataset writes one when none was set)
    return {
        "role": role,
        "content": text(turn.get("content"), f"{what}.content"),
        **_weight(turn, role, what),
    }


# ---------------------------------------------------------------- formats


def _system(obj: dict) -> Messages:
    """A top-level ``system`` beside the turns (LLaMA-Factory, many exports)."""
    if obj.get("system") in (None, ""):
        return []
    return [{"role": "system", "content": text(obj["system"], "system")}]


def _turn_list(obj: dict, key: str) -> list:
    """The turns under ``key``: a list, or JSON text of one (a CSV cell holds them so, as in
    Easy Dataset's CSV exports)."""
    turns = obj[key]
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise RecordError(f"{key}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(turns, list):
        raise RecordError(f"{key}: expected a list, got {json_type(turns)}")
    return turns


def _with_tools(obj: dict, messages: Messages) -> dict:
    record: dict[str, Any] = {"messages": messages}
    tools = obj.get("tools", obj.get("functions"))
    if tools not in (None, "", []):
        record["tools"] = tool_list(tools, "tools" if "tools" in obj else "functions")
    return record


def _from_messages(obj: dict) -> dict:
    turns = [_chat_turn(t, f"messages[{i}]") for i, t in enumerate(_turn_list(obj, "messages"))]
    turns = [t for t in turns if t is not None]
    system = _system(obj)
    if system and turns and turns[0]["role"] == "system":
        if turns[0]["content"] != system[0]["content"]:
            raise RecordError("system: given beside messages that start with another system turn")
        system = []
    return _with_tools(obj, system + turns)


def _sharegpt_turn(turn: Any, what: str) -> dict:
    if not isinstance(turn, dict):
        raise RecordError(f"{what}: expected an object with from and value")
    kind = str(turn.get("from")).lower()
    role = SHAREGPT_ROLES.get(kind)
    if role is None:
        raise RecordError(f"{what}: unsupported role {turn.get('from')!r}")
    if kind == "function_call":
        calls = tool_calls(turn.get("value"), f"{what}.value")
        return {"role": "assistant", "content": "", "tool_calls": calls}
    return {"role": role, "content": text(turn.get("value"), f"{what}.value")}


def _from_sharegpt(obj: dict) -> dict:
    turns = _turn_list(obj, "conversations")
    messages = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    return _with_tools(obj, _system(obj) + messages)


def _pairs(pairs: list, what: str, keys: tuple[str, str] | None = None) -> Messages:
    """[question, answer] pairs (``history``), or objects with ``keys`` (Firefly's)."""
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict) and keys:
            first, second = keys
            pair = (pair.get(first), pair.get(second))
            names = (f"{what}[{i}].{first}", f"{what}[{i}].{second}")
        elif isinstance(pair, list | tuple) and len(pair) == 2:
            names = (f"{what}[{i}][0]", f"{what}[{i}][1]")
        else:
            raise RecordError(f"{what}[{i}]: expected a [question, answer] pair")
        out.append({"role": "user", "content": text(pair[0], names[0])})
        out.append({"role": "assistant", "content": text(pair[1], names[1])})
    return out


def _history(obj: dict) -> Messages:
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history: expected a list of [question, answer] pairs")
    return _pairs(history, "history")


def _alpaca_user(obj: dict) -> str:
    """The instruction and the input joined by a newline, as LLaMA-Factory joins them (and
    ``data distill`` writes a follow-up's first turn); either may be empty (Easy Dataset's
    "input" mode puts the question in ``input`` under an empty instruction)."""
    given = [key for key in ("instruction", "input") if obj.get(key) not in (None, "")]
    if not given:
        return text(obj.get("instruction"), "instruction")  # says missing or empty
    return "\n".join(text(obj[key], key) for key in given)


def _from_alpaca(obj: dict) -> dict:
    answer: dict[str, Any] = {"role": "assistant", "content": text(obj.get("output"), "output")}
    if obj.get("complexCOT") not in (None, ""):  # Easy Dataset's chain of thought
        answer["reasoning_content"] = text(obj["complexCOT"], "complexCOT")
    turns = [{"role": "user", "content": _alpaca_user(obj)}, answer]
    return {"messages": _system(obj) + _history(obj) + turns}


def _question_answer(question: str, answers: tuple[str, ...]) -> Callable[[dict], dict]:
    """``{question, answer}`` shapes: prompt/completion, prompt/response, query/response."""

    def convert(obj: dict) -> dict:
        answer = next((key for key in answers if key in obj), answers[0])
        turns = [
            {"role": "user", "content": text(obj.get(question), question)},
            {"role": "assistant", "content": text(obj.get(answer), answer)},
        ]
        return {"messages": _system(obj) + _history(obj) + turns}

    return convert


def _from_firefly(obj: dict) -> dict:
    turns = _turn_list(obj, "conversation")
    return {"messages": _system(obj) + _pairs(turns, "conversation", ("human", "assistant"))}


# Detection order matters: the first key present decides the format. Each entry: the name
# shown in reports, the converter, and what a record of that format needs (for messages).
FORMATS: dict[str, tuple[str, Callable[[dict], dict], str]] = {
    "messages": ("chat", _from_messages, "messages with role and content"),
    "conversations": ("sharegpt", _from_sharegpt, "conversations with from and value"),
    "conversation": ("firefly", _from_firefly, "conversation: [{human, assistant}]"),
    "instruction": ("alpaca", _from_alpaca, "instruction, optional input, output"),
    "prompt": (
        "completion",
        _question_answer("prompt", ("completion", "response")),
        "prompt with completion or response",
    ),
    "query": ("query/response", _question_answer("query", ("response",)), "query and response"),
    # alpaca with no instruction at all (a CSV's empty cell), the question in input
    "input": ("alpaca", _from_alpaca, "instruction and/or input, output"),
}


# ---------------------------------------------------------------- checks and normalize


def _check_tool_turns(messages: Messages) -> None:
    for i, message in enumerate(messages):
        if message["role"] != "tool":
            continue
        before = messages[i - 1] if i else {}
        if not (before.get("role") == "tool" or before.get("tool_calls")):
            raise RecordError(f"turn {i + 1}: a tool result must follow an assistant's tool call")


def check_turns(messages: Messages) -> None:
    """The turn order every chat template expects; raise :class:`RecordError` otherwise."""
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise RecordError("no user turn")
    if roles[-1] != "assistant":
        raise RecordError("last message must come from the assistant")
    if "system" in roles[1:]:
        raise RecordError("a system turn may only come first")
    _check_tool_turns(messages)
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RecordError("every assistant turn has weight 0: nothing to learn")


def _media(obj: dict) -> None:
    for key in MEDIA_KEYS:
        if obj.get(key):
            raise RecordError(f"{key}: {NOT_TEXT}")


def _read_as(name: str, key: str, needs: str, obj: dict, err: RecordError) -> RecordError:
    """A missing field, said with the format the record was taken for and the keys it has."""
    if not str(err).endswith(": missing"):
        return err
    keys = ", ".join(sorted(map(str, obj)))
    return RecordError(
        f"{err} (read as {name} because of {key!r}, which needs {needs}; keys: {keys})"
    )


# What a record says about itself, kept as it is: its kind (answerable, unanswerable, replay,
# …; eval reports by kind) and where it came from (a distilled passage, a replay prompt).
LABELS = ("kind", "source")


def _labels(obj: dict, record: dict) -> dict:
    for key in LABELS:
        if key in obj:
            if key == "kind" and not isinstance(obj[key], str):
                raise RecordError(f"kind: expected a string such as answerable, got {obj[key]!r}")
            record[key] = obj[key]
    return record


def normalize(obj: Any, system_prompt: str | None = None) -> tuple[dict[str, Any], str]:
    """Turn one raw record into a normalized one; return it with its format's name."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {json_type(obj)}")
    _media(obj)
    for key, (name, convert, needs) in FORMATS.items():
        if key in obj:
            try:
                record = convert(obj)
            except RecordError as err:
                raise _read_as(name, key, needs, obj, err) from None
            messages = record["messages"]
            check_turns(messages)
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            return _labels(obj, record), name
    if "text" in obj:
        return {"text": text(obj["text"], "text")}, "text"
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError(
        "unknown format: expected messages, conversations, conversation, instruction/output, "
        f"prompt/completion, prompt/response, query/response or text (keys: {keys})"
    )


# ---------------------------------------------------------------- placeholders


def _texts(record: dict) -> list[tuple[dict, str]]:
    """(holder, key) of every text of a normalized record that a person wrote."""
    if "text" in record:
        return [(record, "text")]
    return [(m, "content") for m in record["messages"]]


def fill_placeholders(record: dict, values: dict[str, str]) -> set[str]:
    """Fill ``{{name}}`` placeholders (LLaMA-Factory's identity data) from ``values`` in place;
    return the names left unfilled."""
    left: set[str] = set()

    def fill(match: re.Match) -> str:
        if match[1] in values:
            return values[match[1]]
        left.add(match[1])
        return match[0]

    for holder, key in _texts(record):
        holder[key] = PLACEHOLDER.sub(fill, holder[key])
    return left
