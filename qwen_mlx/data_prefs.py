"""Preference data told apart from SFT data by its shape, and read as pairs for DPO/ORPO.

DPO/ORPO pairs (``chosen``/``rejected`` on alpaca, sharegpt, messages or TRL's
``prompt``/``chosen``/``rejected``; ``chosen_messages``/``rejected_messages``; OpenAI's
``input``/``preferred_output``/``non_preferred_output``) and KTO records (a true/false
``label``) are not supervised examples: training on them as such would teach the rejected or
``label: false`` answers. With ``training.objective: sft`` they are refused, or, when the user
asks for it (``--sft-from-preferences``), turned into the SFT record of the chosen /
label-true answer.

For DPO/ORPO a pair becomes :class:`Pair`: the prompt turns both sides share, the chosen
turn(s) and the rejected turn(s), each side read through the one SFT reader
(:func:`qwen_mlx.data_formats.normalize`), so every format's system prompt, history and tools
are read the same way. Its record form is TRL's conversational
``{"prompt": [...], "chosen": [...], "rejected": [...]}``, itself a recognised pair format.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.data_tools import RecordError, json_type
from qwen_mlx.errors import UserError

# The keys of a pair's two answers, in each format (OpenAI's preference fine-tuning last).
SIDES = (
    ("chosen", "rejected"),
    ("chosen_messages", "rejected_messages"),
    ("preferred_output", "non_preferred_output"),
)
PAIR_KEYS = tuple(key for side in SIDES for key in side)
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


def _from_openai(obj: dict) -> dict:
    """OpenAI's preference format: ``input`` holds the conversation (and tools), the
    preferred output the assistant turn(s) that follow it."""
    given = obj.get("input")
    if not isinstance(given, dict):
        raise RecordError(f"input: expected an object with messages, got {json_type(given)}")
    answer = obj.get("preferred_output")
    if not isinstance(answer, list):
        raise RecordError(f"preferred_output: expected a list of messages, got {json_type(answer)}")
    turns = given.get("messages")
    if not isinstance(turns, list):
        raise RecordError(f"input.messages: expected a list, got {json_type(turns)}")
    rest = {k: v for k, v in given.items() if k not in ("messages", "parallel_tool_calls")}
    return {**rest, "messages": turns + answer}


def _from_pair(obj: dict) -> dict:
    rest = {k: v for k, v in obj.items() if k not in PAIR_KEYS}
    if "preferred_output" in obj:
        return _from_openai(obj)
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


# ---------------------------------------------------------------- pairs for DPO/ORPO


@dataclass
class Pair:
    """A preference pair in normalized turns: the shared prompt, then either answer."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list | None = None

    def record(self) -> dict:
        """TRL's conversational form (a pair format qwen-mlx reads back)."""
        out = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {**out, "tools": self.tools} if self.tools else out

    def conversations(self) -> tuple[list[dict], list[dict]]:
        """The chosen and the rejected conversation; the prompt's own assistant turns are
        context (``weight: 0``), so only the answers are targets."""
        context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in self.prompt]
        return context + self.chosen, context + self.rejected

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected


def swapped(obj: dict) -> dict:
    """The pair with its two answers exchanged (its rejected side read as the chosen one)."""
    out = dict(obj)
    for good, bad in SIDES:
        for key, value in ((good, obj.get(bad)), (bad, obj.get(good))):
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
    return out


def read_pair(obj: dict, system_prompt: str | None = None) -> Pair:
    """One pair record of any recognised pair format → :class:`Pair`; a record that cannot
    be read raises :class:`RecordError` naming the field."""
    from qwen_mlx.data_formats import normalize

    chosen, _ = normalize(_from_pair(obj), system_prompt)
    rejected, _ = normalize(_from_pair(swapped(obj)), system_prompt)
    a, b = chosen["messages"], rejected["messages"]
    start = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    start = min(len(a), len(b)) if start is None else start
    # The answer starts at the first turn after the last user/tool turn both share.
    while start > 0 and a[start - 1]["role"] == "assistant":
        start -= 1
    if start == 0 or a[:start] != b[:start]:
        raise RecordError("chosen and rejected do not follow the same prompt")
    return Pair(a[:start], a[start:], b[start:], chosen.get("tools"))


@dataclass
class PairReport:
    """What reading pair files kept, dropped and skipped, and why."""

    kept: int = 0
    duplicates: int = 0
    identical: int = 0  # chosen and rejected the same: nothing to prefer (dropped)
    problems: list[str] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"{self.kept} preference pairs kept"]
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicates removed")
        if self.identical:
            parts.append(
                f"{self.identical} pairs dropped whose chosen and rejected answers are the same "
                "(nothing to prefer)"
            )
        if self.problems:
            parts.append(f"{len(self.problems)} bad records skipped")
        return ", ".join(parts)


def _format(obj: dict) -> str:
    for key, name in (
        ("preferred_output", "openai-preference"),
        ("chosen_messages", "messages"),
        ("instruction", "alpaca"),
        ("conversations", "sharegpt"),
        ("messages", "messages"),
        ("prompt", "trl"),
    ):
        if key in obj:
            return name
    return "pairs"


def sft_refusal(source: str, objective: str) -> UserError:
    return UserError(
        f"{source}: not a preference pair (no chosen/rejected); training.objective {objective} "
        "trains on pairs (make them with `qwen-mlx data pairs RUN --data FILE -o pairs.jsonl`), "
        "or set training.objective: sft to train on this file"
    )


def load_pairs(
    paths: list[str | Path], objective: str, system_prompt: str | None = None
) -> tuple[list[tuple[Pair, str]], PairReport]:
    """Every pair of ``paths`` with its ``file:line``; SFT or KTO data is one error line."""
    from qwen_mlx.data import read_raw

    report, pairs, seen = PairReport(), [], set()
    for path in paths:
        for line, obj in read_raw(path):
            source = f"{path}:{line}"
            kind = preference_kind(obj)
            if kind == "kto":
                raise UserError(
                    f"{source}: KTO data (answers labelled true/false) is not pairs; "
                    f"training.objective {objective} needs chosen/rejected pairs"
                )
            if kind is None and not isinstance(obj, RecordError):
                raise sft_refusal(source, objective)
            try:
                if isinstance(obj, RecordError):
                    raise obj
                pair = read_pair(obj, system_prompt)
            except RecordError as err:
                report.problems.append(f"{source}: {err}")
                continue
            if pair.identical:
                report.identical += 1
                continue
            key = json.dumps(pair.record(), ensure_ascii=False, sort_keys=True)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            report.formats[_format(obj)] += 1
            pairs.append((pair, source))
    report.kept = len(pairs)
    return pairs, report


def is_pair_file(path: str | Path) -> bool:
    """Whether the first record of ``path`` is a preference pair (``data stats`` then
    describes pairs)."""
    from qwen_mlx.data import read_raw

    first = next(iter(read_raw(path)), None)
    return first is not None and preference_kind(first[1]) == "pair"


def pair_stats(path: str | Path, model_dir: str | Path | None, max_seq_length: int) -> dict:
    """``data stats`` of a pair file: pairs kept and dropped, formats and, with a tokenizer,
    each side's token lengths, what max_seq_length cuts or drops, and the packed rows."""
    from qwen_mlx.dataprep import _percentiles

    pairs, report = load_pairs([path], "dpo")
    result: dict[str, Any] = {
        "file": str(path),
        "pairs": report.kept,
        "bad_records": len(report.problems),
        "problems": report.problems,
        "duplicates_removed": report.duplicates,
        "identical_dropped": report.identical,
        "formats": dict(report.formats),
    }
    if model_dir is None:
        return result
    from qwen_mlx.tokens import encode_pairs, load_tokenizer, pack_pairs

    tokenizer = load_tokenizer(model_dir)
    samples, enc = encode_pairs(tokenizer, [p for p, _ in pairs], max_seq_length)
    result["chosen_tokens"] = _percentiles([c for c, _ in enc.lengths])
    result["rejected_tokens"] = _percentiles([r for _, r in enc.lengths])
    result["max_seq_length"] = max_seq_length
    result["truncated"] = enc.truncated
    result["prompt_too_long_dropped"] = enc.prompt_too_long
    result["identical_after_truncation_dropped"] = enc.identical
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = pack_pairs(samples, 2 * max_seq_length, pad, packing=True)
    result["packed_rows"] = len(rows)
    return result
