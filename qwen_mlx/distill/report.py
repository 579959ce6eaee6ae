"""``report.json`` and ``report.md`` for a distill run: what was read, asked, kept, dropped.

Kept records are counted by split, kind (answerable / unanswerable) and origin (question,
follow-up, paraphrase, unanswerable); the clusters of near-duplicate questions by split and
by size (records per cluster), with the largest listed so an over-eager merge shows.

Nothing secret goes in: the teacher URL is written without credentials
(:func:`~qwen_mlx.distill.transport.public_url`), and the key never reaches a report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwen_mlx.distill.transport import public_url
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import write_json, write_text

DROP_MEANING = {
    "duplicate": "question repeats one asked before, word for word",
    "near_test": "paraphrase came near a test question (it would leak the test)",
    "answered_in_documents": "'unanswerable' question that a chunk of the documents answers",
    "bad_topic": "unanswerable question without a short topic phrase for the refusal",
    "unsupported": "the teacher found the answer not supported by its passage",
    "empty": "empty answer",
    "truncated": "answer cut off at max_tokens",
    "meta": "answer talks about 'the passage' instead of answering",
    "unparseable": "reply was not the JSON asked for, twice",
    "no_questions": "the teacher gave no questions (for a chunk, rewordings or open questions)",
    "teacher_error": "request still failed after retries (asked again on a rerun)",
    "bad_reply": "reply was not a chat completion with text content, twice (never recorded)",
    "oversized": "reply far longer than the tokens asked for (never recorded)",
}


LARGEST = 5  # clusters listed in the report, largest first
SHOWN = 4  # questions shown of each


def tally(records: list[dict], key: str) -> dict[str, int]:
    """Records by ``kind`` (top level) or by a ``source`` field such as ``origin``."""
    values = Counter(r.get(key) or r["source"].get(key) for r in records)
    return dict(sorted(values.items()))


def cluster_summary(train: list[dict], test: list[dict]) -> dict:
    """Clusters by split and by size, and the largest ones with a few of their questions."""
    members: dict[int, list[dict]] = defaultdict(list)
    side: dict[int, str] = {}
    for name, records in (("train", train), ("test", test)):
        for r in records:
            members[r["source"]["cluster"]].append(r)
            side[r["source"]["cluster"]] = name
    sizes = Counter(len(m) for m in members.values())
    largest = sorted(members, key=lambda k: (-len(members[k]), k))[:LARGEST]
    return {
        "total": len(members),
        "train": sum(s == "train" for s in side.values()),
        "test": sum(s == "test" for s in side.values()),
        "sizes": {str(k): sizes[k] for k in sorted(sizes)},
        "largest": [
            {
                "cluster": k,
                "records": len(members[k]),
                "split": side[k],
                "questions": [r["instruction"] for r in members[k][:SHOWN]],
            }
            for k in largest
            if len(members[k]) > 1
        ],
    }


def _clusters_md(report: dict) -> list[str]:
    c = report["clusters"]
    lines = [
        "",
        "## Clusters",
        "",
        f"{c['total']} clusters of near-duplicate questions ({c['train']} train, {c['test']} "
        "test); a cluster is never split, so no test question has a near-duplicate in training.",
        "",
        "| records in the cluster | clusters |",
        "|---|---|",
    ]
    lines += [f"| {size} | {n} |" for size, n in c["sizes"].items()]
    if c["largest"]:
        lines += ["", "Largest:", ""]
        lines += [
            f"- cluster {x['cluster']} ({x['split']}, {x['records']} records): "
            + " / ".join(x["questions"])
            for x in c["largest"]
        ]
    return lines


def _kept_md(report: dict) -> list[str]:
    # answerable records by origin; an unanswerable one has no other origin
    origins = sorted({o for side in report["by_origin"].values() for o in side} - {"unanswerable"})
    lines = [
        "",
        "## Kept",
        "",
        f"{report['kept']} records kept, {report['dropped']} candidates dropped.",
        "",
        "| split | answerable | " + " | ".join(f"… {o}" for o in origins) + " | unanswerable |",
        "|---|---|---|" + "---|" * len(origins),
    ]
    for name in ("train", "test"):
        kinds, by = report["by_kind"][name], report["by_origin"][name]
        cells = [kinds.get("answerable", 0), *(by.get(o, 0) for o in origins)]
        cells.append(kinds.get("unanswerable", 0))
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    return lines


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
    lines += _kept_md(report) + _clusters_md(report)
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
