"""A data review: the decisions on each record, and the reviewed files they make.

Decisions (``accept``, ``edit`` — accepted with new text —, ``reject``) are lines of
``review-ledger.jsonl`` beside the data (:mod:`~qwen_mlx.review.ledger`). After every
decision the reviewed set is written again, whole, through a temporary file and a rename:
``reviewed/<file>`` for each file under review (``reviewed/train.jsonl``,
``reviewed/test.jsonl`` for a distilled folder; other formats as ``.jsonl``) and
``reviewed/review.json`` (the counts). A record stays in the file it came from, so a test
record, kept or rejected, never reaches train; a rejected one is in neither. Records nobody
has decided on yet are kept as they are, unless ``only_reviewed``. The files under review
are only ever read.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from qwen_mlx.fsutil import write_json, write_jsonl
from qwen_mlx.outputs import claim_files, record_files, writing
from qwen_mlx.review.ledger import Ledger
from qwen_mlx.review.records import DataSet, Item, check_fields, load

COMMAND = "review"
LEDGER = "review-ledger.jsonl"
REVIEWED = "reviewed"
SUMMARY = "review.json"
STATUS = {"accept": "accepted", "edit": "accepted", "reject": "rejected"}


def output_name(path: Path) -> str:
    return path.name if path.suffix == ".jsonl" else f"{path.stem}.jsonl"


class Review:
    """The records under review, the ledger of decisions on them, and their state."""

    def __init__(self, target: Path, only_reviewed: bool = False):
        self.data: DataSet = load(target)
        self.items: dict[str, Item] = self.data.by_id()
        self.only_reviewed = only_reviewed
        root = self.data.root
        self.out_dir = root / REVIEWED
        self.outputs = [output_name(f) for f in self.data.files]
        # Refused before anything is written: a reviewed file edited by hand, or not ours.
        claim_files(self.out_dir, COMMAND, [*self.outputs, SUMMARY], inputs=self.data.files)
        claim_files(root, COMMAND, [LEDGER], inputs=self.data.files)
        record_files(root, COMMAND, [], grows=[LEDGER])
        self.ledger = Ledger(root / LEDGER)
        self.lock = threading.Lock()  # one decision at a time, files written in ledger order
        self.states: dict[str, dict] = {key: _unreviewed() for key in self.items}
        self.stale = 0  # decisions on records no longer in the data
        for entry in self.ledger.entries:
            self._apply(entry)
        self.materialise()

    def _apply(self, entry: dict) -> None:
        item = self.items.get(entry["id"])
        if item is None:
            self.stale += 1
            return
        state = self.states[item.id]
        fields = entry.get("fields")
        if isinstance(fields, dict):
            state["edits"] = {**(state["edits"] or item.fields()), **fields}
        state["edited"] = state["edits"] is not None and state["edits"] != item.fields()
        state["status"] = STATUS.get(entry.get("action"), state["status"])
        state.update(version=entry["version"], reviewer=entry.get("reviewer"))
        state["time"] = entry.get("time")

    def decide(self, key: str, action: str, base_version: int, reviewer: str, fields=None) -> dict:
        """Record a decision and write the reviewed files; the record's new state.
        KeyError: no such record; ValueError: a bad action or field; Conflict: see ledger."""
        item = self.items[key]
        if action not in STATUS:
            raise ValueError(f"action: expected one of {', '.join(STATUS)}")
        extra = {"action": action, "where": f"{item.file}:{item.line}"}
        if action == "edit":
            extra["fields"] = check_fields(item, fields)
        with self.lock:
            entry = self.ledger.add(key, base_version, reviewer, **extra)
            self._apply(entry)
            self.materialise()
        return self.state(key)

    def state(self, key: str) -> dict:
        return {"id": key, **self.states[key]}

    def changed_since(self, seq: int) -> list[dict]:
        keys = dict.fromkeys(e["id"] for e in self.ledger.since(seq) if e["id"] in self.items)
        return [self.state(key) for key in keys]

    def counts(self) -> dict:
        states = self.states.values()
        status = Counter(s["status"] for s in states)
        return {
            "total": len(self.states),
            "reviewed": status["accepted"] + status["rejected"],
            "accepted": status["accepted"],
            "edited": sum(s["edited"] and s["status"] == "accepted" for s in states),
            "rejected": status["rejected"],
            "unreviewed": status["unreviewed"],
            "stale_decisions": self.stale,
            "by_reviewer": dict(Counter(s["reviewer"] for s in states if s["reviewer"])),
        }

    def kept(self, file: str) -> list[dict]:
        """The records of ``file`` as the reviewed set holds them, in their order."""
        out = []
        for item in self.data.items:
            state = self.states[item.id]
            if item.file != file or state["status"] == "rejected":
                continue
            if self.only_reviewed and state["status"] == "unreviewed":
                continue
            out.append(item.edited(state["edits"]) if state["edits"] else item.raw)
        return out

    def materialise(self) -> None:
        """Write ``reviewed/`` from the decisions so far (temp name, then rename)."""
        names = [*self.outputs, SUMMARY]
        with writing(self.out_dir, COMMAND, names):
            for path, name in zip(self.data.files, self.outputs, strict=True):
                write_jsonl(self.out_dir / name, self.kept(path.name))
            summary = {
                "data": [str(f) for f in self.data.files],
                "ledger": str(self.ledger.path),
                "only_reviewed": self.only_reviewed,
                **self.counts(),
            }
            write_json(self.out_dir / SUMMARY, summary)


def _unreviewed() -> dict:
    return {
        "status": "unreviewed",
        "edited": False,
        "edits": None,
        "version": 0,
        "reviewer": None,
        "time": None,
    }
