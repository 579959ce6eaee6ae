"""LLaMA-Factory's ``dataset_info.json``: a named entry's file read the way LLaMA-Factory reads it.

An entry names a data file (or a folder of them) beside the ``dataset_info.json``, its
``formatting`` (``alpaca``, default; ``sharegpt``; ``openai``), whether it is preference data
(``ranking``), which column holds what (``columns``) and, for the turn lists, which keys and
role names the turns use (``tags``). As in LLaMA-Factory, an entry that gives ``columns`` uses
only the columns it declares (a ``system`` or ``history`` column it does not declare is not
read); one without ``columns`` reads instruction/input/output or conversations. An alpaca
entry whose columns declare a prompt but no response is pre-training text (LLaMA-Factory's
``"columns": {"prompt": "text"}``).

Each row becomes a record in one of :mod:`qwen_mlx.data_formats`' shapes (chat ``messages``,
``text``, or with ``chosen``/``rejected``/``label`` preference data), which then goes through
the same checks as any other record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.data_tools import RecordError, json_type
from qwen_mlx.errors import UserError

INFO_NAME = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools")
COLUMNS += ("images", "videos", "audios", "chosen", "rejected", "kto_tag")
# LLaMA-Factory's defaults: the columns when an entry gives none, the tags when it gives none.
DEFAULT_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "messages": "conversations",
}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# The tag whose turns take each role (the function tag's turns are the assistant's tool calls).
TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "system_tag": "system",
}


def is_dataset_info(path: Path) -> bool:
    return Path(path).name == INFO_NAME


@dataclass(frozen=True)
class Entry:
    """One dataset of a ``dataset_info.json``: its files and how their rows read."""

    name: str
    files: tuple[Path, ...]
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def column(self, key: str) -> str | None:
        return self.columns.get(key)


def _load_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected an object of dataset entries, got {json_type(info)}")
    return info


def _files(info_path: Path, name: str, attr: dict) -> tuple[Path, ...]:
    hub = next((key for key in HUB_KEYS if key in attr), None)
    if hub is not None:
        raise UserError(
            f"{info_path}: dataset {name!r} is fetched from {hub} {attr[hub]!r}; qwen-mlx reads "
            "local files only: download it and give its file_name"
        )
    file_name = attr.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{info_path}: dataset {name!r} has no file_name")
    path = info_path.parent / file_name
    if path.is_dir():  # LLaMA-Factory reads every file of the folder
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES))
        if not files:
            raise UserError(f"{path} (dataset {name!r}): no {', '.join(SUFFIXES)} files in it")
        return files
    if not path.is_file():
        raise UserError(f"{path}: the file_name of dataset {name!r} in {info_path} is not there")
    return (path,)


def _names(attr: dict, key: str, info_path: Path, name: str) -> dict[str, str]:
    value = attr.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{info_path}: {name}.{key}: expected an object, got {json_type(value)}")
    return value


def read_entry(info_path: Path, name: str) -> Entry:
    """The entry ``name`` of ``info_path``; a missing or unusable one is a :class:`UserError`."""
    info_path = Path(info_path)
    info = _load_info(info_path)
    if name not in info:
        listed = ", ".join(sorted(info)) or "none"
        raise UserError(f"{info_path}: no dataset {name!r} (it lists: {listed})")
    attr = info[name]
    if not isinstance(attr, dict):
        raise UserError(f"{info_path}: {name}: expected an object, got {json_type(attr)}")
    formatting = attr.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise UserError(
            f"{info_path}: {name}.formatting {formatting!r} is not one LLaMA-Factory reads "
            f"({', '.join(FORMATTINGS)}); give its file to `data prepare` directly instead "
            "(the format of each record is detected)"
        )
    given = _names(attr, "columns", info_path, name)
    columns = {k: given[k] for k in COLUMNS if given.get(k)} if "columns" in attr else {}
    notes = ()
    if attr.get("num_samples") is not None:
        notes = (f"{name}: num_samples is not applied; every record of its file is read",)
    return Entry(
        name=name,
        files=_files(info_path, name, attr),
        formatting=formatting,
        ranking=bool(attr.get("ranking", False)),
        columns=columns if "columns" in attr else dict(DEFAULT_COLUMNS),
        tags={**DEFAULT_TAGS, **_names(attr, "tags", info_path, name)},
        notes=notes,
    )


# ---------------------------------------------------------------- rows → records


def _cell(row: dict, entry: Entry, key: str, required: bool = False) -> Any:
    column = entry.column(key)
    if column is None or row.get(column) in (None, ""):
        if required:
            where = f"column {column!r}" if column else f"a {key} column (none is declared)"
            raise RecordError(f"{column or key}: missing ({where} of dataset {entry.name!r})")
        return None
    return row[column]


def _extras(row: dict, entry: Entry) -> dict:
    """The system prompt, tools and media of a row, under the keys our formats read."""
    out: dict[str, Any] = {}
    for key in ("system", "tools", "images", "videos", "audios"):
        value = _cell(row, entry, key)
        if value is not None:
            out[key] = value
    return out


def _history(row: dict, entry: Entry) -> list[dict]:
    pairs = _cell(row, entry, "history")
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        raise RecordError(f"{entry.column('history')}: expected [question, answer] pairs")
    turns = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"{entry.column('history')}[{i}]: expected a [question, answer] pair")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _alpaca(row: dict, entry: Entry) -> dict:
    # LLaMA-Factory: the prompt and the query joined by one newline, either may be empty.
    asked = {key: _cell(row, entry, key) for key in ("prompt", "query")}
    asked = {key: value for key, value in asked.items() if value is not None}
    if not asked:
        _cell(row, entry, "prompt" if entry.column("prompt") else "query", required=True)
    for key, value in asked.items():
        if not isinstance(value, str):
            raise RecordError(f"{entry.column(key)}: expected text, got {json_type(value)}")
    user = "\n".join(asked.values())
    if not (entry.ranking or entry.column("response") or entry.column("kto_tag")):
        return {"text": user}  # pre-training text: a prompt column and no response
    turns = [*_history(row, entry), {"role": "user", "content": user}]
    record = {**_extras(row, entry), "messages": turns}
    if entry.ranking:
        return {
            **record,
            "chosen": _cell(row, entry, "chosen", required=True),
            "rejected": _cell(row, entry, "rejected", required=True),
        }
    turns.append({"role": "assistant", "content": _cell(row, entry, "response", required=True)})
    return _kto(row, entry, record)


def _kto(row: dict, entry: Entry, record: dict) -> dict:
    tag = _cell(row, entry, "kto_tag")
    return {**record, "label": tag} if tag is not None else record


def _turn(message: Any, entry: Entry, what: str) -> dict:
    """One turn in LLaMA-Factory's tags → one turn of ours (its other keys kept)."""
    tags = entry.tags
    if not isinstance(message, dict):
        raise RecordError(f"{what}: expected an object with {tags['role_tag']} and content")
    rest = {k: v for k, v in message.items() if k not in (tags["role_tag"], tags["content_tag"])}
    tag, content = message.get(tags["role_tag"]), message.get(tags["content_tag"])
    if tag == tags["function_tag"]:  # the assistant's tool call(s), as JSON text
        return {**rest, "role": "assistant", "content": "", "tool_calls": content}
    role = next((role for key, role in TAG_ROLES.items() if tags[key] == tag), None)
    if role is None:
        names = ", ".join(repr(tags[key]) for key in (*TAG_ROLES, "function_tag"))
        raise RecordError(f"{what}.{tags['role_tag']}: {tag!r} is none of the tags ({names})")
    return {**rest, "role": role, "content": content}


def _turns(row: dict, entry: Entry) -> list[dict]:
    column = entry.column("messages") or "messages"
    turns = _cell(row, entry, "messages", required=True)
    if isinstance(turns, str):  # a CSV cell holds them as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise RecordError(f"{column}: not valid JSON ({err.msg})") from None
    if not isinstance(turns, list):
        raise RecordError(f"{column}: expected a list of turns, got {json_type(turns)}")
    return [_turn(m, entry, f"{column}[{i}]") for i, m in enumerate(turns)]


def _chat(row: dict, entry: Entry) -> dict:
    turns = _turns(row, entry)
    record = _extras(row, entry)
    if turns and turns[0]["role"] == "system":  # LLaMA-Factory: it overrides the system column
        record.pop("system", None)
    record["messages"] = turns
    if entry.ranking:
        for key in ("chosen", "rejected"):
            record[key] = _turn(_cell(row, entry, key, required=True), entry, entry.column(key))
        return record
    return _kto(row, entry, record)


def converter(entry: Entry) -> Callable[[Any], Any]:
    """Raw row of ``entry``'s files → a record of one of our formats (a RecordError names the
    column at fault)."""
    build = _alpaca if entry.formatting == "alpaca" else _chat

    def convert(row: Any) -> Any:
        if not isinstance(row, dict):
            return row  # normalize names it
        return build(row, entry)

    return convert


# ---------------------------------------------------------------- inputs


def resolve(inputs: list[Path], names: tuple[str, ...]) -> tuple[list, list[str]]:
    """``inputs`` with each ``dataset_info.json`` replaced by the files of the datasets
    ``names`` it lists (read through their column mapping), and notes for the user."""
    from qwen_mlx.data import Source

    infos = [Path(p) for p in inputs if is_dataset_info(Path(p))]
    if names and not infos:
        raise UserError(f"--dataset names a dataset of a {INFO_NAME}; give that file as an input")
    if infos and not names:
        listed = ", ".join(sorted(_load_info(infos[0]))) or "none"
        raise UserError(
            f"{infos[0]}: name the datasets to read with --dataset NAME (it lists: {listed})"
        )
    out: list = [Path(p) for p in inputs if not is_dataset_info(Path(p))]
    notes: list[str] = []
    for name in names:
        holders = [info for info in infos if name in _load_info(info)]
        entry = read_entry(holders[0] if holders else infos[0], name)  # the latter: says missing
        out += [Source(path, converter(entry)) for path in entry.files]
        notes += entry.notes
    return out, notes
