"""What ``data prepare`` and ``data distill`` write loads in mlx-lm's own loader.

``mlx_lm.lora --data DIR`` reads DIR/train.jsonl, valid.jsonl and test.jsonl through
``mlx_lm.tuner.datasets.load_dataset``: it takes each file's format from its first record and
fails on an empty file. These tests call that loader itself, then have every record tokenized
by it (``process``), as its training loop does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from interop_helpers import mlx_lm_load

from qwen_mlx.dataprep import prepare

pytest.importorskip("mlx_lm.tuner.datasets")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def qa(n: int) -> list[dict]:
    return [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(n)]


def test_prepare_without_a_test_split_loads_in_mlx_lm(tmp_path, tiny_tokenizer):
    # The default --test-ratio 0 once left an empty test.jsonl: mlx-lm's IndexError.
    src = write_jsonl(tmp_path / "qa.jsonl", qa(20))
    prepare([src], tmp_path / "out", valid_ratio=0.1)
    train, valid, test = mlx_lm_load(tmp_path / "out", tiny_tokenizer)
    assert (len(train), len(valid), len(test)) == (18, 2, 0)
    assert not (tmp_path / "out" / "test.jsonl").exists()


def test_text_and_chat_records_go_to_separate_files(tmp_path, tiny_tokenizer):
    # Mixed in one file, mlx-lm took the format of the first record and failed on the others
    # (KeyError 'messages' or 'text').
    docs = tmp_path / "rules.txt"
    docs.write_text("".join(f"第{i}条\n住宿费每晚不超过{i}00元。\n\n" for i in range(10)), "utf-8")
    src = write_jsonl(tmp_path / "qa.jsonl", qa(30))
    result = prepare([src, docs], tmp_path / "out", valid_ratio=0.1, test_ratio=0.1, seed=3)
    out = tmp_path / "out"
    chat = mlx_lm_load(out, tiny_tokenizer, test=True)
    assert sum(result.counts.values()) == 40
    text = mlx_lm_load(out / "text", tiny_tokenizer, test="test.jsonl" in result.files)
    assert all(type(s).__name__ == "ChatDataset" for s in chat)
    assert sum(map(len, chat)) == 30 and sum(map(len, text)) == 10
    assert {type(s).__name__ for s in text if len(s)} == {"TextDataset"}
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert report["files"] == result.files


def test_a_rerun_without_a_test_split_removes_its_old_test_file(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "qa.jsonl", qa(20))
    prepare([src], tmp_path / "out", valid_ratio=0.1, test_ratio=0.2)
    assert (tmp_path / "out" / "test.jsonl").exists()
    prepare([src], tmp_path / "out", valid_ratio=0.1)  # the old test split would be stale
    assert not (tmp_path / "out" / "test.jsonl").exists()
    assert len(mlx_lm_load(tmp_path / "out", tiny_tokenizer)[0]) == 18
    # and the folder's record forgot it: a third run writes it again without complaint
    prepare([src], tmp_path / "out", valid_ratio=0.1, test_ratio=0.2)
    assert len(mlx_lm_load(tmp_path / "out", tiny_tokenizer, test=True)[2]) == 4


def test_only_text_takes_the_split_files(tmp_path, tiny_tokenizer):
    docs = tmp_path / "wiki.txt"
    docs.write_text("".join(f"document {i}\n" for i in range(20)), "utf-8")
    result = prepare([docs], tmp_path / "out", valid_ratio=0.1)
    assert result.files == {"train.jsonl": 18, "valid.jsonl": 2}
    train, _, _ = mlx_lm_load(tmp_path / "out", tiny_tokenizer)
    assert type(train).__name__ == "TextDataset"
