"""Resumable checkpoints inside a run folder: ``checkpoints/step-000120/``.

Each checkpoint is complete on its own: the backend writes the adapter, optimizer state and
RNG state into it, and the loop writes ``state.json`` (step, epoch, position in the epoch,
data order, data fingerprint). Folders are written under a temporary name and renamed, so a
crash mid-save leaves the previous checkpoint intact. Only the newest few are kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import atomic_dir

KEEP_LAST = 2
STATE_FILE = "state.json"


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


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


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
    """Complete checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest(run_dir: Path) -> tuple[Path, LoopState]:
    """The newest complete checkpoint and its state; a clear error when there is none."""
    found = all_checkpoints(run_dir)
    if not found:
        raise UserError(
            f"{run_dir} has no complete checkpoint to resume from; start a new run instead"
        )
    state = LoopState(**json.loads((found[-1] / STATE_FILE).read_text(encoding="utf-8")))
    return found[-1], state
