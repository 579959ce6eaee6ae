"""Inspect a local Hugging Face model folder without loading it.

Used by ``check`` and ``download``: is the folder complete (config, tokenizer, every
safetensors shard named by the index present, its header readable and its size right)?
Also reads the architecture numbers needed for the memory estimate.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclass
class Finding:
    """One line of a report: status is "ok", "warn" or "fail"; ``fix`` says what to do."""

    status: str
    title: str
    detail: str = ""
    fix: str = ""


def repo_id_for(model_dir: Path) -> str | None:
    """``models/Qwen/Qwen2.5-3B`` → ``Qwen/Qwen2.5-3B`` (the download command's argument)."""
    parts = Path(model_dir).parts
    if "models" in parts:
        rest = parts[parts.index("models") + 1 :]
        if len(rest) == 2:
            return "/".join(rest)
    return None


def download_hint(model_dir: Path) -> str:
    """The command that puts a model into ``model_dir``."""
    repo = repo_id_for(model_dir)
    if repo and Path(model_dir) == Path("models") / repo:
        return f"qwen-mlx download {repo}"
    return f"qwen-mlx download {repo or 'Qwen/Qwen2.5-3B'} --local-dir {model_dir}"


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the file size it implies.

    Raises ``ValueError`` with the reason when the header is missing or corrupt.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("header length is implausible (not a safetensors file?)")
        raw = fh.read(size)
    if len(raw) < size:
        raise ValueError("header is cut short")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("header is not valid JSON") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header, 8 + size + max(ends, default=0)


def _check_shard(path: Path) -> tuple[Finding | None, set[str]]:
    """A failure finding for a bad shard (else None) and the tensor names it holds."""
    if not path.is_file():
        return Finding("fail", f"weights: {path.name} missing"), set()
    try:
        header, expected = safetensors_header(path)
    except (ValueError, OSError) as err:
        return Finding("fail", f"weights: {path.name} unreadable", str(err)), set()
    actual = path.stat().st_size
    if actual != expected:
        detail = f"{actual:,} bytes on disk, header says {expected:,} (truncated download?)"
        return Finding("fail", f"weights: {path.name} has the wrong size", detail), set()
    return None, {k for k in header if k != "__metadata__"}


def check_weights(model_dir: Path) -> list[Finding]:
    """Every shard of the folder's weights present, readable and of the right size."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            return [Finding("fail", f"weights: {index_path.name} is not a valid index")]
        shards = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        return [Finding("fail", "weights: no model.safetensors or model.safetensors.index.json")]
    problems, names = [], set()
    for shard in shards:
        bad, found = _check_shard(model_dir / shard)
        if bad:
            problems.append(bad)
        names |= found
    if weight_map is not None and not problems:
        lost = sorted(set(weight_map) - names)
        if lost:
            problems.append(Finding("fail", "weights: tensors missing from shards", lost[0]))
    if problems:
        return problems
    size = sum((model_dir / s).stat().st_size for s in shards)
    detail = f"{len(shards)} shard(s), {len(names)} tensors, {_size(size)}"
    return [Finding("ok", "weights", detail)]


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict; ``text_config`` (multimodal wrappers) merged into the root."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return {**config, **config.get("text_config", {})}


def _check_config(model_dir: Path) -> Finding:
    path = model_dir / "config.json"
    if not path.is_file():
        return Finding("fail", "config.json missing")
    try:
        config = read_model_config(model_dir)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Finding("fail", "config.json is not valid JSON")
    model_type = config.get("model_type")
    arch = ", ".join(config.get("architectures") or ["?"])
    if model_type not in SUPPORTED_MODEL_TYPES:
        return Finding(
            "warn", "architecture", f"{model_type} ({arch}); qwen-mlx is built for Qwen2/2.5"
        )
    return Finding("ok", "architecture", f"{model_type} ({arch})")


def _check_tokenizer(model_dir: Path) -> Finding:
    has_fast = (model_dir / "tokenizer.json").is_file()
    has_bpe = (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file()
    if not (has_fast or has_bpe):
        return Finding("fail", "tokenizer files missing", "need tokenizer.json")
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return Finding("fail", "tokenizer_config.json missing")
    try:
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Finding("fail", "tokenizer_config.json is not valid JSON")
    has_template = (
        bool(tok_config.get("chat_template")) or (model_dir / "chat_template.jinja").is_file()
    )
    if not has_template:
        return Finding("warn", "tokenizer", "no chat template: chat data cannot be formatted")
    return Finding("ok", "tokenizer", "tokenizer.json + chat template")


def check_model_dir(model_dir: str | Path) -> list[Finding]:
    """All findings about a model folder; a missing folder is one failure with the fix."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [
            Finding("fail", f"model folder {model_dir} not found", fix=download_hint(model_dir))
        ]
    findings = [_check_config(model_dir), _check_tokenizer(model_dir), *check_weights(model_dir)]
    fix = f"re-run `{download_hint(model_dir)}` to fetch what is missing (it resumes)"
    for finding in findings:
        if finding.status == "fail" and not finding.fix:
            finding.fix = fix
    return findings
