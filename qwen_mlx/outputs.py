"""What a command may write over: its own earlier outputs, never a user's file, an input or a run.

Every folder a command writes into carries a record, ``.qwen-mlx-output`` (JSON): for each
file written there, the command and the file's size and modification time right after the
write. A file that is not in the record was not written by us; one whose size or time
changed has been edited since. Neither is replaced: the user's work is never lost to a
rerun (``--force`` replaces only our own outputs: another command's, or edited ones).

Two kinds of writers use it:
- :func:`output_dir`: a command that writes a whole folder (fuse, adapter convert,
  tiny-model) and swaps it in for an earlier one;
- :func:`claim_files` + :func:`record_files`: a command that writes named files into a
  folder that may hold others (data prepare, data distill, export).
A training run folder, its parts and a command's own inputs are never written over.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import atomic_dir, disk_errors, write_json
from qwen_mlx.run_dir import ADAPTER, CHECKPOINTS, DATA, METRICS, RUN_PARTS

OUTPUT_MARK = ".qwen-mlx-output"
_RUN_FOLDERS = (ADAPTER, CHECKPOINTS, DATA, "eval", "eval-gguf")  # what train/eval write
_SHOWN = 3  # names listed in a refusal


# ---------------------------------------------------------------- the record


@dataclass(frozen=True)
class Record:
    """The record of one folder: ``files`` maps a relative path to (command, size, mtime);
    ``legacy`` is the command of an older one-line mark that listed no files."""

    files: dict[str, dict]
    legacy: str | None = None

    @classmethod
    def read(cls, folder: Path) -> Record:
        path = folder / OUTPUT_MARK
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return cls({})
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # qwen-mlx before the record: the command's name only
            return cls({}, text.strip() or None)
        files = data.get("files") if isinstance(data, dict) else None
        return cls(files if isinstance(files, dict) else {})

    def owner(self, rel: str, path: Path) -> tuple[str | None, bool]:
        """The command that wrote ``rel`` (None: not ours) and whether it changed since."""
        entry = self.files.get(rel)
        if not isinstance(entry, dict):
            return self.legacy, False
        if entry.get("size") is None:  # being written, or appended to (a ledger)
            return entry.get("command"), False
        try:
            stat = path.stat()
        except OSError:
            return entry.get("command"), False
        changed = (stat.st_size, stat.st_mtime_ns) != (entry.get("size"), entry.get("mtime_ns"))
        return entry.get("command"), changed


def _entry(path: Path, command: str, grows: bool) -> dict:
    if grows:
        return {"command": command, "size": None}
    stat = path.stat()
    return {"command": command, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Two commands recording into one folder at once: one waits (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_files(
    folder: Path,
    command: str,
    names: Iterable[str],
    grows: Iterable[str] = (),
    drop: Iterable[str] = (),
    about: Path | None = None,
) -> None:
    """Note in ``folder``'s record that ``command`` just wrote ``names`` (relative paths);
    ``grows``: files it writes or keeps appending to, recorded without size and time;
    ``drop``: entries to forget. A full disk is reported as writing ``about``."""
    folder = Path(folder)
    grows, drop = set(grows), set(drop)
    with disk_errors(about or folder / OUTPUT_MARK):
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            files = {k: v for k, v in Record.read(folder).files.items() if k not in drop}
            for name in [*names, *grows]:
                files[name] = _entry(folder / name, command, name in grows)
            if files:
                record = {"written_by": "qwen-mlx", "files": files}
                write_json(folder / OUTPUT_MARK, record, about or folder / OUTPUT_MARK)
            else:
                (folder / OUTPUT_MARK).unlink(missing_ok=True)


@contextlib.contextmanager
def writing(folder: Path, command: str, names: Iterable[str]) -> Iterator[None]:
    """Record ``names`` as ``command``'s while it writes them, with their size and time once
    written: a write killed half-way leaves files a rerun may still replace, and one that
    fails forgets the names it never wrote."""
    folder, names = Path(folder), list(names)
    about = folder / names[0]
    record_files(folder, command, [], grows=names, about=about)
    try:
        yield
    except BaseException:
        unwritten = [name for name in names if not (folder / name).exists()]
        with contextlib.suppress(UserError, OSError):  # the first error is the one to show
            record_files(folder, command, [], drop=unwritten, about=about)
        raise
    record_files(folder, command, names, about=about)


# ---------------------------------------------------------------- what is never written over


def is_run_dir(path: Path) -> bool:
    """A training run folder, or a folder like the project's (with config.yaml)."""
    return any((path / part).exists() for part in RUN_PARTS)


def _has_trained(path: Path) -> bool:
    """A folder that a training run wrote into (a project folder has config.yaml too)."""
    return any((path / part).exists() for part in (ADAPTER, CHECKPOINTS, METRICS))


def _run_part(path: Path) -> Path | None:
    """The training run that ``path`` is a part of (its config, metrics, adapter/…), if any."""
    path = path.resolve()
    for parent in path.parents:
        if _has_trained(parent):
            first = path.relative_to(parent).parts[0]
            return parent if first in (*_RUN_FOLDERS, *RUN_PARTS, "loss.png") else None
    return None


def _is_input(path: Path, inputs: Iterable[Path]) -> Path | None:
    """The input that is ``path`` or lies inside it."""
    resolved = path.resolve()
    for given in inputs:
        given_path = Path(given).resolve()
        if resolved == given_path or resolved in given_path.parents:
            return Path(given)
    return None


def holds_input(folder: Path, inputs: Iterable[Path]) -> Path | None:
    """The input that lies in ``folder`` (at any depth), if any."""
    resolved = Path(folder).resolve()
    for given in inputs:
        if resolved in Path(given).resolve().parents:
            return Path(given)
    return None


def _run_below(folder: Path) -> Path | None:
    """A training run folder at any depth below ``folder``."""
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            if is_run_dir(Path(root, name)):
                return Path(root, name)
    return None


def _protected(target: Path, inputs: Iterable[Path]) -> str | None:
    """Why the folder ``target`` may never be replaced, even with --force (None: it may be)."""
    if is_run_dir(target):
        return "is a training run folder (or holds config.yaml)"
    run = _run_part(target)
    if run is not None or (target.name in _RUN_FOLDERS and is_run_dir(target.parent)):
        return f"is part of the training run {run or target.parent}"
    given = _is_input(target, inputs)
    if given is not None:
        return f"holds this command's input {given}"
    below = _run_below(target)
    if below is not None:
        return f"holds the training run {below}"
    return None


# ---------------------------------------------------------------- whole folders (-o DIR)


def _files(folder: Path) -> Iterator[str]:
    """Every file below ``folder`` (relative, POSIX style) but the record itself."""
    for root, _, names in os.walk(folder):
        for name in names:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != OUTPUT_MARK:
                yield rel


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", …" if len(names) > _SHOWN else "")


def check_output_dir(
    target: Path, command: str, force: bool = False, inputs: Iterable[Path] = ()
) -> None:
    """Refuse to replace a folder unless everything in it is ``command``'s earlier output
    (or, with ``force``, another of our outputs). A user's file, a run at any depth and the
    command's own inputs are never replaced: one line says why."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file: give -o a folder path")
    why = _protected(target, inputs)
    if why:
        raise UserError(f"{target} {why}; {command} never replaces it: choose another -o folder")
    record = Record.read(target)
    foreign, others = [], []
    for rel in _files(target):
        owner, changed = record.owner(rel, target / rel)
        if owner is None:
            foreign.append(rel)
        elif owner != command or changed:
            others.append(f"{rel} ({owner}{', edited since' if changed else ''})")
    if foreign:
        raise UserError(
            f"{target} holds files that qwen-mlx did not write ({_shown(sorted(foreign))}); "
            f"{command} never deletes them: move them away or choose another -o folder"
        )
    if others and not force:
        raise UserError(
            f"{target} holds other outputs ({_shown(sorted(others))}); choose a new or empty "
            "folder, or pass --force to replace them"
        )


def _real(target: Path) -> Path:
    """A symlinked -o folder is written where it points (the link keeps working)."""
    return target.resolve() if target.is_symlink() else target


@contextlib.contextmanager
def output_dir(
    target: str | os.PathLike, command: str, force: bool = False, inputs: Iterable[Path] = ()
) -> Iterator[Path]:
    """:func:`~qwen_mlx.fsutil.atomic_dir` for the folder a user named with -o, after
    :func:`check_output_dir`; every file in it is recorded as ``command``'s."""
    target = _real(Path(target))
    check_output_dir(target, command, force, inputs)
    with atomic_dir(target) as tmp:
        yield tmp
        (tmp / OUTPUT_MARK).unlink(missing_ok=True)
        record_files(tmp, command, sorted(_files(tmp)))


# ---------------------------------------------------------------- named files in a folder


def claim_files(folder: Path, command: str, names: Iterable[str], inputs: Iterable[Path] = ()):
    """Refuse, before any work, to write ``names`` into ``folder`` where one of them would
    replace an input, a part of a training run, a file we did not write or one edited since."""
    folder = _real(Path(folder))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: give -o a folder path")
    record = Record.read(folder)
    for name in names:
        path = folder / name
        given = _is_input(path, inputs)
        if given is not None:
            raise UserError(f"{path} is this command's input {given}; choose another -o")
        run = _run_part(path)
        if run is not None:
            raise UserError(f"{path} is part of the training run {run}; choose another -o")
        if not (path.exists() or path.is_symlink()):
            continue
        owner, changed = record.owner(name, path)
        if owner != command or changed or path.is_symlink() or path.is_dir():
            why = "was edited since" if owner == command else "was not written by"
            raise UserError(
                f"{path} {why} qwen-mlx {command}; it is never replaced: move it away or "
                "choose another -o"
            )
