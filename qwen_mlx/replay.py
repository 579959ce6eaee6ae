"""``qwen-mlx data replay``: the base model's own answers to general prompts, as SFT records.

A model tuned on a few hundred rule Q&A drifts away from its base on everything else (writing,
arithmetic, ordinary chat). Mixing the base model's own answers to general prompts into
training (``data.replay_file``, ``data.replay_ratio``) keeps it near its base outside the
domain: self-distillation, with no one else's data. The prompts: the ``replay`` part of the
set this project wrote (:data:`GENERAL_PROMPTS`; its ``heldout`` part is what ``eval``
measures drift on), or the user's own file.

Answers are greedy by default, one record per prompt with ``kind: replay``; an answer cut
off at ``--max-tokens`` is left out (counted), since training on it would teach the model to
stop mid-sentence. Prompts are answered in batches as ``eval`` answers
(:func:`qwen_mlx.inference.answer_all`); every answer is appended to a progress file as it
arrives, so Ctrl-C or a crash loses at most the batch under way: the same command goes on
where it stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from qwen_mlx.answer_log import (
    answer_key,
    answer_logged,
    progress_path,
    publish,
    read_progress,
)
from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.errors import UserError
from qwen_mlx.outputs import claim_files

COMMAND = "data replay"
REPLAY, HELDOUT = "replay", "heldout"  # the two parts of the bundled prompt set
_PROMPT_KEYS = ("prompt", "instruction", "question", "query")


def general_prompts() -> Path:
    """The general prompt set written by this project (shipped with the package)."""
    return Path(str(resources.files("qwen_mlx").joinpath("datasets", "general_prompts.jsonl")))


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]  # ends with the user's turn


# ---------------------------------------------------------------- prompts


def _messages(obj: dict) -> list[dict] | None:
    """The conversation a prompt line asks (without a trailing answer), or None."""
    if isinstance(obj.get("messages"), list):
        turns = [m for m in obj["messages"] if isinstance(m, dict)]
        while turns and turns[-1].get("role") == "assistant":
            turns.pop()
        ok = turns and turns[-1].get("role") == "user"
        return turns if ok and all(isinstance(m.get("content"), str) for m in turns) else None
    for key in _PROMPT_KEYS:
        if isinstance(obj.get(key), str) and obj[key].strip():
            text = obj[key] + (f"\n{obj['input']}" if isinstance(obj.get("input"), str) else "")
            return [{"role": "user", "content": text.strip()}]
    return None


def load_prompts(path: Path, split: str | None = None) -> list[Prompt]:
    """The prompts of a JSONL file (``messages`` ending with a user turn, or ``prompt`` /
    ``instruction`` / ``question``); ``split`` keeps the lines whose ``split`` is it."""
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{number}: not a JSON line") from None
            turns = _messages(obj) if isinstance(obj, dict) else None
            if turns is None:
                raise UserError(
                    f"{path}:{number}: no prompt: give messages ending with a user turn, or "
                    f"one of {', '.join(_PROMPT_KEYS)}"
                )
            if split is None or obj.get("split", split) == split:
                prompts.append(Prompt(str(obj.get("id", f"{path.name}:{number}")), turns))
    if not prompts:
        raise UserError(f"{path}: no prompts" + (f" in its {split} part" if split else ""))
    return prompts


def pick(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """``n`` prompts (all when None), the same ones for the same seed."""
    if n is None or n >= len(prompts):
        return prompts
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in sorted(order[:n])]


# ---------------------------------------------------------------- answering


@dataclass
class ReplayResult:
    out: Path
    written: int
    truncated: int
    reused: int  # answers found in the progress file of an earlier, interrupted run
    notes: list[str] = field(default_factory=list)


def _key(model: Path, settings: GenerationSettings, prompt: Prompt) -> str:
    """What an answer depends on: the model, the settings, the conversation."""
    what = [str(model.resolve()), settings.max_tokens, settings.temperature, prompt.messages]
    return answer_key(*what)


def _record(prompt: Prompt, answer: str, reasoning: str | None, model: str) -> dict:
    turn: dict[str, Any] = {"role": "assistant", "content": answer}
    if reasoning:
        turn["reasoning"] = reasoning
    source = {"prompt_id": prompt.id, "model": model}
    return {"messages": [*prompt.messages, turn], "kind": "replay", "source": source}


def _answer(engine, prompt: Prompt, reply, model: str) -> dict:
    """The progress entry of ``prompt``'s reply (:class:`qwen_mlx.inference.Completion`)."""
    from qwen_mlx.reasoning import split_reply

    if reply.finish_reason == "length":
        return {"truncated": True}
    reasoning, answer = split_reply(reply.text, engine.family.think_tags)
    return {"record": _record(prompt, answer.strip(), reasoning, model)}


def replay(
    model: Path,
    out: Path,
    *,
    prompts_file: Path | None = None,
    n: int | None = None,
    settings: GenerationSettings | None = None,
    backend: str = "auto",
    seed: int = 42,
    batch_size: int | None = None,
    console: Console,
) -> ReplayResult:
    """Answer the prompts with the base model ``model`` and write the records to ``out``."""
    from qwen_mlx.inference import open_engine

    settings = settings or GenerationSettings(max_tokens=512, temperature=0.0)
    prompts_path = prompts_file or general_prompts()
    prompts = pick(load_prompts(prompts_path, None if prompts_file else REPLAY), n, seed)
    progress = progress_path(out)
    claim_files(out.parent, COMMAND, [out.name, progress.name], [model, prompts_path])
    done = read_progress(progress)
    keys = {p.id: _key(model, settings, p) for p in prompts}
    todo = [p for p in prompts if keys[p.id] not in done]
    reused = len(prompts) - len(todo)
    if todo:
        engine = open_engine(None, model=model, backend=backend)

        def entry(i: int, reply) -> dict:
            return _answer(engine, todo[i], reply, model.name)

        asked = [(keys[p.id], p.messages) for p in todo]
        answer_logged(engine, asked, (settings, batch_size), progress, entry, console, COMMAND)
        done = read_progress(progress)
    entries = [done[keys[p.id]] for p in prompts]
    records = [e["record"] for e in entries if "record" in e]
    publish(out, COMMAND, records, progress)
    truncated = sum(1 for e in entries if e.get("truncated"))
    return ReplayResult(out, len(records), truncated, reused, _notes(truncated, settings))


def _notes(truncated: int, settings: GenerationSettings) -> list[str]:
    if not truncated:
        return []
    return [
        f"{truncated} answers reached --max-tokens {settings.max_tokens} and were left out "
        "(an answer cut off would teach the model to stop mid-sentence); raise --max-tokens "
        "to keep them"
    ]
