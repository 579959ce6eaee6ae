"""Model families and the registry that picks one from a model's config.json.

Trainers, the memory estimate, ``check``, GGUF export, the Modelfile and the tiny-model
builder ask the family for shapes, GGUF keys, tokenizer and chat-template facts, so a new
family is one new module listed in ``FAMILIES``, not branches across the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.families.base import Family
from qwen_mlx.families.qwen2 import QWEN2
from qwen_mlx.families.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (QWEN2, QWEN3)

__all__ = ["FAMILIES", "QWEN2", "QWEN3", "Family", "family_of", "find_family", "supported"]


def supported() -> str:
    """The models qwen-mlx handles, for messages: "Qwen2 and Qwen2.5 models (…)"."""
    return "; ".join(family.description for family in FAMILIES)


def find_family(config: dict[str, Any]) -> Family | None:
    """The family config.json describes, or None when no family does."""
    return next((family for family in FAMILIES if family.matches(config)), None)


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
