"""LLaMA-Factory's files read as LLaMA-Factory reads them, and ``data distill``'s for it.

The shapes below are LLaMA-Factory's documented ones (its data/README.md, the converters in
src/llamafactory/data/ and the v1 message format), written out here by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_mlx.cli import cli
from qwen_mlx.data import load_records
from qwen_mlx.data_formats import normalize
from qwen_mlx.data_llamafactory import resolve
from qwen_mlx.data_tools import RecordError
from qwen_mlx.errors import UserError
from qwen_mlx.tokens import encode_record, encode_records

U, A, S, T = "user", "assistant", "system", "tool"


def roles(data: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in data["messages"]]


def lf_folder(tmp_path: Path, info: dict, files: dict[str, object]) -> Path:
    """A LLaMA-Factory data folder: dataset_info.json and its files (lists as .json, text
    as it is)."""
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    return path


def read(info_path: Path, *names: str, **options):
    sources, _ = resolve([info_path], names)
    return load_records(sources, **options)


# ---------------------------------------------------------------- dataset_info.json


def test_alpaca_columns_are_mapped_and_joined_as_llamafactory_does(tmp_path):
    rows = [
        {
            "q": "住宿标准是多少？",
            "ctx": "职称：讲师",
            "a": "每晚500元。",
            "sys": "你是报销助手",
            "hist": [["差旅费怎么报？", "网上填单。"]],
            "system": "not declared, so not read",
        }
    ]
    info = {
        "rules": {
            "file_name": "rules.json",
            "columns": {
                "prompt": "q",
                "query": "ctx",
                "response": "a",
                "system": "sys",
                "history": "hist",
            },
        }
    }
    records, report = read(lf_folder(tmp_path, info, {"rules.json": rows}), "rules")
    assert not report.problems
    assert roles(records[0].data) == [
        (S, "你是报销助手"),
        (U, "差旅费怎么报？"),
        (A, "网上填单。"),
        (U, "住宿标准是多少？\n职称：讲师"),  # prompt + "\n" + query
        (A, "每晚500元。"),
    ]


def test_declared_columns_only_and_the_defaults_without_columns(tmp_path):
    rows = [{"instruction": "问", "input": "", "output": "答", "system": "系统", "history": []}]
    info = {
        "plain": {"file_name": "d.json"},  # no columns: instruction/input/output, no system
        "with_system": {
            "file_name": "d.json",
            "columns": {"prompt": "instruction", "response": "output", "system": "system"},
        },
    }
    path = lf_folder(tmp_path, info, {"d.json": rows})
    assert roles(read(path, "plain")[0][0].data) == [(U, "问"), (A, "答")]
    assert roles(read(path, "with_system")[0][0].data) == [(S, "系统"), (U, "问"), (A, "答")]


def test_sharegpt_with_tags_tools_and_function_calls(tmp_path):
    glaive = {
        "conversations": [
            {"from": "human", "value": "上海天气？"},
            {
                "from": "function_call",
                "value": '{"name": "weather", "arguments": {"city": "上海"}}',
            },
            {"from": "observation", "value": "晴"},
            {"from": "gpt", "value": "上海晴。"},
        ],
        "tools": '[{"name": "weather", "parameters": {"type": "object"}}]',
    }
    openai_style = {
        "messages": [
            {"role": "system", "content": "你是助手"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"},
        ],
        "sys": "the first turn is the system prompt: this column is not read",
    }
    info = {
        "glaive": {
            "file_name": "glaive.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "tools": "tools"},
        },
        "chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "system": "sys"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
    }
    path = lf_folder(tmp_path, info, {"glaive.json": [glaive], "chat.json": [openai_style]})
    (glaive_record,), _ = read(path, "glaive")
    call = glaive_record.data["messages"][1]
    assert call["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "上海"}}
    assert [m["role"] for m in glaive_record.data["messages"]] == [U, A, T, A]
    assert glaive_record.data["tools"][0]["function"]["name"] == "weather"
    (chat_record,), _ = read(path, "chat")
    assert roles(chat_record.data) == [(S, "你是助手"), (U, "你好"), (A, "你好！")]


def test_pretraining_text_entry_reads_a_txt_by_line(tmp_path):
    # wiki_demo: {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}}, a document
    # per line. It once became one record of the whole file, trained on its first tokens.
    lines = [f"Document {i}: " + "word " * 50 for i in range(5)]
    info = {"wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}}}
    path = lf_folder(tmp_path, info, {"wiki_demo.txt": "\n".join(lines) + "\n"})
    records, _ = read(path, "wiki_demo")
    assert [r.data for r in records] == [{"text": line} for line in lines]
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "2", "3", "4", "5"]


def test_ranking_entries_are_preference_data(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "住宿标准？"}],
            "chosen": {"from": "gpt", "value": "每晚500元。"},
            "rejected": {"from": "gpt", "value": "随便住。"},
        }
    ]
    info = {
        "dpo": {
            "file_name": "dpo.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        }
    }
    path = lf_folder(tmp_path, info, {"dpo.json": rows})
    with pytest.raises(UserError, match="preference pairs"):
        read(path, "dpo")
    (record,), _ = read(path, "dpo", from_preferences=True)
    assert roles(record.data) == [(U, "住宿标准？"), (A, "每晚500元。")]


def test_a_missing_column_names_it_and_the_dataset(tmp_path):
    info = {"qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a"}}}
    path = lf_folder(tmp_path, info, {"qa.json": [{"q": "问"}]})
    _, report = read(path, "qa")
    assert report.problems[0].reason == "a: missing (column 'a' of dataset 'qa')"


def test_prepare_with_dataset_names_and_its_errors(tmp_path):
    info = {
        "qa": {"file_name": "qa.json"},
        "hub": {"hf_hub_url": "llamafactory/alpaca_en"},
        "odd": {"file_name": "qa.json", "formatting": "multilingual-thinking"},
    }
    rows = [{"instruction": f"问{i}", "output": f"答{i}"} for i in range(10)]
    path = lf_folder(tmp_path, info, {"qa.json": rows})
    runner = CliRunner()
    out = tmp_path / "out"
    ok = runner.invoke(cli, ["data", "prepare", str(path), "--dataset", "qa", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "train.jsonl 9, valid.jsonl 1" in ok.output
    for args, message in [
        ([], "name the datasets to read with --dataset NAME (it lists: hub, odd, qa)"),
        (["--dataset", "nope"], "no dataset 'nope' (it lists: hub, odd, qa)"),
        (["--dataset", "hub"], "qwen-mlx reads local files only"),
        (["--dataset", "odd"], "'multilingual-thinking' is not one LLaMA-Factory reads"),
    ]:
        bad = runner.invoke(cli, ["data", "prepare", str(path), *args, "-o", str(tmp_path / "x")])
        assert bad.exit_code == 1 and message in " ".join(bad.output.split()), bad.output


# ---------------------------------------------------------------- v1 messages


V1_TEXT = [{"type": "text", "value": "每晚500元。"}]


def v1(role: str, content, weight=None) -> dict:
    turn = {"role": role, "content": content if isinstance(content, list) else V1_TEXT}
    return turn if weight is None else {**turn, "loss_weight": weight}


def test_v1_loss_weight_zero_is_not_trained(tiny_tokenizer):
    # LLaMA-Factory v1's loss_weight was ignored: a 0-weight answer was trained on.
    first, second = "先在网上填单。", "每晚500元。"
    turns = [
        v1(U, [{"type": "text", "value": "怎么报？"}], 0.0),
        v1(A, [{"type": "text", "value": first}], 0.0),
        v1(U, [{"type": "text", "value": "住宿标准？"}], 0.0),
        v1(A, [{"type": "text", "value": second}], 1.0),
    ]
    data, _ = normalize({"messages": turns})
    assert [m.get("weight") for m in data["messages"]] == [None, 0, None, None]
    plain = [(U, "怎么报？"), (A, first), (U, "住宿标准？"), (A, second)]
    openai = [{"role": role, "content": content} for role, content in plain]
    sample = encode_record(tiny_tokenizer, data)
    trained_all = encode_record(tiny_tokenizer, {"messages": openai})
    openai[1]["weight"] = 0
    assert sample == encode_record(tiny_tokenizer, {"messages": openai}) != trained_all
    targets = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    assert first not in tiny_tokenizer.decode(targets)
    assert second in tiny_tokenizer.decode(targets)


@pytest.mark.parametrize(
    ("turn", "reason"),
    [
        (v1(A, V1_TEXT, 0.5), "messages[1].loss_weight: expected 0 (context only) or 1"),
        ({**v1(U, V1_TEXT), "loss_weight": 1.0}, "messages[0].loss_weight: only assistant"),
    ],
)
def test_v1_weights_we_cannot_train_are_refused(turn, reason):
    turns = [v1(U, V1_TEXT, 0.0), v1(A, V1_TEXT, 1.0)]
    turns[0 if turn["role"] == U else 1] = turn
    with pytest.raises(RecordError, match=re.escape(reason)):
        normalize({"messages": turns})


def test_v1_reasoning_and_tool_call_parts():
    record = {
        "messages": [
            v1(S, [{"type": "text", "value": "你会用工具。"}]),
            v1(U, [{"type": "text", "value": "北京和上海的住宿标准？"}]),
            v1(
                A,
                [
                    {"type": "reasoning", "value": "要查两个城市。"},
                    {
                        "type": "tool_call",
                        "value": '{"name": "lookup", "arguments": {"city": "北京"}}',
                    },
                    {
                        "type": "tool_call",
                        "value": '{"name": "lookup", "arguments": {"city": "上海"}}',
                    },
                ],
            ),
            v1(T, [{"type": "text", "value": "550"}]),
            v1(T, [{"type": "text", "value": "500"}]),
            v1(A, [{"type": "reasoning", "value": "都查到了。"}, *V1_TEXT]),
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "lookup"}}]),
    }
    data, fmt = normalize(record)
    calls, answer = data["messages"][2], data["messages"][5]
    assert (
        fmt == "chat" and calls["content"] == "" and calls["reasoning_content"] == "要查两个城市。"
    )
    assert [c["function"]["arguments"] for c in calls["tool_calls"]] == [
        {"city": "北京"},
        {"city": "上海"},
    ]
    assert (answer["content"], answer["reasoning_content"]) == ("每晚500元。", "都查到了。")


# ---------------------------------------------------------------- long text


def test_long_text_records_are_windows_not_truncated(tiny_tokenizer):
    # A long document was truncated to its first max_seq_length tokens, the rest unseen.
    records = [{"text": "第一条 住宿费每晚不超过五百元。" * 200}, {"text": "短文一篇。"}]
    whole = encode_record(tiny_tokenizer, records[0])
    samples, report = encode_records(tiny_tokenizer, records, 64)
    assert report.truncated == 0 and report.windowed == 1
    assert all(len(s) <= 64 for s in samples)
    windows = samples[:-1]
    assert len(windows) == -(-len(whole) // 64)
    assert [t for s in windows for t in s.input_ids] == whole.input_ids
    # every token but each window's first is a target
    assert sum(map(sum, (s.loss_mask for s in windows))) == len(whole) - len(windows)


def test_data_stats_counts_windows_not_truncation(tmp_path, tiny_model_dir):
    from qwen_mlx.dataprep import stats

    path = tmp_path / "wiki.jsonl"
    rows = [{"text": "第一条 住宿费每晚不超过五百元。" * 200}, {"text": "短文一篇。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    result = stats(path, tiny_model_dir, max_seq_length=64)
    assert (result["truncated"], result["text_windowed"]) == (0, 1)
