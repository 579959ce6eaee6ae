"""The data set under review: its files, each record's editable fields, passage and kind.

A folder means its splits (``train.jsonl``, ``valid.jsonl``, ``test.jsonl``: what
``data distill`` and ``data prepare`` write); a file means that file (any format qwen-mlx
reads). Each record shows a question, an optional input and an answer, located in the
record's own format (:data:`SHAPES`), so an edit is written back in that format and
everything else in the record (``kind``, ``source``, history, system turn) stays as it was.
The passage behind a distilled record comes from ``chunks.jsonl`` beside the data
(``source.chunk``), and what curation dropped, by reason, from its ``report.json``.

A record's id is a hash of its file name and content (and its place among identical
records), so a decision follows the record even if lines move; a decision whose record is
gone (the data was distilled again) is counted as stale and applies to nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.data import read_raw
from qwen_mlx.data_formats import normalize
from qwen_mlx.data_tools import RecordError
from qwen_mlx.errors import UserError

SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
FIELDS = ("question", "input", "answer")
MAX_FIELD_CHARS = 20_000  # an edited field; the longest rule answer is far shorter
FieldPath = tuple  # a path into a raw record: keys and list indexes

# ------------------------------------------------------------------ where the fields are


def _last(turns: Any, key: str, values: tuple[str, ...]) -> int | None:
    if not isinstance(turns, list):
        return None
    found = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get(key) in values]
    return found[-1] if found else None


def _turns(list_key: str, role_key: str, text_key: str, user: tuple, assistant: tuple):
    """Question and answer as the last user and assistant turns of a list of turns."""

    def paths(obj: dict) -> dict[str, FieldPath]:
        turns = obj.get(list_key)
        q, a = _last(turns, role_key, user), _last(turns, role_key, assistant)
        out = {}
        if q is not None:
            out["question"] = (list_key, q, text_key)
        if a is not None and (q is None or a > q):
            out["answer"] = (list_key, a, text_key)
        return out

    return paths


def _keys(question: str | None, answers: tuple[str, ...], extra: str | None = None):
    def paths(obj: dict) -> dict[str, FieldPath]:
        out = {"question": (question,)} if question else {}
        if extra:
            out["input"] = (extra,)
        answer = next((k for k in answers if k in obj), answers[0])
        return {**out, "answer": (answer,)}

    return paths


def _firefly(obj: dict) -> dict[str, FieldPath]:
    turns = obj.get("conversation")
    if not (isinstance(turns, list) and turns):
        return {}
    last = len(turns) - 1
    turn = ("conversation", last)
    return {"question": (*turn, "human"), "answer": (*turn, "assistant")}


# The record formats of qwen_mlx.data_formats.FORMATS, by the key that tells them, in the
# same order; each gives the paths of the fields a person edits.
SHAPES: dict[str, Callable[[dict], dict[str, FieldPath]]] = {
    "messages": _turns("messages", "role", "content", ("user",), ("assistant",)),
    "conversations": _turns(
        "conversations", "from", "value", ("human", "user"), ("gpt", "assistant")
    ),
    "conversation": _firefly,
    "instruction": _keys("instruction", ("output",), "input"),
    "prompt": _keys("prompt", ("completion", "response")),
    "query": _keys("query", ("response",)),
    "text": _keys(None, ("text",)),
}


def field_paths(obj: dict) -> dict[str, FieldPath]:
    """The editable fields of a raw record and where they are; a field whose value is not
    text (a list of parts, a tool call) is left out: it is shown, not edited."""
    shape = next((SHAPES[k] for k in SHAPES if k in obj), None)
    paths = shape(obj) if shape else {}
    # An alpaca record without an input may be given one.
    return {
        name: p
        for name, p in paths.items()
        if isinstance(_get(obj, p), str) or (name == "input" and _get(obj, p) is None)
    }


def _get(obj: Any, path: FieldPath) -> Any:
    for step in path:
        try:
            obj = obj[step]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _set(obj: Any, path: FieldPath, value: str) -> None:
    for step in path[:-1]:
        obj = obj[step]
    obj[path[-1]] = value


# ------------------------------------------------------------------ records


@dataclass
class Item:
    """One record under review: where it is, its raw form and its editable fields."""

    id: str
    file: str  # the file's name, as the page and the reviewed folder name it
    line: int
    raw: dict
    paths: dict[str, FieldPath]
    context: list[dict]  # the turns before the question (system, history), shown only

    def fields(self) -> dict[str, str]:
        return {name: _get(self.raw, path) or "" for name, path in self.paths.items()}

    def edited(self, fields: dict[str, str]) -> dict:
        """The raw record with ``fields`` written in (the others as they were)."""
        out = copy.deepcopy(self.raw)
        for name, value in fields.items():
            if name in self.paths:
                _set(out, self.paths[name], value)
        return out

    @property
    def source(self) -> dict:
        source = self.raw.get("source")
        return source if isinstance(source, dict) else {}

    def category(self) -> str:
        """What the page filters by: unanswerable, follow-up, paraphrase or answerable."""
        if self.raw.get("kind") == "unanswerable":
            return "unanswerable"
        origin = self.source.get("origin")
        if origin == "followup" or self.raw.get("history") or len(self.context) > 1:
            return "followup"
        return "paraphrase" if origin == "paraphrase" else "answerable"

    def as_json(self) -> dict:
        s = self.source
        return {
            "id": self.id,
            "file": self.file,
            "line": self.line,
            "fields": self.fields(),
            "context": self.context,
            "kind": self.raw.get("kind") if isinstance(self.raw.get("kind"), str) else None,
            "category": self.category(),
            "heading": _text(s.get("heading")),
            "chunk": _text(s.get("chunk")),
            "cluster": s.get("cluster") if isinstance(s.get("cluster"), int) else None,
            "origin": _text(s.get("origin")),
            "rewords": _text(s.get("rewords")),
        }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _context(obj: dict) -> list[dict]:
    """The turns before the last question, from the normalized record (shown as text)."""
    try:
        record, _ = normalize(obj)
    except RecordError:
        return []
    messages = record.get("messages", [])
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
    return [{"role": m["role"], "content": str(m.get("content", ""))} for m in messages[:last_user]]


@dataclass
class DataSet:
    """The files under review, their records, passages and curation drops."""

    root: Path  # the folder the ledger and reviewed/ sit in
    files: list[Path]
    items: list[Item] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # records that cannot be reviewed
    passages: dict[str, dict] = field(default_factory=dict)
    drops: list[dict] = field(default_factory=list)

    def by_id(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


def data_files(target: Path) -> tuple[Path, list[Path]]:
    """(the folder the review lives in, the files under review) for a folder or a file."""
    target = Path(target)
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise UserError(f"{target}: no such file or folder")
    files = [target / name for name in SPLIT_FILES if (target / name).is_file()]
    if not files:
        raise UserError(
            f"{target} holds no {', '.join(SPLIT_FILES)}: give the folder `data distill` or "
            "`data prepare` wrote, or a data file"
        )
    return target, files


def load(target: Path) -> DataSet:
    """Every record of the data at ``target`` with its id, fields and context."""
    root, files = data_files(target)
    names = [f.name for f in files]
    if len(set(names)) != len(names):  # cannot happen for one folder; said plainly anyway
        raise UserError(f"two files named alike: {', '.join(names)}")
    data = DataSet(root, files)
    for path in files:
        _read_file(path, data)
    if not data.items:
        why = "; ".join(data.problems[:3]) or "the files are empty"
        raise UserError(f"{target}: no record to review ({why})")
    data.passages = _passages(root)
    data.drops = _drops(root)
    return data


def _read_file(path: Path, data: DataSet) -> None:
    seen: dict[str, int] = {}
    for line, obj in read_raw(path):
        where = f"{path.name}:{line}"
        if isinstance(obj, RecordError) or not isinstance(obj, dict):
            why = obj if isinstance(obj, RecordError) else "not an object"
            data.problems.append(f"{where}: {why}")
            continue
        paths = field_paths(obj)
        if "answer" not in paths:
            data.problems.append(f"{where}: no answer text to review in this record")
            continue
        digest = _digest(path.name, obj)
        seen[digest] = seen.get(digest, 0) + 1
        key = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
        data.items.append(Item(key, path.name, line, obj, paths, _context(obj)))


def _digest(name: str, obj: dict) -> str:
    blob = json.dumps([name, obj], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _passages(root: Path) -> dict[str, dict]:
    """``chunks.jsonl`` beside the data (``data distill``'s): chunk id → its text and place."""
    path = root / "chunks.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for _, chunk in read_raw(path):
        if isinstance(chunk, dict) and isinstance(chunk.get("id"), str):
            out[chunk["id"]] = {
                "text": str(chunk.get("text", "")),
                "heading": str(chunk.get("heading", "")),
                "file": str(chunk.get("source", "")),
            }
    return out


def _drops(root: Path) -> list[dict]:
    """What curation dropped, by reason, from ``report.json`` beside the data."""
    from qwen_mlx.distill.report import DROP_MEANING

    try:
        report = json.loads((root / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    drops = report.get("drops") if isinstance(report, dict) else None
    if not isinstance(drops, dict):
        return []
    return [
        {"reason": str(reason), "count": count, "meaning": DROP_MEANING.get(reason, "")}
        for reason, count in drops.items()
        if isinstance(count, int)
    ]


def check_fields(item: Item, fields: Any) -> dict[str, str]:
    """The edited fields of a request, checked: only the record's own, text, bounded, and a
    question and answer that are not empty. Raises ValueError with the reason."""
    if not isinstance(fields, dict):
        raise ValueError("fields: expected an object of question, input, answer")
    out = {}
    for name, value in fields.items():
        if name not in item.paths:
            raise ValueError(f"fields.{name}: this record has no such field")
        if not isinstance(value, str):
            raise ValueError(f"fields.{name}: expected text")
        if len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"fields.{name}: longer than {MAX_FIELD_CHARS} characters")
        if name != "input" and not value.strip():
            raise ValueError(f"fields.{name}: empty")
        out[name] = value
    return out
