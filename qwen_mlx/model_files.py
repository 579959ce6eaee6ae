"""Inspect a local Hugging Face model folder without loading it.

Used by ``check``, ``download`` and ``train``'s start: is the folder complete and usable
(a supported architecture whose sizes are numbers, a tokenizer that parses, every safetensors
shard named by the index present, its header readable and its size right, LoRA targets that
name real layers)? Whether the tokenizer and chat template fit the model is
:mod:`qwen_mlx.model_tokens`. Also reads the architecture numbers for the memory estimate.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.families import find_family, supported

# The numbers every trainer and the memory estimate read; transformers would silently
# fill in its own defaults for a missing one and then fail on the weights' shapes.
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
# Read as whole numbers when present (head_dim may be null: hidden_size / heads).
OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


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
    except (ValueError, RecursionError):  # bad JSON or encoding, absurd numbers or nesting
        raise ValueError("header is not valid JSON") from None
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError):
        raise ValueError("header does not describe tensors (not a safetensors file?)") from None
    return header, 8 + size + max(ends, default=0)


Shapes = dict[str, list[int]]  # tensor name → shape, from the safetensors headers


def _check_shard(path: Path) -> tuple[Finding | None, Shapes]:
    """A failure finding for a bad shard (else None) and the tensors it holds."""
    if not path.is_file():
        return Finding("fail", f"weights: {path.name} missing"), {}
    try:
        header, expected = safetensors_header(path)
    except (ValueError, OSError) as err:
        return Finding("fail", f"weights: {path.name} unreadable", str(err)), {}
    actual = path.stat().st_size
    if actual != expected:
        detail = f"{actual:,} bytes on disk, header says {expected:,} (truncated download?)"
        return Finding("fail", f"weights: {path.name} has the wrong size", detail), {}
    return None, {k: v.get("shape", []) for k, v in header.items() if k != "__metadata__"}


INDEX = "model.safetensors.index.json"


def shard_names(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files a model folder's weights live in (none found: an empty list)
    and the index's weight map, if the weights are sharded. A broken index is a ValueError."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values())), weight_map
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_path} is not a valid index") from err
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    return [], None


def _shard_names(model_dir: Path) -> tuple[list[str], dict | None] | Finding:
    """``shard_names``, or the finding that says why there are none."""
    try:
        shards, weight_map = shard_names(model_dir)
    except ValueError:  # JSON errors are ValueErrors too
        return Finding("fail", f"weights: {INDEX} is not a valid index")
    if not shards:
        return Finding("fail", f"weights: no model.safetensors or {INDEX}")
    return shards, weight_map


def check_weights(model_dir: Path) -> tuple[list[Finding], Shapes]:
    """Every shard present, readable and of the right size; the tensors' shapes when so."""
    found = _shard_names(model_dir)
    if isinstance(found, Finding):
        return [found], {}
    shards, weight_map = found
    problems, shapes = [], {}
    for shard in shards:
        bad, held = _check_shard(model_dir / shard)
        if bad:
            problems.append(bad)
        shapes |= held
    if weight_map is not None and not problems:
        lost = sorted(set(weight_map) - set(shapes))
        if lost:
            problems.append(Finding("fail", "weights: tensors missing from shards", lost[0]))
    if problems:
        return problems, {}
    size = sum((model_dir / s).stat().st_size for s in shards)
    detail = f"{len(shards)} shard(s), {len(shapes)} tensors, {_size(size)}"
    return [Finding("ok", "weights", detail)], shapes


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _targeted(module: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's whole name or a dotted suffix."""
    return module == target or module.endswith("." + target)


def check_targets(shapes: Shapes, targets: list[str]) -> Finding:
    """Do ``lora.target_modules`` name layers of these weights (without loading them)?"""
    modules = [
        name.removesuffix(".weight")
        for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    ]
    unmatched = [t for t in targets if not any(_targeted(m, t) for m in modules)]
    layers = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules if ".layers." in m}))
    fix = f"set lora.target_modules to some of this model's layers: {layers}"
    if len(unmatched) == len(targets):
        return Finding("fail", "lora.target_modules match no layer", ", ".join(targets), fix)
    if unmatched:
        detail = f"{', '.join(unmatched)} match no layer and get no adapter (a typo?)"
        return Finding("warn", "lora.target_modules", detail, fix)
    matched = sum(any(_targeted(m, t) for t in targets) for m in modules)
    return Finding("ok", "lora.target_modules", f"{matched} layers get an adapter")


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict; ``text_config`` (multimodal wrappers) merged into the root.

    Raises ``ValueError`` (JSON, encoding or shape) for a file that is not a config.
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    text_config = config.get("text_config")
    return {**config, **text_config} if isinstance(text_config, dict) else config


def _check_config(model_dir: Path) -> Finding:
    if not (model_dir / "config.json").is_file():
        return Finding("fail", "config.json missing")
    try:
        config = read_model_config(model_dir)
    except ValueError as err:
        return Finding("fail", "config.json unreadable", str(err).splitlines()[0])
    model_type = config.get("model_type")
    archs = config.get("architectures")
    arch = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else "none named"
    if find_family(config) is None:
        fix = f"qwen-mlx trains {supported()}: point model.path at one (e.g. Qwen/Qwen2.5-3B)"
        named = f"{model_type} ({arch})" if model_type else "config.json names no model_type"
        return Finding("fail", f"unsupported architecture: {named}", fix=fix)
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        return Finding("fail", "config.json incomplete", f"no {', '.join(missing)}")
    return _bad_number(config) or Finding("ok", "architecture", f"{model_type} ({arch})")


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _bad_number(config: dict[str, Any]) -> Finding | None:
    """A failure for the first size in config.json that is not a whole number above 0 (a
    hand edit that wrote "2" for 2 makes every trainer and the estimate fail on it)."""
    sizes = [(key, config[key]) for key in REQUIRED_CONFIG_KEYS]
    sizes += [(key, config[key]) for key in OPTIONAL_INT_KEYS if config.get(key) is not None]
    for key, value in sizes:
        if _whole_number(value):
            continue
        shown = json.dumps(value, ensure_ascii=False)[:40]
        number = str(value).strip()
        fix = (
            f'write it as a number, without quotes: "{key}": {int(number)}'
            if number.isdigit() and int(number) > 0
            else f"set {key} to the model's value (the config.json of the model's hub repo)"
        )
        detail = f"{key} is {shown}, not a whole number above 0"
        return Finding("fail", f"config.json: bad {key}", detail, fix)
    return None


def _tokenizer_problem(path: Path) -> str | None:
    """Why ``tokenizer.json`` cannot be loaded (None when it can): training would crash."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    # The tokenizers library raises a bare Exception with the parser's reason.
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        return f"{reason} (a truncated download, or not a tokenizer file)"
    return None


def _check_tokenizer(model_dir: Path) -> Finding:
    has_fast = (model_dir / "tokenizer.json").is_file()
    has_bpe = (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file()
    if not (has_fast or has_bpe):
        return Finding("fail", "tokenizer files missing", "need tokenizer.json")
    problem = has_fast and _tokenizer_problem(model_dir / "tokenizer.json")
    if problem:
        return Finding("fail", "tokenizer.json unreadable", problem)
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return Finding("fail", "tokenizer_config.json missing")
    try:
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        return Finding("fail", "tokenizer_config.json is not valid JSON")
    if not isinstance(tok_config, dict):
        return Finding("fail", "tokenizer_config.json is not a JSON object")
    # Whether it fits the model (ids, control tokens, chat template): model_tokens.
    return Finding("ok", "tokenizer", "tokenizer.json + tokenizer_config.json")


def _tokenizer_fit(model_dir: Path, shapes: Shapes) -> list[Finding]:
    """The tokenizer against the model: run once config.json and the tokenizer files are
    sound, so the family is known."""
    from qwen_mlx.model_tokens import check_tokenizer_fit  # it uses this module's Finding

    config = read_model_config(model_dir)
    return check_tokenizer_fit(model_dir, config, find_family(config), shapes)


def check_model_dir(model_dir: str | Path, targets: list[str] | None = None) -> list[Finding]:
    """All findings about a model folder (and ``targets``, LoRA's target modules, if given).

    A missing folder is one failure with the fix.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [
            Finding("fail", f"model folder {model_dir} not found", fix=download_hint(model_dir))
        ]
    weights, shapes = check_weights(model_dir)
    findings = [_check_config(model_dir), _check_tokenizer(model_dir)]
    if all(f.status == "ok" for f in findings):
        findings += _tokenizer_fit(model_dir, shapes)
    findings += weights
    if targets is not None and shapes:
        findings.append(check_targets(shapes, targets))
    fix = f"re-run `{download_hint(model_dir)}` to fetch what is missing (it resumes)"
    for finding in findings:
        if finding.status == "fail" and not finding.fix:
            finding.fix = fix
    return findings


def require_model(model_dir: str | Path, targets: list[str] | None = None) -> None:
    """Raise a one-line :class:`UserError` for the first thing ``check`` would mark ✗."""
    bad = [f for f in check_model_dir(model_dir, targets) if f.status == "fail"]
    if not bad:
        return
    first = bad[0]
    detail = f" ({first.detail})" if first.detail else ""
    where = f"model folder {model_dir}: " if Path(model_dir).is_dir() else ""  # else: named
    raise UserError(f"{where}{first.title}{detail}; {first.fix} (see `qwen-mlx check`)")
