"""Grading an eval report's answers with `qwen-mlx review RUN`, and the grades as training data.

The report is the real `eval` of a run on the tiny model (an adapter as training leaves
one, random like a fine-tune's update: the answers are gibberish, which is what a person
grades here), with the loopback stub as the judge. A person grades in Chromium; the page
shows their accuracy beside the judge's and how often they agree; `data prepare
--from-grades` turns corrections into SFT records and preference pairs in TRL's format.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from click.testing import CliRunner
from repo_helpers import BUNDLED_TEST, REPO_ROOT
from review_helpers import doc_shot, rows, serving
from serve_helpers import http
from web_helpers import chromium, shot

from qwen_mlx.cli import cli
from qwen_mlx.data import load_records
from qwen_mlx.data_prefs import preference_kind
from qwen_mlx.errors import UserError
from qwen_mlx.review.grades import Grading

DOCS_SHOT = REPO_ROOT / "docs" / "grade-page.png"
QUESTIONS = 4
SYSTEM = "你是报销助手。"


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """A run folder with an eval report (base vs tuned, judged) of four bundled questions."""
    from lora_helpers import make_peft_adapter, make_run
    from rich.console import Console
    from teacher_stub import TeacherStub

    from qwen_mlx.eval.evaluate import evaluate
    from qwen_mlx.eval.judge import JudgeSettings

    root = tmp_path_factory.mktemp("graded")
    adapter = make_peft_adapter(tiny_model_dir, root / "a")
    run = make_run(root / "run", tiny_model_dir, adapter, f"data.system_prompt={SYSTEM}")
    lines = BUNDLED_TEST.read_text(encoding="utf-8").splitlines()[:QUESTIONS]
    test = root / "test.jsonl"
    test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with TeacherStub() as stub:
        judge = JudgeSettings(stub.url, "teacher")
        quiet = Console(quiet=True)
        evaluate(run, test, compare_base=True, backend="torch", max_tokens=16, judge=judge,
                 console=quiet)  # fmt: skip
    return run


@pytest.fixture
def run(evaluated):
    (evaluated / "eval" / "grades.jsonl").unlink(missing_ok=True)  # each test grades afresh
    return evaluated


def answers(run) -> list[dict]:
    return rows(run / "eval" / "answers.jsonl")


def block(page, question: int, label: str):
    return page.locator(".question-card").nth(question).locator(f".graded[data-label={label}]")


def grade(page, question: int, label: str, verdict: str, corrected: str | None = None) -> None:
    answer = block(page, question, label)
    if corrected is not None:
        answer.locator("textarea.corrected").fill(corrected)
    answer.locator(f"button.grade[data-grade={verdict}]").click()
    answer.locator(f"button.grade[data-grade={verdict}][aria-pressed=true]").wait_for()


def stats_row(page, label: str) -> list[str]:
    return page.locator(f"#stats-body tr[data-label={label}] td").all_inner_texts()


def test_grades_in_the_page_become_sft_records_and_pairs(run, tmp_path):
    rows_before = answers(run)
    for report in ("report.md", "report.html"):  # the report says how to grade it
        text = (run / "eval" / report).read_text(encoding="utf-8")
        assert f"qwen-mlx review {run / 'eval'}" in text
    assert all(r["tuned_judge"] in ("correct", "partly", "wrong") for r in rows_before)
    judge_wrong = [r["tuned_judge"] == "wrong" for r in rows_before[:2]]
    grading = Grading(run / "eval")
    with serving(grading) as url, chromium() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{url}/")
        page.fill("#name", "赵会计")
        page.click("#name-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert page.inner_text("#progress") == f"0 / {2 * QUESTIONS} 已评分"
        grade(page, 0, "tuned", "wrong", "正确答案一：每晚600元。")
        grade(page, 0, "base", "wrong")
        grade(page, 1, "tuned", "correct")
        # by key from the answer last graded (question 2, tuned): on, back, back to
        # question 2's base answer, which is partly right
        for key in ("j", "k", "k"):
            page.keyboard.press(key)
        block(page, 1, "base").locator("textarea.corrected").fill("正确答案二：80元。")
        block(page, 1, "base").locator("textarea.corrected").blur()
        page.keyboard.press("2")
        block(page, 1, "base").locator("button[data-grade=partly][aria-pressed=true]").wait_for()
        done = "() => document.getElementById('progress').textContent === '4 / 8 已评分'"
        page.wait_for_function(done)
        tuned = stats_row(page, "tuned")
        assert tuned[:3] == ["微调模型", "2 / 4", "50.0%"]  # one of two graded correct
        agree = sum(judge_wrong[:1]) + (rows_before[1]["tuned_judge"] == "correct")
        assert tuned[4] == f"{100 * agree / 2:.1f}%（2 个）"
        judge_correct = sum(r["tuned_judge"] == "correct" for r in rows_before)
        assert tuned[3] == f"{100 * judge_correct / QUESTIONS:.1f}%"
        shot(page, tmp_path, "graded")
        page.reload()  # the grades come back from the server; the name stays in the tab
        page.wait_for_selector("body[data-ready=true]")
        first = block(page, 0, "tuned")
        assert first.locator("button[data-grade=wrong]").get_attribute("aria-pressed") == "true"
        assert first.locator("textarea.corrected").input_value() == "正确答案一：每晚600元。"
        assert "赵会计" in first.locator(".state").inner_text()
        doc_shot(page, DOCS_SHOT)  # with QWEN_MLX_DOC_SHOTS=1: the README's picture
    grading.ledger.close()

    ledger = rows(run / "eval" / "grades.jsonl")
    assert [(e["label"], e["grade"]) for e in ledger] == [
        ("tuned", "wrong"),
        ("base", "wrong"),
        ("tuned", "correct"),
        ("base", "partly"),
    ]
    assert {e["reviewer"] for e in ledger} == {"赵会计"}
    assert answers(run) == rows_before  # the report is never changed

    out = tmp_path / "next"
    args = ["data", "prepare", "--from-grades", str(run), "-o", str(out), "--valid-ratio", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 corrected answers, 3 preference pairs" in result.output
    q1, q2 = rows_before[0]["question"], rows_before[1]["question"]
    sft = rows(out / "from_grades.jsonl")
    system = {"role": "system", "content": SYSTEM}  # the conversation the model was asked
    assert [r["messages"] for r in sft] == [
        [
            system,
            {"role": "user", "content": q1},
            {"role": "assistant", "content": "正确答案一：每晚600元。"},
        ],
        [
            system,
            {"role": "user", "content": q2},
            {"role": "assistant", "content": "正确答案二：80元。"},
        ],
    ]
    assert len(rows(out / "train.jsonl")) == 2  # and through prepare like any input
    pairs = rows(out / "pairs.jsonl")
    assert [
        (p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
        for p in pairs
    ] == [
        (q1, "正确答案一：每晚600元。", rows_before[0]["tuned"]),
        (q1, "正确答案一：每晚600元。", rows_before[0]["base"]),
        (q2, "正确答案二：80元。", rows_before[1]["base"]),
    ]
    for pair in pairs:  # TRL's conversational preference format, as data_prefs knows it
        assert pair["prompt"][0] == system
        assert set(pair) >= {"prompt", "chosen", "rejected"}
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert preference_kind(pair) == "pair"
    with pytest.raises(UserError, match="preference pairs"):
        load_records([out / "pairs.jsonl"])  # never trained as plain SFT by mistake


def test_two_people_grading_one_answer_conflict(run):
    grading = Grading(run / "eval")
    key = next(iter(grading.answers))
    with serving(grading) as url:

        def post(body):
            body = {"id": key, "base_version": 0, **body}
            return http("POST", f"{url}/api/grade", json.dumps(body).encode())

        assert (
            post({"grade": "wrong", "corrected": "甲的更正", "reviewer": "甲"}).status_code == 200
        )
        clash = post({"grade": "correct", "reviewer": "乙"})
        assert clash.status_code == 409
        assert clash.json()["current"]["corrected"] == "甲的更正"
        assert post({"grade": "best", "reviewer": "乙"}).status_code == 400
        again = post({"grade": "correct", "reviewer": "乙", "base_version": 1})
        assert again.json()["stats"][grading.answers[key]["label"]]["human"]["correct"] == 1
    grading.ledger.close()
    assert [e["reviewer"] for e in rows(run / "eval" / "grades.jsonl")] == ["甲", "乙"]


def test_from_grades_says_what_is_missing(run, tmp_path):
    runner = CliRunner()
    args = ["data", "prepare", "--from-grades", str(run), "-o", str(tmp_path / "o")]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "qwen-mlx review" in result.output  # nothing graded yet
    grading = Grading(run)  # a run folder means its eval/
    grading.grade(next(iter(grading.answers)), "wrong", None, 0, "甲")
    grading.ledger.close()
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "no corrected answer" in result.output
    result = runner.invoke(cli, ["data", "prepare", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--from-grades" in result.output
