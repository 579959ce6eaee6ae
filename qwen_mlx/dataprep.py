"""``qwen-mlx data prepare`` and ``qwen-mlx data stats``.

``prepare`` reads any mix of supported files, normalizes and de-duplicates them, splits them
(seeded) into train/valid/test and writes ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``
and ``report.json`` into the output folder. ``stats`` describes a file: counts, formats,
turns, token-length percentiles with the model's tokenizer and what ``max_seq_length`` and
packing would do to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

from qwen_mlx.data import LoadReport, Problem, Record, load_records, split_records
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_json, write_jsonl
from qwen_mlx.outputs import claim_files, writing

PERCENTILES = (50, 90, 95, 99)
PREPARE = "data prepare"
SPLITS = ("train", "valid", "test")
OUTPUTS = (*(f"{name}.jsonl" for name in SPLITS), "report.json")


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
    counts: dict[str, int]
    report: LoadReport


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
) -> PrepareResult:
    """Normalize ``inputs`` and write the seeded split into ``out_dir``."""
    out_dir = Path(out_dir)
    claim_files(out_dir, PREPARE, OUTPUTS, inputs=[Path(p) for p in inputs])
    records, report = _load_usable(
        inputs, strict=strict, from_preferences=from_preferences, fill=fill
    )
    parts = split_records(records, valid_ratio, test_ratio, seed)
    with writing(out_dir, PREPARE, OUTPUTS):
        counts = {
            s: write_jsonl(out_dir / f"{s}.jsonl", (r.data for r in parts[s])) for s in SPLITS
        }
        _write_report(out_dir, inputs, (valid_ratio, test_ratio, seed), counts, report)
    return PrepareResult(out_dir, counts, report)


def _write_report(out_dir: Path, inputs, split: tuple, counts: dict, report: LoadReport) -> None:
    valid_ratio, test_ratio, seed = split
    write_json(
        out_dir / "report.json",
        {
            "inputs": [str(p) for p in inputs],
            "seed": seed,
            "valid_ratio": valid_ratio,
            "test_ratio": test_ratio,
            "counts": counts,
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
    result["dropped_after_truncation"] = enc.dropped
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = pack(samples, max_seq_length, pad)
    result["packed_rows"] = len(rows)
    filled = sum(r.num_tokens for r in rows)
    result["packing_fill"] = round(filled / (len(rows) * max_seq_length), 3) if rows else 0.0
    return result
