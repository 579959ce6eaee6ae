"""The bundled example data (data/报销细则_*.jsonl, described in data/README.md): it loads
cleanly, its "questions the rules do not answer" (``kind: unanswerable``, issue 22 §2) are
refusals that name no amount, its answerable records are not, and no held-out question
nearly repeats a training one. Fast: json, the data loader and the refusal patterns only.
"""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
from repo_helpers import BUNDLED_TEST, BUNDLED_TRAIN

from qwen_mlx.data import load_records
from qwen_mlx.eval.refusals import is_refusal

UNANSWERABLE = "unanswerable"
# The counts data/README.md states: (answerable, unanswerable) per file.
COUNTS = {BUNDLED_TRAIN: (283, 28), BUNDLED_TEST: (40, 8)}
NEAR_DUPLICATE = 0.6  # character 5-gram Jaccard (the highest today: 0.17, unanswerable 0.03)
# An amount of money, or any figure at all: a refusal must not invent one.
AMOUNT = re.compile(r"\d|[元块¥￥]|万元")
# Answerable records whose correct answers the plain refusal patterns flag anyway ("没有规定的，
# …", "请确认…"): a known limit of qwen_mlx.eval.refusals, kept visible here rather than hidden.
FLAGGED_ANSWERS = {
    "项目结题后剩余的经费怎么处理？",
    "资助方的经费规定和学校细则不一样，听谁的？",
    "报销时系统里找不到我的公务卡消费记录，怎么回事？",
    "报销单据的投递柜在哪里？",
}


def normal(text: str) -> str:
    """NFKC, lower case, letters and digits only: what counts as the same question."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def grams(text: str, n: int = 5) -> frozenset[str]:
    text = normal(text)
    return frozenset(text[i : i + n] for i in range(max(1, len(text) - n + 1)))


def raw_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=[BUNDLED_TRAIN, BUNDLED_TEST], ids=["train", "test"])
def bundled(request):
    path = request.param
    records, report = load_records([path])
    return path, raw_rows(path), records, report


def test_utf8_without_bom_one_object_per_line(bundled):
    path, rows, _, _ = bundled
    data = path.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf") and b"\r" not in data
    assert data.endswith(b"\n")
    lines = data.decode("utf-8").splitlines()
    assert len(lines) == len(rows) and all(isinstance(json.loads(x), dict) for x in lines)


def test_loads_with_no_bad_record_and_keeps_kind(bundled):
    path, rows, records, report = bundled
    assert report.problems == [] and report.duplicates == 0
    assert len(records) == len(rows) and dict(report.formats) == {"alpaca": len(rows)}
    assert [r.data.get("kind") for r in records] == [row.get("kind") for row in rows]
    assert {row.get("kind") for row in rows} == {None, UNANSWERABLE}
    answerable = sum(row.get("kind") != UNANSWERABLE for row in rows)
    assert (answerable, len(rows) - answerable) == COUNTS[path]


def test_unanswerable_records_are_refusals_naming_no_amount(bundled):
    _, rows, records, _ = bundled
    refusals = [r for r in records if r.data.get("kind") == UNANSWERABLE]
    assert refusals
    for record in refusals:
        answer = record.data["messages"][-1]["content"]
        assert is_refusal(answer), record.source
        assert not AMOUNT.search(answer), record.source
        assert "示例大学报销细则" in answer, record.source  # names the rules it refers to
    for row in rows:
        if row.get("kind") == UNANSWERABLE:
            assert set(row) == {"instruction", "input", "output", "kind"}


def test_no_answerable_answer_reads_as_a_refusal(bundled):
    _, rows, _, _ = bundled
    flagged = {
        row["instruction"]
        for row in rows
        if row.get("kind") != UNANSWERABLE and is_refusal(row["output"])
    }
    assert flagged <= FLAGGED_ANSWERS


def test_no_test_question_repeats_a_training_question():
    train = [row["instruction"] for row in raw_rows(BUNDLED_TRAIN)]
    test = raw_rows(BUNDLED_TEST)
    assert any(row.get("kind") == UNANSWERABLE for row in test)
    assert not {normal(row["instruction"]) for row in test} & {normal(q) for q in train}
    train_grams = [grams(q) for q in train]
    for row in test:  # the unanswerable ones and the others alike
        mine = grams(row["instruction"])
        closest = max(len(mine & other) / len(mine | other) for other in train_grams)
        assert closest < NEAR_DUPLICATE, row["instruction"]
