"""Resumable checkpoints inside a run folder: ``checkpoints/step-000120/``.

Each checkpoint is complete on its own: the backend writes the adapter, optimizer state and
RNG state into it, and the loop writes ``state.json`` (step, epoch, position in the epoch,
data order, data fingerprint). Folders are written under a temporary name and renamed, so a
crash mid-save leaves the previous checkpoint intact. Only the newest few are kept.

A checkpoint that cannot be read back (a disk fault, a file copied half-way) is moved aside
as ``step-….corrupt`` when an older intact one is there to resume from instead.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import atomic_dir, disk_errors, remove_leftovers
from qwen_mlx.run_dir import RunDir

KEEP_LAST = 2
STATE_FILE = "state.json"
_NAME = re.compile(r"step-\d+")
T = TypeVar("T")


@dataclass
class LoopState:
    """Where training stands, at an optimizer-update boundary."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # epoch in progress
    window: int = 0  # next accumulation window within the epoch
    tokens: int = 0  # tokens trained on so far (all ranks)
    elapsed_s: float = 0.0
    order: list[int] = field(default_factory=list)  # row order of the epoch in progress
    data_fingerprint: str = ""


class CorruptCheckpoint(Exception):
    """A file of a checkpoint cannot be read back; the message names it and says why."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return RunDir(run_dir).checkpoints / f"step-{step:06d}"


def save(run_dir: Path, state: LoopState, write_backend_state: Callable[[Path], None]) -> Path:
    """Write a checkpoint for ``state``; the backend fills in adapter/optimizer/RNG files."""
    target = checkpoint_dir(run_dir, state.step)
    with atomic_dir(target) as tmp:
        write_backend_state(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    _prune(run_dir)
    return target


def _prune(run_dir: Path) -> None:
    for old in all_checkpoints(run_dir)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (not ones set aside as corrupt)."""
    folder = RunDir(run_dir).checkpoints
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def read_part(path: Path, reader: Callable[[Path], T]) -> T:
    """``reader(path)`` for one file of a checkpoint; any failure names the file."""
    if not path.exists():
        raise CorruptCheckpoint(f"{path} is missing")
    try:
        return reader(path)
    except Exception as err:  # whatever a format library raises, the file does not load
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpoint(f"{path} is unreadable ({reason[:200]})") from err


def _state(folder: Path) -> LoopState:
    return read_part(folder / STATE_FILE, lambda p: LoopState(**json.loads(p.read_bytes())))


def restore(
    run_dir: Path,
    load_backend_state: Callable[[Path], None],
    note: Callable[[str], None],
    main: bool = True,
) -> tuple[Path, LoopState]:
    """Load the newest checkpoint that reads back whole, and return it with its state.

    Newer ones that do not are moved aside (by the main rank) with a note each; when none
    is intact, nothing is moved and the error names the newest one's bad file.
    """
    if main:
        remove_leftovers(RunDir(run_dir).checkpoints)  # folders a killed save left half-written
        remove_leftovers(run_dir)
    found = all_checkpoints(run_dir)
    if not found:
        raise UserError(
            f"{run_dir} has no complete checkpoint to resume from; start a new run instead"
        )
    bad: list[tuple[Path, str]] = []
    for folder in reversed(found):
        try:
            state = _state(folder)
            load_backend_state(folder)
        except CorruptCheckpoint as err:
            bad.append((folder, str(err)))
            continue
        for broken, why in bad if main else ():
            aside = _set_aside(broken)
            note(f"{why}: moved {broken.name} aside as {aside.name}; resuming from {folder.name}")
        return folder, state
    more = f" (and {len(bad) - 1} older checkpoints)" if len(bad) > 1 else ""
    raise UserError(f"no intact checkpoint to resume from: {bad[0][1]}{more}; start a new run")


def _set_aside(folder: Path) -> Path:
    aside, n = folder.with_name(folder.name + ".corrupt"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.corrupt{n}")
    with disk_errors(aside):
        folder.rename(aside)
    return aside
