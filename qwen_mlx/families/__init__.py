"""Model families and the registry that picks one from a model's config.json.

Trainers, the memory estimate, ``check``, GGUF export, the Modelfile and the tiny-model
builder ask the family for shapes, GGUF keys, tokenizer and chat-template facts, so a new
family is one new module listed in ``FAMILIES``, not branches across the tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.families.base import Family, TinyFacts
from qwen_mlx.families.qwen2 import QWEN2
from qwen_mlx.families.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (QWEN2, QWEN3)

__all__ = [
    "FAMILIES",
    "QWEN2",
    "QWEN3",
    "Family",
    "TinyFacts",
    "by_gguf_arch",
    "by_name",
    "family_of",
    "find_family",
    "names",
    "supported",
    "tokenizer_family",
]


def names() -> tuple[str, ...]:
    """The families' names (``--arch`` choices)."""
    return tuple(family.name for family in FAMILIES)


def by_name(name: str, option: str = "the family") -> Family:
    """The family called ``name``; a one-line error listing the names otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"unknown {option} {name!r}; choose one of {', '.join(names())}")


def supported() -> str:
    """The models qwen-mlx handles, for messages: "Qwen2 and Qwen2.5 models (…)"."""
    return "; ".join(family.description for family in FAMILIES)


def find_family(config: dict[str, Any]) -> Family | None:
    """The family config.json describes, or None when no family does."""
    return next((family for family in FAMILIES if family.matches(config)), None)


def by_gguf_arch(arch: str) -> Family:
    """The family a GGUF's ``general.architecture`` names (the first family for another, so
    a GGUF of some other model still runs, without think blocks of its own)."""
    found = (family for family in FAMILIES if family.gguf_arch.lower() == arch.lower())
    return next(found, next(f for f in FAMILIES if not f.thinks))


def family_of(config: dict[str, Any], where: str | Path) -> Family:
    """The family of the model whose config.json is ``config``; a one-line error naming
    ``where`` (the model folder) when qwen-mlx does not support it."""
    family = find_family(config)
    if family is None:
        archs = config.get("architectures") or ["no architecture named"]
        raise UserError(
            f"{where} is {archs[0]} (model_type {config.get('model_type')}); "
            f"qwen-mlx supports {supported()}"
        )
    return family


_ATTRIBUTE = "qwen_mlx_family"  # set on a tokenizer by tokens.load_tokenizer


def tokenizer_family(tokenizer: Any) -> Family:
    """The family of the model folder ``tokenizer`` was loaded from (its config.json), so
    code that holds only a tokenizer asks the family for tokens and think tags; the first
    family when the folder does not say."""
    family = getattr(tokenizer, _ATTRIBUTE, None)
    if family is None:
        config = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "config.json"
        try:
            family = find_family(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            family = None
        family = family or FAMILIES[0]
        setattr(tokenizer, _ATTRIBUTE, family)
    return family
