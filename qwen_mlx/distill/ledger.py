"""The ledger: every teacher reply, appended to a JSONL file the moment it arrives.

Each line is ``{"key": sha256 of (model, messages, params), "reply": {...}}``, flushed and
fsynced before the caller sees the reply, so a rerun after Ctrl-C, a crash or ``kill -9``
asks the teacher nothing it already answered. A torn last line (the process died while
writing it) is cut off on open; every complete line before it is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from qwen_mlx.fsutil import disk_errors


def request_key(model: str, messages: list[dict], params: dict[str, Any]) -> str:
    """A stable hash of everything that decides the teacher's reply."""
    blob = json.dumps([model, messages, params], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Ledger:
    """Replies by request key, backed by an append-only JSONL file (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._replies: dict[str, dict] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: cut it so the next append starts clean
            with disk_errors(self.path), open(self.path, "r+b") as fh:
                fh.truncate(end)
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                self._replies[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line damaged some other way: that request is simply asked again

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._replies.get(key)

    def add(self, key: str, reply: dict) -> None:
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock, disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._replies[key] = reply
