"""A model's answers to many prompts, kept as they arrive: what ``data replay`` and
``data pairs`` share.

Each answer is appended (flushed and fsynced) to a progress file beside the command's output,
``OUT.partial``, keyed by what it depends on (:func:`answer_key`), so Ctrl-C or a crash loses
at most the batch under way and the same command goes on where it stopped, asking the model
nothing twice. The output itself is written once, whole, through
:func:`qwen_mlx.outputs.writing` (temp name, then rename), and only then is the progress file
removed: a reader never sees a partial output.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import track

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors, write_jsonl
from qwen_mlx.outputs import record_files, writing

Messages = list[dict]


class Stopped(UserError):
    """Ctrl-C: the answers so far are kept; the message says to run it again."""

    exit_code = 130


def answer_key(*what: Any) -> str:
    """A short stable hash of everything an answer depends on (JSON-able parts)."""
    blob = json.dumps(what, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def read_progress(path: Path) -> dict[str, dict]:
    """The entries an interrupted run kept, by key (a torn last line is ignored)."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                done[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return done


def answer_logged(
    engine,
    todo: list[tuple[str, Messages]],
    how: tuple[GenerationSettings, int | None],
    progress: Path,
    entry: Callable[[int, Any], dict],
    console: Console,
    command: str,
) -> None:
    """Answer each ``(key, conversation)`` of ``todo`` (``how``: the settings and batch size,
    through :func:`qwen_mlx.inference.answer_all`), appending ``{"key": …, **entry(i, reply)}``
    to ``progress`` (fsynced) as each reply arrives; ``progress`` is recorded as ``command``'s."""
    from qwen_mlx.inference import answer_all

    record_files(progress.parent, command, [], grows=[progress.name])
    with disk_errors(progress), open(progress, "a", encoding="utf-8") as fh:
        try:
            replies = answer_all(engine, [messages for _, messages in todo], *how)
            for i, reply in track(
                replies, total=len(todo), description="answering", console=console
            ):
                line = {"key": todo[i][0], **entry(i, reply)}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except KeyboardInterrupt:
            raise Stopped(
                f"stopped: the answers so far are kept in {progress}; run the same command "
                "again to go on"
            ) from None


def publish(out: Path, command: str, records: list[dict], progress: Path) -> None:
    """Write ``records`` to ``out`` whole (temp name, then rename), then drop ``progress``."""
    with writing(out.parent, command, [out.name]):
        write_jsonl(out, records)
    progress.unlink(missing_ok=True)
    record_files(out.parent, command, [], drop=[progress.name])
