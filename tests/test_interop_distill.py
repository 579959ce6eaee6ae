"""``data distill``'s records for LLaMA-Factory (``dataset_info.json``) and mlx-lm (``chat/``).

LLaMA-Factory loads a dataset file with Hugging Face ``datasets``' json loader and reads the
columns its entry declares from every row; that loader is run here on the files, and the
entry is read with ``data prepare``'s own LLaMA-Factory reader (its column rules). mlx-lm's
loader reads ``chat/`` itself.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from interop_helpers import mlx_lm_load
from teacher_stub import TeacherStub, default_reply, rules_file

from qwen_mlx.cli import cli
from qwen_mlx.data import load_records
from qwen_mlx.data_llamafactory import resolve

pytest.importorskip("openai")

RULES = """# 差旅费报销细则
## 第一章 住宿费
第一条 住宿费在标准内凭发票据实报销，超出部分自理。
第二条 讲师到北京出差，住宿标准为每人每晚550元；到上海出差，标准为每人每晚500元。
## 第二章 伙食补助
第三条 伙食补助按出差天数包干发放，每人每天100元。
"""
CONTEXT = "我是讲师，出差3天"
SYSTEM = "你是报销助手"


def with_context(body: dict) -> str:
    """The teacher's replies, the first question of each passage given a context."""
    text = default_reply(body)
    if "出题" in body["messages"][0]["content"]:
        questions = json.loads(text)["questions"]
        questions[0]["input"] = CONTEXT
        return json.dumps({"questions": questions}, ensure_ascii=False)
    return text


@pytest.fixture
def distilled(tmp_path, monkeypatch):
    rules = rules_file(tmp_path, monkeypatch, RULES)
    out = tmp_path / "out"
    args = ["data", "distill", str(rules), "-o", str(out), "--teacher-model", "teacher"]
    args += ["--questions-per-chunk", "2", "--chunk-tokens", "80", "--test-ratio", "0.3"]
    args += ["--paraphrases", "1", "--set", "distill.followup_ratio=1"]
    args += ["--set", f"data.system_prompt={SYSTEM}"]
    with TeacherStub() as stub:
        stub.reply = with_context
        result = CliRunner().invoke(cli, [*args, "--teacher-url", stub.url])
    assert result.exit_code == 0, result.output
    return out


def rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_dataset_info_declares_every_column_and_follow_ups_keep_their_context(distilled, tmp_path):
    datasets = pytest.importorskip("datasets")
    info = json.loads((distilled / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"distilled", "distilled_test"}
    entry = info["distilled"]
    assert entry["file_name"] == "train.jsonl" and entry["formatting"] == "alpaca"
    assert entry["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
    }
    for name, entry in info.items():
        loaded = datasets.load_dataset(
            "json",
            data_files=str(distilled / entry["file_name"]),
            split="train",
            cache_dir=str(tmp_path / "hf-cache"),
        )
        assert set(entry["columns"].values()) <= set(loaded.column_names), name

    sources, _ = resolve([distilled / "dataset_info.json"], ("distilled", "distilled_test"))
    records, report = load_records(sources, dedup=False)
    assert not report.problems
    chat = rows(distilled / "chat" / "train.jsonl") + rows(distilled / "chat" / "test.jsonl")
    assert [r.data["messages"] for r in records] == [c["messages"] for c in chat]
    follow_ups = [c["messages"] for c in chat if len(c["messages"]) == 5]
    assert follow_ups and all(m[0] == {"role": "system", "content": SYSTEM} for m in follow_ups)
    # the first turn of a follow-up keeps the context its question was asked with
    assert any(m[1]["content"].endswith(f"\n{CONTEXT}") for m in follow_ups)


def test_the_chat_copy_loads_in_mlx_lm(distilled, tiny_tokenizer):
    train, valid, test = mlx_lm_load(distilled / "chat", tiny_tokenizer, test=True)
    assert len(train) == len(rows(distilled / "train.jsonl")) > 0
    assert len(test) == len(rows(distilled / "test.jsonl")) > 0
    assert len(valid) == 0  # mlx-lm trains without validation then (it says so)
    kinds = {json.loads(line)["kind"] for line in (distilled / "chat" / "train.jsonl").open()}
    assert kinds <= {"answerable", "unanswerable"}
