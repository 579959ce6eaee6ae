"""An append-only ledger of people's decisions: one JSON line each, on disk before it counts.

Each line is ``{"seq", "id", "version", "reviewer", "time", ...}``: ``id`` names what was
decided on (a record, an answer), ``version`` counts the decisions on that id (1, 2, …) and
``seq`` the lines of the file. A decision is flushed and fsynced before :meth:`Ledger.add`
returns, so a server killed at any moment (``kill -9``, power) has every decision whose save
the page was told of. A torn last line (the process died while writing it: never confirmed)
is cut off on open; any other line that is not a decision stops the server with its line
number, since someone edited the file by hand and guessing would lose a decision.

Two people deciding on the same id at once: each says which version they saw
(``base_version``), and the later one gets :class:`Conflict` with what the first decided,
so nobody's edit is replaced without them seeing it. One server per ledger: the file is
held with an exclusive ``flock`` while open (a second server is refused in one line).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors

try:
    import fcntl
except ImportError:  # Windows: no flock; one server per ledger is then up to the user
    fcntl = None

REQUIRED = ("seq", "id", "version")


class Conflict(Exception):
    """Someone decided on this id since the version the caller saw: ``current`` is theirs."""

    def __init__(self, current: dict | None):
        super().__init__("changed since it was loaded")
        self.current = current


class Ledger:
    """The decisions of one JSONL file, the latest by id, and the file held open to append."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.entries: list[dict] = []
        self.latest: dict[str, dict] = {}
        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fh = open(self.path, "a+b")  # noqa: SIM115 (held until close())
        self._hold()
        if created:
            _sync_folder(self.path.parent)  # the new file's name survives a crash too
        self._load()

    def _hold(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise UserError(
                f"{self.path} is in use by another `qwen-mlx review`; open that one's page "
                "(several people can share one server) or stop it first"
            ) from None

    def _load(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: never confirmed, so never counted
            with disk_errors(self.path):
                self._fh.truncate(end)
                os.fsync(self._fh.fileno())
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if line.strip():
                self._keep(_entry(line, f"{self.path}:{number}"))

    def _keep(self, entry: dict) -> None:
        self.entries.append(entry)
        self.latest[entry["id"]] = entry

    @property
    def seq(self) -> int:
        """The number of the last decision (0: none yet)."""
        return self.entries[-1]["seq"] if self.entries else 0

    def version(self, key: str) -> int:
        entry = self.latest.get(key)
        return entry["version"] if entry else 0

    def add(self, key: str, base_version: int, reviewer: str, **fields: Any) -> dict:
        """Append a decision on ``key`` made by someone who saw ``base_version``; raise
        :class:`Conflict` when another decision came first. Returns the entry, on disk."""
        with self.lock:
            if self.version(key) != base_version:
                raise Conflict(self.latest.get(key))
            entry = {
                "seq": self.seq + 1,
                "id": key,
                "version": base_version + 1,
                "reviewer": reviewer,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **fields,
            }
            line = json.dumps(entry, ensure_ascii=False) + "\n"
            with disk_errors(self.path):
                self._fh.write(line.encode("utf-8"))
                self._fh.flush()
                os.fsync(self._fh.fileno())
            self._keep(entry)
            return entry

    def since(self, seq: int) -> list[dict]:
        """The decisions after ``seq``, in order."""
        return [e for e in self.entries if e["seq"] > seq]

    def close(self) -> None:
        with self.lock:
            self._fh.close()


def _entry(line: bytes, where: str) -> dict:
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if not (isinstance(entry, dict) and all(k in entry for k in REQUIRED)):
        raise UserError(
            f"{where}: not a review decision (edited by hand?); restore the line or remove it, "
            "then start again"
        )
    return entry


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so a file created in it is still there after a crash (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported here (some file systems): the data itself is synced
    finally:
        os.close(fd)


def read_entries(path: Path) -> list[dict]:
    """The decisions of a ledger file, read without holding it (a server may have it open);
    a torn last line is left out."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    return [_entry(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


def latest(entries: list[dict]) -> dict[str, dict]:
    """The last decision on each id."""
    return {e["id"]: e for e in entries}
