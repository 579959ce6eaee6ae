"""Dataset reading and normalization: any supported format → chat records.

Each input record becomes ``{"messages": [...]}`` (system/user/assistant turns, last one from
the assistant) or, for plain domain text meant for continued pre-training, ``{"text": ...}``.
The format is detected per record, so a file may mix them. Bad records are never dropped
silently: each is reported with ``file:line`` and the reason, and ``strict`` makes the first
one fatal. Exact duplicates are removed and counted.
"""

from __future__ import annotations

import csv
import json
import random
import sys
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


def _json_value(text: str) -> Any:
    """``json.loads``; JSON it parses but Python cannot hold becomes a :class:`RecordError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise RecordError("JSON nested too deeply to read") from None
    except ValueError:  # the only other failure: an integer longer than Python converts
        limit = sys.get_int_max_str_digits()
        raise RecordError(f"a number longer than {limit} digits") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig", newline=None) as fh:  # BOM and CRLF tolerated
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, _json_value(line)
            except json.JSONDecodeError as err:
                yield lineno, RecordError(f"invalid JSON ({err.msg} at column {err.colno})")
            except RecordError as err:
                yield lineno, err


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        obj = _json_value(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            hint = "one object per line belongs in a .jsonl file; rename it"
            raise UserError(f"{path}:{err.lineno}: more than one JSON value ({hint})") from None
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except RecordError as err:
        raise UserError(f"{path}: {err}") from None
    if isinstance(obj, dict):
        obj = obj.get("data", obj.get("records", [obj]))
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of records")
    # Records of a .json list are numbered from 1, like lines.
    yield from enumerate(obj, start=1)


# What Python's csv module says → what it means for the file's author.
CSV_REASONS = {"unexpected end of data": "a quote opened in this row is never closed"}


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Non-empty rows with the line each starts on (a quoted cell may span lines)."""
    csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document (the default: 128 KiB)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = csv.reader(fh, strict=True)
        while True:
            start = rows.line_num + 1
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as err:
                reason = CSV_REASONS.get(str(err), f"malformed CSV: {err}")
                raise UserError(f"{path}:{start}: {reason}") from None
            if row:
                yield start, row


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows keyed by the header row; an empty cell counts as absent."""
    rows = _csv_rows(path)
    _, header = next(rows, (0, []))
    for line, row in rows:
        if len(row) > len(header):
            yield line, RecordError(f"{len(row)} cells, but the header names {len(header)}")
        else:
            yield line, {k: v for k, v in zip(header, row, strict=False) if v != ""}


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows numbered from 1; null cells count as absent."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs `pip install pyarrow`") from None
    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches()
    except (pyarrow.ArrowException, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from None
    rows = (row for batch in batches for row in batch.to_pylist())
    for number, row in enumerate(rows, start=1):
        yield number, {k: v for k, v in row.items() if v is not None}


READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_raw(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, object)`` pairs; an unparsable line yields a :class:`RecordError`.

    A file that cannot be read at all raises one :class:`UserError` naming it (and the line).
    """
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
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None


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
