"""Dataset reading: every format normalizes to the right messages; bad records are reported."""

from __future__ import annotations

import json

import pytest

from qwen_mlx.data import load_records, normalize, split_records
from qwen_mlx.dataprep import prepare
from qwen_mlx.errors import UserError


def jsonl(path, rows, *, bom=False, crlf=False, blank_lines=False):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_lines:
        lines = [x for line in lines for x in (line, "")]
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


U, A, S = "user", "assistant", "system"


def roles(record):
    return [(m["role"], m["content"]) for m in record["messages"]]


def test_alpaca_with_input_system_and_history():
    data, fmt = normalize(
        {
            "system": "你是报销助手",
            "history": [["差旅费怎么报？", "先在网上报销系统填单。"]],
            "instruction": "住宿标准是多少？",
            "input": "职称：副教授；城市：上海",
            "output": "每晚不超过600元。",
        }
    )
    assert fmt == "alpaca"
    assert roles(data) == [
        (S, "你是报销助手"),
        (U, "差旅费怎么报？"),
        (A, "先在网上报销系统填单。"),
        (U, "住宿标准是多少？\n职称：副教授；城市：上海"),  # joined as LLaMA-Factory does
        (A, "每晚不超过600元。"),
    ]


def test_alpaca_empty_input_is_just_the_instruction():
    data, _ = normalize({"instruction": "发票丢了怎么办？", "input": "", "output": "提供复印件。"})
    assert roles(data) == [(U, "发票丢了怎么办？"), (A, "提供复印件。")]


def test_openai_messages_including_text_parts():
    data, fmt = normalize(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "多"}, {"type": "text", "text": "段"}],
                },
                {"role": "assistant", "content": "好"},
            ]
        }
    )
    assert fmt == "chat"
    assert roles(data) == [(S, "sys"), (U, "多段"), (A, "好")]


def test_sharegpt_multi_round_with_system_turn():
    data, fmt = normalize(
        {
            "conversations": [
                {"from": "system", "value": "规则助手"},
                {"from": "human", "value": "问一"},
                {"from": "gpt", "value": "答一"},
                {"from": "human", "value": "问二"},
                {"from": "gpt", "value": "答二"},
            ]
        }
    )
    assert fmt == "sharegpt"
    assert roles(data) == [(S, "规则助手"), (U, "问一"), (A, "答一"), (U, "问二"), (A, "答二")]


def test_prompt_completion_and_text():
    data, fmt = normalize({"prompt": "Q", "completion": "A"})
    assert fmt == "completion" and roles(data) == [(U, "Q"), (A, "A")]
    data, fmt = normalize({"text": "第一条 为规范经费管理……"})
    assert fmt == "text" and data == {"text": "第一条 为规范经费管理……"}


def test_config_system_prompt_only_where_missing():
    data, _ = normalize({"instruction": "q", "output": "a"}, system_prompt="默认")
    assert roles(data)[0] == (S, "默认")
    data, _ = normalize({"instruction": "q", "output": "a", "system": "自带"}, system_prompt="默认")
    assert roles(data)[0] == (S, "自带")


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"instruction": "q"}, "output: missing (read as alpaca because of 'instruction'"),
        ({"instruction": "q", "output": "   "}, "output: empty text"),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "last message must come from the assistant",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no user turn"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "unsupported role 'critic'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unsupported role 'bot'"),
        ({"question": "q", "answer": "a"}, "unknown format"),
        (["not", "an", "object"], "expected a JSON object"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]"),
    ],
)
def test_bad_records_have_a_reason(obj, reason):
    from qwen_mlx.data import RecordError

    with pytest.raises(RecordError, match=None) as err:
        normalize(obj)
    assert reason in str(err.value)


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "q1", "output": "a1"},
            "{not json",
            {"instruction": "q2"},
            {"instruction": "q3", "output": "a3"},
        ],
    )
    records, report = load_records([path])
    assert [r.data["messages"][0]["content"] for r in records] == ["q1", "q3"]
    assert [p.source for p in report.problems] == [f"{path}:2", f"{path}:3"]
    assert "invalid JSON" in report.problems[0].reason
    assert report.kept == 2 and report.skipped == 2
    assert "2 bad records skipped" in report.summary()


def test_strict_makes_the_first_bad_record_fatal(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"prompt": "x"}])
    with pytest.raises(UserError, match=rf"{path.name}:2: completion"):
        load_records([path], strict=True)


def test_bom_crlf_and_blank_lines(tmp_path):
    rows = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(3)]
    path = jsonl(tmp_path / "d.jsonl", rows, bom=True, crlf=True, blank_lines=True)
    records, report = load_records([path])
    assert report.kept == 3 and not report.problems
    assert records[0].data["messages"][0]["content"] == "问题0"  # no BOM glued to the key
    assert records[2].source.endswith(":5")  # line numbers count the blank lines


def test_exact_duplicates_are_removed_and_counted(tmp_path):
    row = {"instruction": "q", "output": "a"}
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            row,
            row,
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    _records, report = load_records([path])
    assert report.kept == 1 and report.duplicates == 2  # same conversation in two formats
    assert "2 exact duplicates removed" in report.summary()


def test_json_list_csv_and_parquet(tmp_path):
    rows = [
        {"instruction": "差旅", "input": "", "output": "按标准"},
        {"prompt": "p", "completion": "c"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    records, _ = load_records([tmp_path / "d.json"])
    assert len(records) == 2
    (tmp_path / "d.csv").write_text(
        "instruction,input,output\n差旅,,按标准\n会议,,凭票\n", encoding="utf-8"
    )
    records, _ = load_records([tmp_path / "d.csv"])
    assert [roles(r.data) for r in records] == [
        [(U, "差旅"), (A, "按标准")],
        [(U, "会议"), (A, "凭票")],
    ]
    assert records[0].source.endswith("d.csv:2")
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist([{"text": "第一章 总则"}, {"text": "第二章 差旅"}])
    pyarrow.parquet.write_table(table, tmp_path / "d.parquet")
    records, _report = load_records([tmp_path / "d.parquet"])
    assert [r.data for r in records] == [{"text": "第一章 总则"}, {"text": "第二章 差旅"}]


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.docx").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load_records([tmp_path / "d.docx"])
    with pytest.raises(UserError, match="data file not found"):
        load_records([tmp_path / "missing.jsonl"])
    (tmp_path / "gbk.jsonl").write_bytes('{"text": "报销"}\n'.encode("gbk"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_records([tmp_path / "gbk.jsonl"])


def test_split_is_seeded_and_complete(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(100)]
    records, _ = load_records([jsonl(tmp_path / "d.jsonl", rows)])
    a = split_records(records, 0.1, 0.05, seed=7)
    b = split_records(records, 0.1, 0.05, seed=7)
    c = split_records(records, 0.1, 0.05, seed=8)
    assert {k: len(v) for k, v in a.items()} == {"train": 85, "valid": 10, "test": 5}
    assert [r.source for r in a["valid"]] == [r.source for r in b["valid"]]
    assert [r.source for r in a["valid"]] != [r.source for r in c["valid"]]
    every = sorted(r.source for part in a.values() for r in part)
    assert every == sorted(r.source for r in records)


def test_prepare_writes_split_and_report(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)] + ["oops"]
    result = prepare(
        [jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "out", valid_ratio=0.1, test_ratio=0.1
    )
    assert result.counts == {"train": 32, "valid": 4, "test": 4}
    lines = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 32 and "messages" in json.loads(lines[0])
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["skipped"][0]["source"].endswith("d.jsonl:41")
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,output\n"多行\n问题",回答\n\n只有问题\n', encoding="utf-8"
    )  # a quoted cell spans lines 2-3, line 4 is blank, line 5 lacks its output
    records, report = load_records([path])
    assert [r.source for r in records] == [f"{path}:2"]
    assert roles(records[0].data)[0] == (U, "多行\n问题")
    assert [p.source for p in report.problems] == [f"{path}:5"]


def test_a_null_line_is_a_counted_bad_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\nnull\n', encoding="utf-8")
    records, report = load_records([path])
    assert len(records) == 1
    assert [p.source for p in report.problems] == [f"{path}:2"]
    assert "expected a JSON object, got null" in report.problems[0].reason
    assert report.skipped == 1 and "1 bad records skipped" in report.summary()
