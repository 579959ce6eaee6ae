"""Dataset reading: files of any supported format → normalized chat records.

Each input record becomes ``{"messages": [...]}`` (system/user/assistant/tool turns, last one
from the assistant) or, for plain domain text meant for continued pre-training, ``{"text": ...}``
(the formats: :mod:`qwen_mlx.data_formats`). The format is detected per record, so a file may mix
them; preference data is told apart (:mod:`qwen_mlx.data_prefs`). Bad records are never dropped
silently: each is reported with ``file:line`` and the reason, and ``strict`` makes the first
one fatal. Exact duplicates are removed and counted.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.data_formats import fill_placeholders, normalize
from qwen_mlx.data_prefs import preference_kind, refusal, sft_record
from qwen_mlx.data_tools import RecordError
from qwen_mlx.errors import UserError

__all__ = ["RecordError", "Source", "load_records", "normalize", "read_raw", "split_records"]


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
    preferences: Counter = field(
        default_factory=Counter
    )  # --sft-from-preferences: what became of them
    placeholders: Counter = field(default_factory=Counter)  # unfilled {{name}} → records
    notes: list[str] = field(default_factory=list)  # about the inputs (a dataset entry's)

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
        parts += [f"{n} {what}" for what, n in self.preferences.items()]
        return ", ".join(parts)

    def warnings(self) -> list[str]:
        """What the user should act on although the records were kept."""
        if not self.placeholders:
            return list(self.notes)
        names = ", ".join(f"{{{{{k}}}}} in {n}" for k, n in self.placeholders.most_common())
        fills = " ".join(f"--fill {k}=…" for k in sorted(self.placeholders))
        return [*self.notes, f"placeholders left in records ({names}): fill them with {fills}"]


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


_SPACE = re.compile(r"\s*")


def _json_values(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """JSON values one after another (Easy Dataset writes its multilingual-thinking .json so:
    indented objects, one after the other), each numbered by the line it starts on."""
    decoder, at, line = json.JSONDecoder(), 0, 1
    while True:
        start = _SPACE.match(text, at).end()
        line += text.count("\n", at, start)
        if start == len(text):
            return
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{line}: JSON nested too deeply to read") from None
        yield line, value
        line += text.count("\n", start, end)
        at = end


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = _json_value(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: records one after another
            yield from _json_values(path, text)
            return
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


def _has_paragraphs(path: Path) -> bool:
    """Whether a blank line stands between two lines of text."""
    text_seen = blank_after = False
    with open(path, encoding="utf-8-sig", newline=None) as fh:
        for line in fh:
            if not line.strip():
                blank_after = text_seen
            elif blank_after:
                return True
            else:
                text_seen = True
    return False


def _read_txt(path: Path) -> Iterator[tuple[int, Any]]:
    """Domain text for continued pre-training: each paragraph (blank-line separated) a record,
    or, in a file without blank lines, each line (one document per line, as LLaMA-Factory's
    wiki_demo.txt and Hugging Face's text loader have it)."""
    by_line = not _has_paragraphs(path)
    lines: list[str] = []
    start = 0
    with open(path, encoding="utf-8-sig", newline=None) as fh:
        for lineno, line in enumerate([*fh, ""], start=1):  # the "" ends the last paragraph
            if line.strip():
                start = start or lineno
                lines.append(line)
            if lines and (by_line or not line.strip()):
                yield start, {"text": "".join(lines).rstrip("\n")}
                lines, start = [], 0


READERS = {
    ".jsonl": _read_jsonl,
    ".txt": _read_txt,
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


@dataclass(frozen=True)
class Source:
    """A data file whose rows are converted before they are read as records (the column
    mapping of a LLaMA-Factory dataset_info.json entry: :mod:`qwen_mlx.data_llamafactory`)."""

    path: Path
    convert: Callable[[Any], Any]

    def __str__(self) -> str:
        return str(self.path)


def _dedup_key(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


@dataclass
class ReadOptions:
    """How records are read: see :func:`load_records`."""

    system_prompt: str | None = None
    strict: bool = False
    from_preferences: bool = False
    fill: dict[str, str] = field(default_factory=dict)


PREFERENCE_COUNTS = {
    "pair": "preference pairs trained on their chosen answer",
    "kto": "KTO records trained (label true)",
}


def _sft_view(obj: Any, source: str, options: ReadOptions, report: LoadReport) -> Any:
    """The record to train on: preference data is refused, or reduced to its chosen answer
    (None for a KTO ``label: false`` record, which is counted and left out)."""
    kind = preference_kind(obj)
    if kind is None:
        return obj
    if not options.from_preferences:
        raise refusal(source, kind)
    sft = sft_record(obj, kind)
    counted = PREFERENCE_COUNTS[kind] if sft is not None else "KTO records left out (label false)"
    report.preferences[counted] += 1
    return sft


def _read_one(obj: Any, source: str, options: ReadOptions, report: LoadReport, convert=None):
    """``(normalized record, format)`` of one raw record, or None when it is not kept."""
    try:
        if isinstance(obj, RecordError):
            raise obj
        if convert is not None:
            obj = convert(obj)
        kept = _sft_view(obj, source, options, report)
        if kept is None and obj is not None:  # a KTO record left out, already counted
            return None
        # A `null` line reaches normalize, which names it as a bad record like any other.
        data, fmt = normalize(kept, options.system_prompt)
    except RecordError as err:
        if options.strict:
            hint = "--strict stops at the first bad record"
            raise UserError(f"{source}: {err} ({hint})") from None
        report.problems.append(Problem(source, str(err)))
        return None
    report.placeholders.update(fill_placeholders(data, options.fill))
    return data, fmt


def load_records(
    paths: list[str | Path | Source] | tuple[str | Path | Source, ...],
    *,
    system_prompt: str | None = None,
    strict: bool = False,
    dedup: bool = True,
    from_preferences: bool = False,
    fill: dict[str, str] | None = None,
) -> tuple[list[Record], LoadReport]:
    """Read and normalize every record of ``paths``; bad ones go to the report (or raise).

    A :class:`Source` is read through its converter. Preference data is refused unless
    ``from_preferences`` (then the chosen answers are kept);
    ``fill`` gives values for ``{{name}}`` placeholders.
    """
    options = ReadOptions(system_prompt, strict, from_preferences, dict(fill or {}))
    report = LoadReport()
    records: list[Record] = []
    seen: set[str] = set()
    for given in paths:
        path, convert = (given.path, given.convert) if isinstance(given, Source) else (given, None)
        for lineno, obj in read_raw(path):
            source = f"{path}:{lineno}"
            read = _read_one(obj, source, options, report, convert)
            if read is None:
                continue
            key = _dedup_key(read[0])
            if dedup and key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            report.formats[read[1]] += 1
            records.append(Record(read[0], source))
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
