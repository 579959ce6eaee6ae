"""config.yaml read, layered and written: ``load_config``, ``--set`` overrides, ``save_config``.

A config file is read in layers: the dataclass defaults of :mod:`qwen_mlx.config` ←
``config.yaml`` ← ``--preset`` ← ``--set key=value``. Unknown keys fail with a did-you-mean
hint naming the file and line, and values are checked against the field's type and range (so
``5e-5``, which YAML reads as a string, is a number here).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qwen_mlx.config import PRESETS, RANGES, Config
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_text


def _sections() -> dict[str, type]:
    """``{"model": ModelConfig, ...}``, read off the ``Config`` dataclass."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(options)


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if typing.get_origin(tp) is list:
        return "a list of strings"
    args = typing.get_args(tp)
    if args:
        members = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(members + ["null"] * (type(None) in args))
    return names.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the safe cases (int→float…)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first type that fits
            try:
                return _coerce(value, inner, key, where)
            except UserError:
                continue
        raise UserError(
            f"{where}: '{key}' is {value!r}, expected {_type_name(tp)}; fix the value in the config"
        )
    bad = UserError(
        f"{where}: '{key}' is {value!r}, expected {_type_name(tp)}; fix the value in the config"
    )
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # `--set lora.target_modules=q_proj,v_proj`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise bad
        return str(value)
    raise bad


def _set_key(cfg: Config, dotted: str, value: Any, where: str) -> None:
    sections = _sections()
    section, _, key = dotted.partition(".")
    if section not in sections or not key:
        if section in sections:
            raise UserError(f"{where}: '{dotted}' needs a key, e.g. '{section}.<key>'")
        raise UserError(
            f"{where}: unknown section '{section}': {_did_you_mean(section, list(sections))}"
        )
    cls = sections[section]
    hints = typing.get_type_hints(cls)
    if key not in hints:
        full = [f"{section}.{k}" for k in hints]
        raise UserError(f"{where}: unknown key '{dotted}': {_did_you_mean(dotted, full)}")
    value = _coerce(value, hints[key], dotted, where)
    choices = next(f for f in dataclasses.fields(cls) if f.name == key).metadata["choices"]
    if choices and value not in choices:
        raise UserError(
            f"{where}: '{dotted}' is {value!r}, expected one of: {', '.join(map(str, choices))}"
        )
    check = RANGES.get(dotted)
    if check and value is not None and not check[0](value):
        raise UserError(f"{where}: '{dotted}' is {value!r}, expected {check[1]}")
    setattr(getattr(cfg, section), key, value)


def _key_lines(text: str) -> dict[str, int]:
    """Line number of each ``section`` and ``section.key`` in a YAML text, for error messages."""
    lines: dict[str, int] = {}
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return lines
    for sec_node, body in root.value:
        lines[str(sec_node.value)] = sec_node.start_mark.line + 1
        if isinstance(body, yaml.MappingNode):
            for key_node, _ in body.value:
                lines[f"{sec_node.value}.{key_node.value}"] = key_node.start_mark.line + 1
    return lines


def _flatten(raw: dict, path: str, lines: dict[str, int]) -> dict[str, tuple[Any, str]]:
    """``{"training": {"num_epochs": 1}}`` → ``{"training.num_epochs": (1, "file:line")}``."""
    sections = _sections()
    flat: dict[str, tuple[Any, str]] = {}
    for section, body in raw.items():
        where = f"{path}:{lines.get(str(section), '?')}"
        if section not in sections:
            hint = _did_you_mean(str(section), list(sections))
            raise UserError(f"{where}: unknown section '{section}': {hint}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping of keys")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            flat[dotted] = (value, f"{path}:{lines.get(dotted, '?')}")
    return flat


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML config file into (dict, key lines); a one-line error for each way it fails."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass -c FILE, or create config.yaml)")
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = yaml.safe_load(text)
        lines = _key_lines(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML ({problem})") from None
    if raw is None:
        return {}, lines
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, data:, …) at the top")
    return raw, lines


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.num_epochs=1"`` → ``("training.num_epochs", 1)`` (value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.num_epochs=1")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Build the resolved config: defaults ← file ← preset ← ``--set`` overrides."""
    cfg = Config()
    if path is not None:
        raw, lines = read_yaml(path)
        for key, (value, where) in _flatten(raw, str(path), lines).items():
            _set_key(cfg, key, value, where)
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            _set_key(cfg, key, value, f"preset {preset}")
    for text in overrides:
        key, value = parse_override(text)
        _set_key(cfg, key, value, f"--set {text}")
    return cfg


def flat_values(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every key of ``cfg``."""
    return {
        f"{section}.{key}": value
        for section, body in cfg.to_dict().items()
        for key, value in body.items()
    }


def changed_keys(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each key whose value differs between two configs."""
    old, new = flat_values(before), flat_values(after)
    return [(key, old[key], new[key]) for key in old if old[key] != new[key]]


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in the same shape ``load_config`` reads."""
    return yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically), e.g. into a run folder."""
    write_text(path, config_to_yaml(cfg))
