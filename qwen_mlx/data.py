"""Dataset reading and normalization: any supported format → chat records.

Each input record becomes ``{"messages": [...]}`` (system/user/assistant turns, last one from
the assistant) or, for plain domain text meant for continued pre-training, ``{"text": ...}``.
The format is detected per record, so a file may mix them. Bad records are never dropped
silently: each is reported with ``file:line`` and the reason, and ``strict`` makes the first
one fatal. Exact duplicates are removed and counted.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """One record is unusable; the message is the reason shown to the user."""


@dataclass
class Record:
    """A normalized record and where it came from (``file:line``)."""

    data: dict[str, Any]
    source: str


@dataclass
class Problem:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class LoadReport:
    """What reading a set of files kept, skipped and why."""

    kept: int = 0
    duplicates: int = 0
    problems: list[Problem] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def summary(self) -> str:
        fmt = ", ".join(f"{n} {name}" for name, n in self.formats.most_common())
        parts = [f"{self.kept} records kept" + (f" ({fmt})" if fmt else "")]
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicates removed")
        if self.problems:
            reasons = Counter(p.reason.split(":")[0] for p in self.problems)
            why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(3))
            parts.append(f"{self.skipped} bad records skipped ({why})")
        return ", ".join(parts)


# ---------------------------------------------------------------- format detection


def _text(value: Any, what: str) -> str:
    """Message content as a string; OpenAI-style lists of text parts are joined."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise RecordError(f"{what}: only text content parts are supported")
            parts.append(_text(part.get("text"), what))
        value = "".join(parts)
    if not isinstance(value, str):
        raise RecordError(f"{what}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{what}: empty text")
    return value


def _from_alpaca(obj: dict) -> Messages:
    instruction = _text(obj.get("instruction"), "instruction")
    extra = obj.get("input")
    user = instruction if extra in (None, "") else f"{instruction}\n\n{_text(extra, 'input')}"
    messages: Messages = []
    if obj.get("system") not in (None, ""):
        messages.append({"role": "system", "content": _text(obj["system"], "system")})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history: expected a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"history[{i}]: expected a [question, answer] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(obj.get("output"), "output")})
    return messages


def _from_messages(obj: dict) -> Messages:
    turns = obj["messages"]
    if not isinstance(turns, list):
        raise RecordError("messages: expected a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}]: expected an object with role and content")
        role = turn.get("role")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}]: unsupported role {role!r}")
        out.append({"role": role, "content": _text(turn.get("content"), f"messages[{i}]")})
    return out


def _from_sharegpt(obj: dict) -> Messages:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise RecordError("conversations: expected a list")
    out = []
    if obj.get("system") not in (None, ""):
        out.append({"role": "system", "content": _text(obj["system"], "system")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{i}]: expected an object with from and value")
        role = SHAREGPT_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise RecordError(f"conversations[{i}]: unsupported role {turn.get('from')!r}")
        out.append({"role": role, "content": _text(turn.get("value"), f"conversations[{i}]")})
    return out


def _from_completion(obj: dict) -> Messages:
    return [
        {"role": "user", "content": _text(obj.get("prompt"), "prompt")},
        {"role": "assistant", "content": _text(obj.get("completion"), "completion")},
    ]


# Detection order matters: the first key present decides the format.
FORMATS: dict[str, tuple[str, Callable[[dict], Messages]]] = {
    "messages": ("chat", _from_messages),
    "conversations": ("sharegpt", _from_sharegpt),
    "instruction": ("alpaca", _from_alpaca),
    "prompt": ("completion", _from_completion),
}


def _check_turns(messages: Messages) -> None:
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise RecordError("no user turn")
    if roles[-1] != "assistant":
        raise RecordError("last message must come from the assistant")
    if "system" in roles[1:]:
        raise RecordError("a system turn may only come first")


def normalize(obj: Any, system_prompt: str | None = None) -> tuple[dict[str, Any], str]:
    """Turn one raw record into a normalized one; return it with its format's name."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    for key, (name, convert) in FORMATS.items():
        if key in obj:
            messages = convert(obj)
            _check_turns(messages)
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            return {"messages": messages}, name
    if "text" in obj:
        return {"text": _text(obj["text"], "text")}, "text"
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError(
        "unknown format: expected messages, conversations, instruction/output, "
        f"prompt/completion or text (keys: {keys})"
    )


# ---------------------------------------------------------------- reading files


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig", newline=None) as fh:  # BOM and CRLF tolerated
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, RecordError(f"invalid JSON ({err.msg} at column {err.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            hint = "one object per line belongs in a .jsonl file; rename it"
            raise UserError(f"{path}:{err.lineno}: more than one JSON value ({hint})") from None
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(obj, dict):
        obj = obj.get("data", obj.get("records", [obj]))
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of records")
    # Records of a .json list are numbered from 1, like lines.
    yield from enumerate(obj, start=1)


def _read_tabular(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix} needs `pip install datasets`") from None
    kind = "csv" if path.suffix == ".csv" else "parquet"
    table = datasets.load_dataset(kind, data_files=str(path), split="train")
    # CSV rows are reported by their line in the file (line 1 is the header).
    first = 2 if kind == "csv" else 1
    for i, row in enumerate(table):
        yield i + first, {k: v for k, v in row.items() if v is not None}


READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_tabular,
    ".parquet": _read_tabular,
}


def read_raw(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, object)`` pairs; an unparsable line yields a :class:`RecordError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type; use one of {', '.join(READERS)}")
    try:
        yield from reader(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None


def _dedup_key(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def load_records(
    paths: list[str | Path] | tuple[str | Path, ...],
    *,
    system_prompt: str | None = None,
    strict: bool = False,
    dedup: bool = True,
) -> tuple[list[Record], LoadReport]:
    """Read and normalize every record of ``paths``; bad ones go to the report (or raise)."""
    report = LoadReport()
    records: list[Record] = []
    seen: set[str] = set()
    for path in paths:
        for lineno, obj in read_raw(path):
            source = f"{path}:{lineno}"
            try:
                if isinstance(obj, RecordError):
                    raise obj
                data, fmt = normalize(obj, system_prompt)
            except RecordError as err:
                if strict:
                    hint = "--strict stops at the first bad record"
                    raise UserError(f"{source}: {err} ({hint})") from None
                report.problems.append(Problem(source, str(err)))
                continue
            key = _dedup_key(data)
            if dedup and key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            report.formats[fmt] += 1
            records.append(Record(data, source))
    report.kept = len(records)
    return records, report


def split_records(
    records: list[Record], valid_ratio: float, test_ratio: float = 0.0, seed: int = 42
) -> dict[str, list[Record]]:
    """Seeded shuffle, then split into train/valid/test (a ratio > 0 gets at least one record)."""
    if valid_ratio + test_ratio >= 1:
        raise UserError("--valid-ratio plus --test-ratio must be below 1")
    order = list(records)
    random.Random(seed).shuffle(order)
    n = len(order)

    def count(ratio: float) -> int:
        return 0 if ratio <= 0 or n < 3 else max(1, round(n * ratio))

    n_valid, n_test = count(valid_ratio), count(test_ratio)
    return {
        "valid": order[:n_valid],
        "test": order[n_valid : n_valid + n_test],
        "train": order[n_valid + n_test :],
    }
