"""Preference data told apart from SFT data by its shape.

DPO/ORPO pairs (``chosen``/``rejected``, ``chosen_messages``/``rejected_messages``) and KTO
records (a true/false ``label``) are not supervised examples: training on them as such would
teach the rejected or ``label: false`` answers. They are refused, or, when the user asks for
it (``--sft-from-preferences``), turned into the SFT record of the chosen / label-true answer.
"""

from __future__ import annotations

from typing import Any

from qwen_mlx.data_tools import RecordError, json_type
from qwen_mlx.errors import UserError

PAIR_KEYS = ("chosen", "rejected", "chosen_messages", "rejected_messages")
HOW = {
    "pair": (
        "preference pairs (chosen/rejected, for DPO/ORPO)",
        "train on the chosen answers only",
    ),
    "kto": ("KTO data (answers labelled true/false)", "train on the label-true answers only"),
}


def preference_kind(obj: Any) -> str | None:
    """``"pair"``, ``"kto"`` or None (not preference data)."""
    if not isinstance(obj, dict):
        return None
    if any(key in obj for key in PAIR_KEYS):
        return "pair"
    return "kto" if isinstance(obj.get("label"), bool) else None


def refusal(source: str, kind: str) -> UserError:
    what, then = HOW[kind]
    return UserError(
        f"{source}: this is {what}, not supported for SFT; to {then}, run "
        "`qwen-mlx data prepare FILE --sft-from-preferences` and train on its output"
    )


def _chosen_turn(chosen: Any, obj: dict) -> Any:
    """The chosen answer as a turn of the record's own format."""
    if isinstance(chosen, dict):
        return chosen
    if "conversations" in obj:
        return {"from": "gpt", "value": chosen}
    return {"role": "assistant", "content": chosen}


def _from_pair(obj: dict) -> dict:
    rest = {k: v for k, v in obj.items() if k not in PAIR_KEYS}
    if "chosen_messages" in obj:
        return {**rest, "messages": obj["chosen_messages"]}
    chosen = obj.get("chosen")
    if "instruction" in obj:
        return {**rest, "output": chosen}
    prompt = obj.get("prompt")
    if isinstance(prompt, str) and not isinstance(chosen, list):
        return {**rest, "completion": chosen}
    if prompt is not None:  # TRL's conversational pairs: the chosen turns follow the prompt
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        rest = {**{k: v for k, v in rest.items() if k != "prompt"}, "messages": turns}
    key = "conversations" if "conversations" in rest else "messages"
    turns = rest.get(key, [])
    if not isinstance(turns, list):
        raise RecordError(f"{key}: expected a list, got {json_type(turns)}")
    added = chosen if isinstance(chosen, list) else [_chosen_turn(chosen, rest)]
    return {**rest, key: turns + added}


def sft_record(obj: dict, kind: str) -> dict | None:
    """The SFT record a preference record stands for; None for a KTO ``label: false`` one."""
    if kind == "kto":
        return {k: v for k, v in obj.items() if k != "label"} if obj["label"] else None
    return _from_pair(obj)
