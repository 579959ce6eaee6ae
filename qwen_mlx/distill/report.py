"""``report.json`` and ``report.md`` for a distill run: what was read, asked, kept, dropped."""

from __future__ import annotations

from pathlib import Path

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
}


def markdown(report: dict) -> str:
    r, req = report["records"], report["requests"]
    lines = [
        "# Distill report",
        "",
        f"Teacher: `{report['teacher']['model']}` at {report['teacher']['url']}",
        "",
        "| documents | chunks | train | test | requests sent | from ledger | failed | "
        "prompt tokens | completion tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(report['documents'])} | {report['chunks']} | {r['train']} | {r['test']} | "
        f"{req['sent']} | {req['from_ledger']} | {req['failed']} | {req['prompt_tokens']} | "
        f"{req['completion_tokens']} |",
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
