"""The ledger: every teacher reply, appended to a JSONL file the moment it arrives.

Each line is ``{"key": sha256 of (endpoint, model, messages, params), "reply": {...}}``,
flushed and fsynced before the caller sees the reply, so a rerun after Ctrl-C, a crash or
``kill -9`` asks the teacher nothing it already answered, and a different teacher (another
URL or model) is never answered from this one's replies. A torn last line (the process
died while writing it) is cut off on open; every complete line before it is kept, and a
line whose reply is not text is ignored (asked again), so no bad line can poison a rerun.

:func:`folder_lock` keeps two runs out of one output folder: both would send every request
and append to the same ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors

try:
    import fcntl
except ImportError:  # Windows: no flock; one run at a time is then up to the user
    fcntl = None

LOCK_NAME = ".distill.lock"


def request_key(endpoint: str, model: str, messages: list[dict], params: dict[str, Any]) -> str:
    """A stable hash of everything that decides the reply: who is asked, and what."""
    blob = json.dumps([endpoint, model, messages, params], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def valid_reply(reply: Any) -> bool:
    """A reply worth keeping: a dict whose ``content`` is text."""
    return isinstance(reply, dict) and isinstance(reply.get("content"), str)


class Ledger:
    """Replies by request key, backed by an append-only JSONL file (thread-safe).

    The file is read on first use, not on construction, so a run can take the folder's
    lock (:func:`folder_lock`) before it touches a ledger another run may be writing."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._replies: dict[str, dict] | None = None
        self._closed = False

    def _loaded(self) -> dict[str, dict]:
        if self._replies is None:
            self._replies = self._load() if self.path.is_file() else {}
        return self._replies

    def _load(self) -> dict[str, dict]:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: cut it so the next append starts clean
            with disk_errors(self.path), open(self.path, "r+b") as fh:
                fh.truncate(end)
        replies = {}
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                key, reply = entry["key"], entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line damaged some other way: that request is simply asked again
            if isinstance(key, str) and valid_reply(reply):
                replies[key] = reply
        return replies

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded())

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._loaded().get(key)

    def add(self, key: str, reply: dict) -> None:
        if not valid_reply(reply):
            raise ValueError("only a reply with text content is recorded")
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock, disk_errors(self.path):
            if self._closed:
                return  # after Ctrl-C: the count already told the user is final
            replies = self._loaded()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            replies[key] = reply

    def close(self) -> None:
        """No more lines: waits for a line being written, then refuses the rest quietly."""
        with self._lock:
            self._closed = True


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s lock file for the block; a second holder is refused in one line.

    ``flock`` dies with its process, so a killed run never leaves a stale lock; the file
    keeps the holder's PID for the message."""
    if fcntl is None:
        yield
        return
    path = folder / LOCK_NAME
    # Opened apart from the block below, so disk_errors names the lock file only for its own
    # faults; "a+" keeps the holder's PID readable until the lock is ours.
    with disk_errors(path):
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (closed by the `with fh` below)
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            raise UserError(
                f"{folder} is in use by another `{command}` (PID {pid}); wait for it to "
                "finish or stop it, or write to another folder with -o"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
