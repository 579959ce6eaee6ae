"""Atomic file and folder writes: nothing is ever left half-written.

Everything is written to a temporary name next to the target and renamed into place, so
an interrupted command leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.run_dir import ADAPTER, CHECKPOINTS, DATA, RUN_PARTS


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; give them the usual permissions."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _usual_modes(folder: Path) -> None:
    """The usual permissions for ``folder`` and everything in it: libraries that write
    through a temporary file of their own (safetensors does) leave it private (0600)."""
    _usual_mode(folder, directory=True)
    for path in folder.rglob("*"):
        _usual_mode(path, directory=path.is_dir())


# Write failures that are the disk's or the folder's, not a bug: errno -> what to do.
_SPACE = "free some space (or write elsewhere) and run it again"
_ACCESS = "choose a folder you can write to"
_DISK_FAULTS = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EFBIG: _SPACE,
    errno.EROFS: _ACCESS,
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.EIO: "check the disk",
}


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike) -> Iterator[None]:
    """A full disk or an unwritable folder while writing ``target``: one line naming both."""
    try:
        yield
    except OSError as err:
        fix = _DISK_FAULTS.get(err.errno)
        if fix is None:
            raise
        raise UserError(f"cannot write {target}: {os.strerror(err.errno)}; {fix}") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            if tmp_path.exists():
                _usual_mode(tmp_path, directory=False)
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)


# The names atomic_path and atomic_dir give their temporary files and folders (mkstemp's
# eight random characters), so leftovers of a killed process can be told from anything else.
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files and folders that a killed write left in ``folder``."""
    found = [p for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name)] if folder.is_dir() else []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # a read-only folder: the next writer says so
                path.unlink()
    return found


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically (Chinese kept readable)."""
    write_text(target, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(target: str | os.PathLike, rows: Iterable[object]) -> int:
    """Write one JSON object per line atomically; return the number of lines."""
    count = 0
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; swap it in for ``target`` on success.

    An existing ``target`` is replaced (and deleted) once the new folder is complete, so it
    must be one the caller owns: a checkpoint, a run's adapter. Folders a user names go
    through :func:`output_dir`, which checks that first.
    """
    target = Path(target)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            _usual_modes(tmp)
            if target.exists():
                old = tmp.with_suffix(".old")  # unique like tmp: never someone else's folder
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- folders a user names (-o)

OUTPUT_MARK = ".qwen-mlx-output"  # in every -o folder a command writes: names the command
_RUN_FOLDERS = (ADAPTER, CHECKPOINTS, DATA, "eval", "eval-gguf")  # what train/eval write


def is_run_dir(path: Path) -> bool:
    """A training run folder, or a folder like the project's (with config.yaml)."""
    return any((path / part).exists() for part in RUN_PARTS)


def _protected(target: Path, inputs: Iterable[Path]) -> str | None:
    """Why ``target`` may never be replaced, even with --force (None: it may be)."""
    if is_run_dir(target):
        return "is a training run folder (or holds config.yaml)"
    if target.name in _RUN_FOLDERS and is_run_dir(target.parent):
        return f"is part of the training run {target.parent}"
    if any(is_run_dir(child) for child in target.iterdir() if child.is_dir()):
        return "holds training run folders"
    resolved = target.resolve()
    for path in inputs:
        if resolved == Path(path).resolve() or resolved in Path(path).resolve().parents:
            return f"holds this command's input {path}"
    return None


def check_output_dir(
    target: Path, command: str, force: bool = False, inputs: Iterable[Path] = ()
) -> None:
    """Refuse to replace a folder that ``command`` did not write (one line saying why).

    A new or empty folder is fine, and so is an earlier output of the same command (it
    carries OUTPUT_MARK); anything else needs --force. A run folder, a folder of runs and
    the command's own inputs are never replaced.
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file: give -o a folder path")
    why = _protected(target, inputs)
    if why:
        raise UserError(f"{target} {why}; {command} never replaces it: choose another -o folder")
    mark = target / OUTPUT_MARK
    names = sorted(p.name for p in target.iterdir())
    if not names or force or (mark.is_file() and mark.read_text().strip() == command):
        return
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    raise UserError(
        f"{target} already holds files that {command} did not write ({shown}); choose a new "
        "or empty folder, or pass --force to replace it"
    )


@contextlib.contextmanager
def output_dir(
    target: str | os.PathLike, command: str, force: bool = False, inputs: Iterable[Path] = ()
) -> Iterator[Path]:
    """:func:`atomic_dir` for the folder a user named with -o, after
    :func:`check_output_dir`; the result is marked as ``command``'s, so a rerun replaces it."""
    target = Path(target)
    check_output_dir(target, command, force, inputs)
    with atomic_dir(target) as tmp:
        yield tmp
        (tmp / OUTPUT_MARK).write_text(command + "\n", encoding="utf-8")
