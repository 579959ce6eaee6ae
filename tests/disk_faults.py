"""A disk that fails on purpose, for the fault tests: full (ENOSPC) or read-only (EROFS).

Tests run as root in CI, where a chmod'ed folder stays writable, and no test can fill a real
disk; so the failures are injected where every writer ends up: Python's ``open``, the ``os``
calls ``tempfile`` uses, and the safetensors writer PEFT calls.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path


class FaultyDisk:
    """Writes to paths that ``hits`` fail once ``armed()``, as a full disk (ENOSPC: files
    open, data does not go in) or a read-only folder (EROFS: nothing is created or renamed)
    fails them, for every writer: Python files, the os calls tempfile uses, and the
    safetensors writer PEFT calls (which reports the errno inside its own error)."""

    def __init__(self, monkeypatch, code: int, hits: Callable[[str], bool], armed=lambda: True):
        self.code, self.hits, self.armed, self.full = code, hits, armed, False
        self.failed: list[str] = []
        self.read_only = code != errno.ENOSPC
        fakes = [
            (builtins, "open", self._open(builtins.open)),
            (io, "open", self._open(io.open)),
            (os, "open", self._os_open(os.open)),
            (os, "mkdir", self._creating(os.mkdir)),
            (os, "replace", self._renaming(os.replace)),
            (os, "rename", self._renaming(os.rename)),
        ]
        try:
            import peft.peft_model as peft_model
        except ImportError:
            peft_model = None
        if peft_model is not None:
            fakes.append(
                (peft_model, "safe_save_file", self._safetensors(peft_model.safe_save_file))
            )
        for target, name, fake in fakes:
            monkeypatch.setattr(target, name, fake)

    def _fails(self, path) -> bool:
        self.full = self.full or self.armed()  # once full, the disk stays full
        path = os.path.abspath(os.fspath(path))
        if self.full and self.hits(path):
            self.failed.append(path)
            return True
        return False

    def _error(self, path) -> OSError:
        return OSError(self.code, os.strerror(self.code), os.fspath(path))

    def _open(self, real):
        def fake(file, mode="r", *args, **kwargs):
            writes = isinstance(file, str | os.PathLike) and set(mode) & set("wax+")
            if not (writes and self._fails(file)):
                return real(file, mode, *args, **kwargs)
            if self.read_only:
                raise self._error(file)
            return self._full_file(file, mode, *args, **kwargs)

        return fake

    def _os_open(self, real):
        def fake(path, flags, *args, **kwargs):
            creates = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if creates and self.read_only and self._fails(path):
                raise self._error(path)
            return real(path, flags, *args, **kwargs)

        return fake

    def _creating(self, real):
        def fake(path, *args, **kwargs):
            if self.read_only and self._fails(path):
                raise self._error(path)
            return real(path, *args, **kwargs)

        return fake

    def _renaming(self, real):
        def fake(src, dst, *args, **kwargs):
            if self.read_only and self._fails(dst):
                raise self._error(dst)
            return real(src, dst, *args, **kwargs)

        return fake

    def _safetensors(self, real):
        def fake(tensors, filename, *args, **kwargs):
            from safetensors import SafetensorError

            if self._fails(filename):
                why = f"{os.strerror(self.code)} (os error {self.code})"
                raise SafetensorError(f"Error while serializing: I/O error: {why}")
            return real(tensors, filename, *args, **kwargs)

        return fake

    def _full_file(
        self,
        file,
        mode,
        buffering=-1,
        encoding=None,
        errors=None,
        newline=None,
        closefd=True,
        opener=None,
    ):
        """A real file object whose data never reaches the disk (ENOSPC on every write)."""
        code = self.code

        class Full(io.FileIO):
            def write(self, data):
                raise OSError(code, os.strerror(code), self.name)

        raw = Full(file, mode.replace("b", "").replace("t", ""))
        buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(
            buffered, encoding=encoding or "utf-8", errors=errors, newline=newline
        )


CODES = {"full-disk": errno.ENOSPC, "read-only": errno.EROFS}
CAUSES = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}


def under(folder: Path) -> Callable[[str], bool]:
    folder = os.path.abspath(folder)
    return lambda path: path == folder or path.startswith(folder + os.sep)
