"""Easy Dataset's exports read as they are.

Its dataset export (app/projects/[projectId]/datasets/hooks/useDatasetExport.js) writes
alpaca (the question in ``instruction``, or in its "input" mode in ``input`` under an empty
instruction), "sharegpt" (OpenAI ``messages``), multilingual-thinking (``messages`` whose
turns carry ``thinking``) and a custom shape whose chain of thought is ``complexCOT``; as
JSON, JSONL or CSV, where a cell holding an object or list is its JSON text. Its LLaMA-Factory
export writes the multilingual-thinking file as indented objects one after the other. The
records here follow those field names, written by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from qwen_mlx.data import load_records

U, A, S = "user", "assistant", "system"


def roles(data: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in data["messages"]]


def easy_csv(path: Path, header: list[str], rows: list[dict]) -> Path:
    """A CSV as Easy Dataset writes one: objects as JSON text, null and '' as empty cells."""

    def cell(value):
        if isinstance(value, dict | list):
            return json.dumps(value, ensure_ascii=False)
        return "" if value is None else str(value)

    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[cell(row.get(h)) for h in header] for row in rows])
    return path


def thinking_record(system: str = "") -> dict:
    return {
        "reasoning_language": "Chinese",
        "developer": system,
        "user": "出差住宿标准？",
        "analysis": "先看职称，再看城市。",
        "final": "讲师到上海每晚500元。",
        "messages": [
            {"content": system, "role": "system", "thinking": None},
            {"content": "出差住宿标准？", "role": "user", "thinking": None},
            {
                "content": "讲师到上海每晚500元。",
                "role": "assistant",
                "thinking": "先看职称，再看城市。",
            },
        ],
    }


def test_alpaca_input_mode_json_and_csv(tmp_path):
    # "input" mode: the question in input, the instruction empty (a custom one, or none).
    rows = [
        {"instruction": "", "input": "发票丢了怎么办？", "output": "提供复印件。", "system": ""},
        {
            "instruction": "回答报销问题",
            "input": "住宿标准？",
            "output": "每晚500元。",
            "system": "",
        },
    ]
    as_json = tmp_path / "alpaca.json"
    as_json.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    header = ["instruction", "input", "output", "system"]
    as_csv = easy_csv(tmp_path / "alpaca.csv", header, rows)
    for path in (as_json, as_csv):
        records, report = load_records([path], dedup=False)
        assert not report.problems, report.problems
        assert [roles(r.data) for r in records] == [
            [(U, "发票丢了怎么办？"), (A, "提供复印件。")],
            [(U, "回答报销问题\n住宿标准？"), (A, "每晚500元。")],
        ]


def test_sharegpt_csv_holds_the_messages_as_json_text(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "你是报销助手"},
            {"role": "user", "content": "住宿标准？"},
            {"role": "assistant", "content": "<think>看城市。</think>\n每晚500元。"},
        ]
    }
    records, report = load_records([easy_csv(tmp_path / "sharegpt.csv", ["messages"], [row])])
    assert not report.problems, report.problems
    assert roles(records[0].data)[:2] == [(S, "你是报销助手"), (U, "住宿标准？")]


def test_multilingual_thinking_keeps_its_thinking_as_reasoning(tmp_path):
    header = ["reasoning_language", "developer", "user", "analysis", "final", "messages"]
    path = easy_csv(tmp_path / "thinking.csv", header, [thinking_record()])
    records, report = load_records([path])
    assert not report.problems, report.problems
    (answer,) = [m for m in records[0].data["messages"] if m["role"] == A]
    # the empty system turn is no system prompt; the thinking was once dropped silently
    assert [m["role"] for m in records[0].data["messages"]] == [U, A]
    assert answer["reasoning_content"] == "先看职称，再看城市。"


def test_llamafactory_export_of_multilingual_thinking_objects_one_after_another(tmp_path):
    path = tmp_path / "multilingual-thinking.json"
    objects = [thinking_record("你是报销助手"), thinking_record()]
    lines = "\n".join(json.dumps(o, ensure_ascii=False, indent=2) for o in objects)
    path.write_text(lines, encoding="utf-8")
    records, report = load_records([path], dedup=False)
    assert not report.problems and len(records) == 2
    second_starts = lines.split("\n").index("{", 1) + 1
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", str(second_starts)]
    assert roles(records[0].data)[0] == (S, "你是报销助手")


def test_custom_export_complex_cot_is_reasoning(tmp_path):
    # The custom export's defaults: instruction, output and complexCOT (the chain of thought).
    row = {"instruction": "住宿标准？", "output": "每晚500元。", "complexCOT": "按职称和城市查表。"}
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,), _ = load_records([path])
    answer = record.data["messages"][-1]
    assert (answer["content"], answer["reasoning_content"]) == ("每晚500元。", "按职称和城市查表。")
