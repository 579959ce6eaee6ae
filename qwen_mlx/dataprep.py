"""``qwen-mlx data prepare`` and ``qwen-mlx data stats``.

``prepare`` reads any mix of supported files (and the datasets of a LLaMA-Factory
``dataset_info.json``), normalizes and de-duplicates them, splits them (seeded) into
train/valid/test and writes ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` and
``report.json`` into the output folder: one format per file, no empty file, so that mlx-lm's
loader reads the folder too (text records beside chat ones go to ``text/``). ``stats``
describes a file: counts, formats, turns, token-length percentiles with the model's tokenizer
and what ``max_seq_length`` and packing would do to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

from qwen_mlx.data import LoadReport, Problem, Record, load_records, split_records
from qwen_mlx.data_llamafactory import resolve
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_json, write_jsonl
from qwen_mlx.outputs import claim_files, record_files, writing

PERCENTILES = (50, 90, 95, 99)
PREPARE = "data prepare"
SPLITS = ("train", "valid", "test")
TEXT_DIR = "text"  # the text records, when the chat records take the split files
SPLIT_FILES = (*(f"{s}.jsonl" for s in SPLITS), *(f"{TEXT_DIR}/{s}.jsonl" for s in SPLITS))
OUTPUTS = (*SPLIT_FILES, "report.json")


class NothingUsable(UserError):
    """Not one record of the inputs can be used; ``problems`` lists each bad one."""

    def __init__(self, message: str, problems: list[Problem]):
        super().__init__(message)
        self.problems = problems


def _load_usable(inputs: list[str | Path], **options: Any) -> tuple[list[Record], LoadReport]:
    """The records of ``inputs`` (``options``: :func:`load_records`'); :class:`NothingUsable`
    when there are none."""
    records, report = load_records(inputs, **options)
    if not records:
        where = ", ".join(map(str, inputs))
        raise NothingUsable(f"no usable records in {where}: {report.summary()}", report.problems)
    return records, report


@dataclass
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]  # records by split
    report: LoadReport
    files: dict[str, int] = field(default_factory=dict)  # records by file written


def split_files(parts: dict[str, list[Record]]) -> dict[str, list[dict]]:
    """The file of each record: one format per file and no empty file, as mlx-lm's loader
    needs (it takes a file's format from its first record and fails on an empty one). The
    chat records take ``train/valid/test.jsonl``; text records go there when there are no
    chat records, else to ``text/``."""
    chat_anywhere = any("messages" in r.data for part in parts.values() for r in part)
    files: dict[str, list[dict]] = {}
    for split, records in parts.items():
        for record in records:
            text_aside = chat_anywhere and "messages" not in record.data
            name = f"{TEXT_DIR}/{split}.jsonl" if text_aside else f"{split}.jsonl"
            files.setdefault(name, []).append(record.data)
    return {name: files[name] for name in SPLIT_FILES if name in files}


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    valid_ratio: float = 0.05,
    test_ratio: float = 0.0,
    seed: int = 42,
    strict: bool = False,
    from_preferences: bool = False,
    fill: dict[str, str] | None = None,
    datasets: tuple[str, ...] = (),
) -> PrepareResult:
    """Normalize ``inputs`` and write the seeded split into ``out_dir``; ``datasets`` names
    the entries to read of a LLaMA-Factory ``dataset_info.json`` among the inputs."""
    out_dir = Path(out_dir)
    sources, notes = resolve(list(map(Path, inputs)), tuple(datasets))
    read = [Path(str(p)) for p in sources] + [Path(p) for p in inputs]
    claim_files(out_dir, PREPARE, OUTPUTS, inputs=read)
    records, report = _load_usable(
        sources, strict=strict, from_preferences=from_preferences, fill=fill
    )
    report.notes += notes
    parts = split_records(records, valid_ratio, test_ratio, seed)
    files = split_files(parts)
    with writing(out_dir, PREPARE, [*files, "report.json"]):
        written = {name: write_jsonl(out_dir / name, rows) for name, rows in files.items()}
        counts = {s: len(parts[s]) for s in SPLITS}
        _write_report(out_dir, inputs, (valid_ratio, test_ratio, seed), counts, report, written)
    _forget_stale(out_dir, [name for name in SPLIT_FILES if name not in files])
    return PrepareResult(out_dir, counts, report, written)


def _forget_stale(out_dir: Path, names: list[str]) -> None:
    """Remove what an earlier run wrote that this one did not (an empty split now): a stale
    test.jsonl would be read as this data's. claim_files has checked they are ours, unedited."""
    stale = [name for name in names if (out_dir / name).is_file()]
    for name in stale:
        (out_dir / name).unlink()
    if stale:
        record_files(out_dir, PREPARE, [], drop=stale)
    with contextlib.suppress(OSError):  # text/, when nothing is left in it
        (out_dir / TEXT_DIR).rmdir()


def _write_report(
    out_dir: Path, inputs, split: tuple, counts: dict, report: LoadReport, files: dict
) -> None:
    valid_ratio, test_ratio, seed = split
    write_json(
        out_dir / "report.json",
        {
            "inputs": [str(p) for p in inputs],
            "seed": seed,
            "valid_ratio": valid_ratio,
            "test_ratio": test_ratio,
            "counts": counts,
            "files": files,
            "formats": dict(report.formats),
            "duplicates_removed": report.duplicates,
            "preferences": dict(report.preferences),
            "placeholders_left": dict(report.placeholders),
            "skipped": [{"source": p.source, "reason": p.reason} for p in report.problems],
        },
    )


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    arr = np.asarray(values)
    out = {f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES}
    out.update(min=int(arr.min()), mean=int(arr.mean()), max=int(arr.max()))
    return out


def _turn_counts(records: list[dict]) -> dict[str, int]:
    chat = [r for r in records if "messages" in r]
    return {
        "chat": len(chat),
        "text": len(records) - len(chat),
        "multi_turn": sum(1 for r in chat if sum(m["role"] == "user" for m in r["messages"]) > 1),
        "with_system": sum(1 for r in chat if r["messages"][0]["role"] == "system"),
    }


def stats(
    path: str | Path,
    model_dir: str | Path | None = None,
    max_seq_length: int = 1024,
    from_preferences: bool = False,
) -> dict[str, Any]:
    """Describe a dataset file; token statistics need ``model_dir`` (its tokenizer)."""
    from qwen_mlx.data_prefs import is_pair_file, pair_stats

    if not from_preferences and is_pair_file(path):  # DPO/ORPO data: pairs and their lengths
        return pair_stats(path, model_dir, max_seq_length)
    records, report = _load_usable([path], from_preferences=from_preferences)
    data = [r.data for r in records]
    result: dict[str, Any] = {
        "file": str(path),
        "records": report.kept,
        "bad_records": report.skipped,
        "problems": [str(p) for p in report.problems],
        "duplicates_removed": report.duplicates,
        "formats": dict(report.formats),
        "preferences": dict(report.preferences),
        "placeholders_left": dict(report.placeholders),
        **_turn_counts(data),
        "characters": _percentiles([len(str(d)) for d in data]),
    }
    if model_dir is None:
        return result
    from qwen_mlx.tokens import encode_records, load_tokenizer, pack

    tokenizer = load_tokenizer(model_dir)
    progress = track(data, description="tokenizing", transient=True, console=Console(stderr=True))
    samples, enc = encode_records(tokenizer, progress, max_seq_length)
    result["tokens"] = _percentiles(enc.lengths)
    result["total_tokens"] = int(sum(enc.lengths))
    result["target_tokens"] = int(sum(sum(s.loss_mask) for s in samples))
    result["max_seq_length"] = max_seq_length
    result["truncated"] = enc.truncated
    result["text_windowed"] = enc.windowed  # long text records cut into windows instead
    result["dropped_after_truncation"] = enc.dropped
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = pack(samples, max_seq_length, pad)
    result["packed_rows"] = len(rows)
    filled = sum(r.num_tokens for r in rows)
    result["packing_fill"] = round(filled / (len(rows) * max_seq_length), 3) if rows else 0.0
    return result
