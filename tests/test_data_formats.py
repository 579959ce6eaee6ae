"""The formats users bring: tool calls, weights, preference data, multimodal records,
placeholders and the common Chinese fine-tuning shapes (records written here by hand)."""

from __future__ import annotations

import json

import pytest

from qwen_mlx.data import RecordError, load_records, normalize
from qwen_mlx.dataprep import prepare
from qwen_mlx.errors import UserError

U, A, S, T = "user", "assistant", "system", "tool"
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}


def roles(record):
    return [(m["role"], m["content"]) for m in record["messages"]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


# ---------------------------------------------------------------- function calling


def test_openai_tool_calls_tool_turns_and_tools():
    data, fmt = normalize(
        {
            "tools": [{"type": "function", "function": WEATHER}],
            "messages": [
                {"role": "user", "content": "北京天气?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
                {"role": "assistant", "content": "北京晴。"},
            ],
        }
    )
    assert fmt == "chat"
    assert data["tools"] == [{"type": "function", "function": WEATHER}]
    assert data["messages"][1] == {"role": A, "content": "", "tool_calls": [CALL]}
    assert roles(data)[2:] == [(T, "晴"), (A, "北京晴。")]


def test_mlx_lm_tools_example_without_content():
    # mlx-lm's documented shape: an assistant turn with tool_calls and no content key at all.
    data, _ = normalize(
        {
            "messages": [
                {"role": "user", "content": "北京天气?"},
                {"role": "assistant", "tool_calls": [{"function": {**CALL["function"]}}]},
            ],
            "tools": [{"type": "function", "function": WEATHER}],
        }
    )
    assert data["messages"][-1]["tool_calls"] == [CALL]


def test_sharegpt_function_call_and_observation_with_tools_as_text():
    data, fmt = normalize(
        {
            "conversations": [
                {"from": "human", "value": "北京天气?"},
                {"from": "function_call", "value": json.dumps(CALL["function"])},
                {"from": "observation", "value": "晴"},
                {"from": "gpt", "value": "北京晴。"},
            ],
            "system": "天气助手",
            "tools": json.dumps([WEATHER]),
        }
    )
    assert fmt == "sharegpt"
    assert data["tools"] == [{"type": "function", "function": WEATHER}]
    assert data["messages"][2] == {"role": A, "content": "", "tool_calls": [CALL]}
    assert roles(data) == [(S, "天气助手"), (U, "北京天气?"), (A, ""), (T, "晴"), (A, "北京晴。")]


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([{"role": "tool", "content": "晴"}, {"role": "assistant", "content": "a"}], "tool result"),
        (
            [{"role": "assistant", "tool_calls": "{oops"}],
            "messages[1].tool_calls: not valid JSON",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"x": 1}]}],
            "tool_calls[0]: expected a function with a name",
        ),
    ],
)
def test_bad_tool_records_say_which_field(turns, reason):
    with pytest.raises(RecordError) as err:
        normalize({"messages": [{"role": "user", "content": "q"}, *turns]})
    assert reason in str(err.value)


# ---------------------------------------------------------------- fields kept


def test_top_level_system_beside_messages_is_kept():
    data, _ = normalize(
        {
            "system": "报销助手",
            "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}],
        }
    )
    assert roles(data) == [(S, "报销助手"), (U, "q"), (A, "a")]


def test_openai_weight_zero_is_kept_and_all_zero_refused():
    turns = [
        {"role": U, "content": "q1"},
        {"role": A, "content": "bad", "weight": 0},
        {"role": U, "content": "q2"},
        {"role": A, "content": "good", "weight": 1},
    ]
    data, _ = normalize({"messages": turns})
    assert [m.get("weight") for m in data["messages"]] == [None, 0, None, None]
    with pytest.raises(RecordError, match="every assistant turn has weight 0"):
        normalize({"messages": [turns[0], turns[1]]})
    with pytest.raises(RecordError, match=r"messages\[1\].weight: expected 0 \(context only\)"):
        normalize({"messages": [turns[0], {**turns[1], "weight": 0.5}]})


def test_multimodal_records_are_refused_and_counted(tmp_path):
    rows = [
        {
            "messages": [{"role": U, "content": "<image>这是什么?"}, {"role": A, "content": "猫"}],
            "images": ["a.jpg"],
        },
        {
            "messages": [
                {"role": U, "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": A, "content": "猫"},
            ]
        },
        {"instruction": "q", "output": "a"},
    ]
    records, report = load_records([write_jsonl(tmp_path / "m.jsonl", rows)])
    assert len(records) == 1 and report.skipped == 2
    assert "images: images, video and audio are not supported" in report.problems[0].reason
    assert "a image_url part" in report.problems[1].reason


# ---------------------------------------------------------------- more formats


@pytest.mark.parametrize(
    ("obj", "fmt", "expected"),
    [
        (
            {
                "messages": [
                    {
                        "role": U,
                        "content": [
                            {"type": "text", "value": "多"},
                            {"type": "text", "value": "段"},
                        ],
                    },
                    {"role": A, "content": "好"},
                ]
            },
            "chat",
            [(U, "多段"), (A, "好")],
        ),
        (
            {
                "conversation_id": 7,
                "category": "报销",
                "conversation": [
                    {"human": "问一", "assistant": "答一"},
                    {"human": "问二", "assistant": "答二"},
                ],
            },
            "firefly",
            [(U, "问一"), (A, "答一"), (U, "问二"), (A, "答二")],
        ),
        (
            {"query": "问", "response": "答", "history": [["前问", "前答"]]},
            "query/response",
            [(U, "前问"), (A, "前答"), (U, "问"), (A, "答")],
        ),
        ({"prompt": "问", "response": "答"}, "completion", [(U, "问"), (A, "答")]),
    ],
)
def test_common_chinese_shapes(obj, fmt, expected):
    data, found = normalize(obj)
    assert (found, roles(data)) == (fmt, expected)


def test_txt_is_domain_text_by_paragraph(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text("第一条 总则\n适用于全校。\n\n\n第二条 住宿\n每晚600元。\n", "utf-8")
    records, report = load_records([path])
    assert [r.data for r in records] == [
        {"text": "第一条 总则\n适用于全校。"},
        {"text": "第二条 住宿\n每晚600元。"},
    ]
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "5"]
    assert report.formats == {"text": 2}


def test_txt_without_blank_lines_is_a_document_per_line(tmp_path):
    # LLaMA-Factory's wiki_demo.txt: one document per line. It was one record of the whole
    # file, trained on its first max_seq_length tokens only.
    path = tmp_path / "wiki.txt"
    path.write_text("第一篇 住宿\n第二篇 伙食\n\n", "utf-8")  # a trailing blank line only
    records, _ = load_records([path])
    assert [(r.data, r.source.rsplit(":", 1)[1]) for r in records] == [
        ({"text": "第一篇 住宿"}, "1"),
        ({"text": "第二篇 伙食"}, "2"),
    ]


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (
            {"instruction": "q", "response": "a"},
            "output: missing (read as alpaca because of 'instruction', which needs instruction, "
            "optional input, output; keys: instruction, response)",
        ),
        (
            {"messages": [{"role": U, "content": [{"text": "q"}]}, {"role": A, "content": "a"}]},
            'messages[0].content[0]: expected a part {"type": "text", "text": …}',
        ),
        ({"query": "q", "answer": "a"}, "response: missing (read as query/response"),
    ],
)
def test_messages_name_the_field_and_the_format(obj, reason):
    with pytest.raises(RecordError) as err:
        normalize(obj)
    assert str(err.value).startswith(reason)
    assert "NoneType" not in str(err.value)


# ---------------------------------------------------------------- placeholders


def test_placeholders_are_counted_and_filled(tmp_path):
    rows = [
        {"instruction": "你是谁?", "output": "我是{{name}}，由{{author}}开发。"},
        {"instruction": "你叫什么?", "output": "我叫{{name}}。"},
    ]
    path = write_jsonl(tmp_path / "identity.jsonl", rows)
    _, report = load_records([path])
    assert report.placeholders == {"name": 2, "author": 1}
    assert "--fill author=… --fill name=…" in report.warnings()[0]
    records, report = load_records([path], fill={"name": "报销助手", "author": "财务处"})
    assert records[0].data["messages"][-1]["content"] == "我是报销助手，由财务处开发。"
    assert not report.placeholders and not report.warnings()


# ---------------------------------------------------------------- preference data

DPO_ROWS = [
    {
        "conversations": [{"from": "human", "value": "问一"}],
        "chosen": {"from": "gpt", "value": "好答"},
        "rejected": {"from": "gpt", "value": "坏答"},
    },
    {"instruction": "问二", "chosen": "好答二", "rejected": "坏答二"},
    {
        "prompt": [{"role": U, "content": "问三"}],
        "chosen": [{"role": A, "content": "好答三"}],
        "rejected": [{"role": A, "content": "坏答三"}],
    },
    {
        "chosen_messages": [{"role": U, "content": "问四"}, {"role": A, "content": "好答四"}],
        "rejected_messages": [],
    },
]
KTO_ROWS = [
    {"messages": [{"role": U, "content": "问"}, {"role": A, "content": "对的答案"}], "label": True},
    {
        "messages": [{"role": U, "content": "问"}, {"role": A, "content": "错的答案"}],
        "label": False,
    },
    {"prompt": "问二", "completion": "对的", "label": True},
]


def test_preference_pairs_refused_then_chosen_with_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS)
    with pytest.raises(UserError, match=r"dpo.jsonl:1: this is preference pairs \(chosen/rejected"):
        load_records([path])
    records, report = load_records([path], from_preferences=True)
    assert [roles(r.data)[-2:] for r in records] == [
        [(U, "问一"), (A, "好答")],
        [(U, "问二"), (A, "好答二")],
        [(U, "问三"), (A, "好答三")],
        [(U, "问四"), (A, "好答四")],
    ]
    assert report.preferences == {"preference pairs trained on their chosen answer": 4}
    assert "坏" not in json.dumps([r.data for r in records], ensure_ascii=False)


def test_kto_refused_then_label_true_only_with_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", KTO_ROWS)
    with pytest.raises(UserError, match="this is KTO data"):
        load_records([path])
    out = prepare([path], tmp_path / "out", valid_ratio=0, from_preferences=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text("utf-8"))
    assert report["preferences"] == {
        "KTO records trained (label true)": 2,
        "KTO records left out (label false)": 1,
    }
    assert out.counts["train"] == 2
    assert "错的答案" not in (tmp_path / "out" / "train.jsonl").read_text("utf-8")


def test_cli_refuses_preferences_in_one_line_then_fills_and_counts(tmp_path):
    from click.testing import CliRunner

    from qwen_mlx.cli import cli

    path = write_jsonl(tmp_path / "dpo.jsonl", DPO_ROWS)
    refused = CliRunner().invoke(cli, ["data", "prepare", str(path), "-o", str(tmp_path / "a")])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert [line for line in refused.output.splitlines() if line.strip()] == [
        f"Error: {path}:1: this is preference pairs (chosen/rejected, for DPO/ORPO), not "
        "supported for SFT; to train on the chosen answers only, run `qwen-mlx data prepare "
        "FILE --sft-from-preferences` and train on its output"
    ]
    out = tmp_path / "b"
    args = ["data", "prepare", str(path), "-o", str(out), "--sft-from-preferences"]
    accepted = CliRunner().invoke(cli, [*args, "--fill", "name=助手", "--valid-ratio", "0"])
    assert accepted.exit_code == 0, accepted.output
    assert "4 preference pairs trained on their chosen answer" in " ".join(accepted.output.split())
    assert len((out / "train.jsonl").read_text("utf-8").splitlines()) == 4
    bad = CliRunner().invoke(cli, [*args, "--fill", "name"])
    assert bad.exit_code == 2 and "expected NAME=VALUE" in bad.output


def test_training_names_placeholders_left_in_its_data(tmp_path, tiny_tokenizer):
    """`train` says what `data prepare` says: {{name}} left in the records is trained as is."""
    from qwen_mlx.config_file import load_config
    from qwen_mlx.run_data import build_run_data

    answer = "我是{{name}}，由{{author}}开发。"
    rows = [{"instruction": f"你是谁？{i}", "output": answer} for i in range(4)]
    train = tmp_path / "identity.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    cfg = load_config(overrides=[f"data.train_file={train}", "data.valid_ratio=0.25"])
    notes = build_run_data(cfg, tiny_tokenizer).messages
    assert any("{{name}} in 4" in n and "--fill name=…" in n for n in notes), notes
