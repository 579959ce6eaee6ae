"""``report.json`` and ``report.md`` for a distill run: what was read, asked, kept, dropped.

Nothing secret goes in: the teacher URL is written without credentials
(:func:`~qwen_mlx.distill.transport.public_url`), and the key never reaches a report.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwen_mlx.distill.transport import public_url
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_json, write_text

DROP_MEANING = {
    "near_duplicate": "question nearly repeats an earlier one",
    "unsupported": "the teacher found the answer not supported by its passage",
    "empty": "empty answer",
    "truncated": "answer cut off at max_tokens",
    "meta": "answer talks about 'the passage' instead of answering",
    "unparseable": "reply was not the JSON asked for, twice",
    "no_questions": "the teacher gave no questions for a chunk",
    "teacher_error": "request still failed after retries (asked again on a rerun)",
    "bad_reply": "reply was not a chat completion with text content, twice (never recorded)",
    "oversized": "reply far longer than the tokens asked for (never recorded)",
}


def markdown(report: dict) -> str:
    r, req = report["records"], report["requests"]
    lines = [
        "# Distill report",
        "",
        f"Teacher: `{report['teacher']['model']}` at {report['teacher']['url']}",
        "",
        "| documents | chunks | train | test | requests sent | HTTP attempts | from ledger | "
        "failed | prompt tokens | completion tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {len(report['documents'])} | {report['chunks']} | {r['train']} | {r['test']} | "
        f"{req['sent']} | {req['attempts']} | {req['from_ledger']} | {req['failed']} | "
        f"{req['prompt_tokens']} | {req['completion_tokens']} |",
        "",
        "## Documents",
        "",
    ]
    lines += [
        f"- {d['file']}: {d['chunks']} chunks, {d['characters']} characters"
        for d in report["documents"]
    ]
    lines += [f"- not read: {p}" for p in report["unreadable"]]
    lines += ["", "## Dropped", "", "| reason | count | meaning |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {DROP_MEANING.get(k, '')} |" for k, v in report["drops"].items()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> None:
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))


def settings(distill_config: Any) -> dict:
    """The run's ``distill.*`` settings as the report shows them (URL without credentials)."""
    shown = asdict(distill_config)
    if shown.get("teacher_url"):
        shown["teacher_url"] = public_url(shown["teacher_url"])
    return shown


def require_records(report: dict, out_dir: Path) -> None:
    """A run that kept nothing is a failure: say what dropped everything (exit 1)."""
    if sum(report["records"].values()):
        return
    if not report["chunks"]:
        raise UserError(
            "0 records: the documents gave no text to distill (see the skipped lines above); "
            "give .md .txt .docx .pdf or .html files with text in them"
        )
    drops = ", ".join(f"{k} {v}" for k, v in sorted(report["drops"].items(), key=lambda x: -x[1]))
    raise UserError(
        f"0 records from {report['chunks']} chunks: every question was dropped "
        f"({drops or 'the teacher gave none'}); see {out_dir / 'report.md'} for what each "
        "reason means"
    )
