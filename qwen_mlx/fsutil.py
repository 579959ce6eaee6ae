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


# Temporary files and folders are named ``.NAME.PID.XXXXXXXX[.EXT].tmp`` beside ``NAME`` (and
# a folder being swapped out ``….old``): the PID tells a killed writer's leftovers, which the
# next write of NAME deletes, from a live writer's, which it leaves alone.
_STALE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(?:\.[a-z0-9]+)?\.(?:tmp|old)")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (unsure counts as alive: keep its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # a read-only folder: the next writer says so
            path.unlink()


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete what killed writes of ``target`` left beside it (never a live writer's)."""
    found = []
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            match = _STALE.fullmatch(path.name)
            if match and match["name"] == target.name and not _alive(int(match["pid"])):
                found.append(path)
    for path in found:
        _remove(path)
    return found


def temp_name(target: Path, suffix: str = "") -> dict[str, str]:
    """mkstemp/mkdtemp arguments for a temporary ``target`` (``suffix``: e.g. ``.f16``)."""
    prefix = f".{target.name}.{os.getpid()}."
    return {"prefix": prefix, "suffix": f"{suffix}.tmp", "dir": str(target.parent)}


@contextlib.contextmanager
def scratch_file(beside: Path, suffix: str = "", about: Path | None = None) -> Iterator[Path]:
    """A temporary file next to ``beside`` (same disk), removed whatever happens."""
    with disk_errors(about or beside):
        beside.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(beside)
        fd, name = tempfile.mkstemp(**temp_name(beside, suffix))
        os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, about: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success
    (a full disk is reported as writing ``about``, by default ``target``)."""
    target = Path(target)
    with disk_errors(about or target), scratch_file(target, about=about) as tmp_path:
        yield tmp_path
        if tmp_path.exists():
            _usual_mode(tmp_path, directory=False)
        os.replace(tmp_path, target)


# Checkpoint saves (atomic_dir's older names, without a PID) that a killed process left half
# written: removed before a run resumes, when no other process writes there.
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.(?:tmp|old)")


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files and folders that a killed write left in ``folder``."""
    found = [p for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name)] if folder.is_dir() else []
    for path in found:
        _remove(path)
    return found


def write_text(target: str | os.PathLike, text: str, about: Path | None = None) -> None:
    """Write ``text`` (UTF-8) atomically (``about``: see :func:`atomic_path`)."""
    with atomic_path(target, about) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: object, about: Path | None = None) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically (Chinese kept readable)."""
    write_text(target, json.dumps(obj, ensure_ascii=False, indent=2) + "\n", about)


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
    through :func:`qwen_mlx.outputs.output_dir`, which checks that first.
    """
    target = Path(target)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(**temp_name(target)))
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
