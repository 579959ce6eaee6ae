"""The data review page of `qwen-mlx review`, in a real headless Chromium on a loopback server.

The data is made by the real `data distill` (against the loopback teacher stub). A person
reviews it by keyboard; an edit survives a reload; a rejected record leaves the reviewed
set; two people editing one record see each other's edit and choose; a cluster edit is
offered to the paraphrases; data text stays text. Screenshots go under each test's tmp dir
(and, with QWEN_MLX_DOC_SHOTS=1, the first test's to docs/review-page.png for the README).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from repo_helpers import REPO_ROOT
from review_helpers import distilled, doc_shot, rows, serving
from web_helpers import chromium, http, shot

from qwen_mlx.review.reviewed import Review

KEY = "sk-review-789"
DOCS_SHOT = REPO_ROOT / "docs" / "review-page.png"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml of the repo's
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return distilled(tmp_path)


def open_review(browser, url: str, name: str | None = "王会计", key: str | None = None):
    """The review page, past the key and name forms, ready."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{url}/")
    if key is not None:
        page.fill("#key", key)
        page.click("#key-form button")
    if name is not None:
        page.fill("#name", name)
        page.click("#name-form button")
    page.wait_for_selector("body[data-ready=true]")
    return page


def progress(page) -> str:
    return page.inner_text("#progress")


def press_and_wait(page, key: str, reviewed: int, total: int) -> None:
    page.keyboard.press(key)
    page.wait_for_function(
        "want => document.getElementById('progress').textContent === want",
        arg=f"{reviewed} / {total} 已审核",
    )


def wait_reviewed(page, reviewed: int) -> None:
    """Until the page shows ``reviewed`` records decided."""
    script = "n => document.getElementById('progress').textContent.startsWith(n + ' /')"
    page.wait_for_function(script, arg=reviewed)


def current_question(page) -> str:
    return page.inner_text("#show-question")


def test_review_20_records_by_keyboard_edit_reload_and_reject(browser, data, tmp_path):
    originals = {name: (data / name).read_bytes() for name in ("train.jsonl", "test.jsonl")}
    review = Review(data)
    total = len(review.items)
    assert total >= 20
    with serving(review, api_key=KEY) as url:
        assert http(f"{url}/api/records")[0] == 401  # the data needs the key
        page = open_review(browser, url, key=KEY)
        assert progress(page) == f"0 / {total} 已审核"
        shot(page, tmp_path, "start")
        rejected = current_question(page)
        press_and_wait(page, "r", 1, total)  # the first record: rejected
        page.keyboard.press("j")
        page.keyboard.press("k")  # back and forth: the second record again
        edited_question = current_question(page)
        page.keyboard.press("e")
        page.fill("#edit-answer", "住宿费凭发票在标准内据实报销。（已核对第三条）")
        page.keyboard.press("Control+Enter")
        wait_reviewed(page, 2)
        if page.locator("#cluster").is_visible():
            page.click("#cluster-skip")  # not here: the cluster test applies one
        page.keyboard.press("j")
        for reviewed in range(3, 21):  # 18 more accepted, one key each
            press_and_wait(page, "a", reviewed, total)
        assert progress(page) == f"20 / {total} 已审核"
        shot(page, tmp_path, "twenty-reviewed")

        page.reload()  # the name is remembered in the tab; the decisions come from the server
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#name-form").is_hidden()
        assert progress(page) == f"20 / {total} 已审核"
        page.select_option("#filter-status", "edited")
        assert page.locator("#list li:not([hidden])").count() == 1
        assert current_question(page) == edited_question
        assert page.inner_text("#show-answer") == "住宿费凭发票在标准内据实报销。（已核对第三条）"
        assert page.inner_text("#state-line").startswith("已修改（王会计")
        page.select_option("#filter-status", "")
        page.fill("#search", "住宿")
        assert 0 < page.locator("#list li:not([hidden])").count() < total
        page.fill("#search", "")
        heading = review.data.items[-1].source["heading"]
        page.select_option("#filter-heading", heading)
        under = [i for i in review.data.items if i.source["heading"] == heading]
        assert page.locator("#list li:not([hidden])").count() == len(under) < total
        page.select_option("#filter-heading", "")
        page.select_option("#filter-category", "paraphrase")
        assert "改写问法" in page.inner_text("#meta")
        assert page.inner_text("#passage")  # the source passage beside it
        page.select_option("#filter-category", "")
        page.click("#drops summary")
        assert "duplicate" in page.inner_text("#drops-body")
        shot(page, tmp_path, "after-reload")
        doc_shot(page, DOCS_SHOT)  # with QWEN_MLX_DOC_SHOTS=1: the README's picture

    for name, content in originals.items():  # the data files are never changed
        assert (data / name).read_bytes() == content
    train = rows(data / "reviewed" / "train.jsonl")
    test = rows(data / "reviewed" / "test.jsonl")
    questions = [r["instruction"] for r in train + test]
    assert rejected not in questions
    assert len(train) + len(test) == total - 1
    [edited] = [r for r in train + test if r["instruction"] == edited_question]
    assert edited["output"] == "住宿费凭发票在标准内据实报销。（已核对第三条）"
    assert edited["kind"] and edited["source"]["chunk"]  # the rest of the record as it was
    summary = json.loads((data / "reviewed" / "review.json").read_text(encoding="utf-8"))
    assert summary["reviewed"] == 20 and summary["by_reviewer"] == {"王会计": 20}
    ledger = rows(data / "review-ledger.jsonl")
    assert len(ledger) == 20 and {e["reviewer"] for e in ledger} == {"王会计"}


def test_a_rejected_test_record_never_reaches_train(browser, data):
    review = Review(data)
    with serving(review, reviewer="李老师") as url:
        page = open_review(browser, url, name=None)  # --reviewer: the page does not ask
        assert page.inner_text("#reviewer") == "审核人：李老师"
        page.select_option("#filter-file", "test.jsonl")
        question = current_question(page)
        page.keyboard.press("r")
        wait_reviewed(page, 1)
    train = rows(data / "reviewed" / "train.jsonl")
    test = rows(data / "reviewed" / "test.jsonl")
    assert question not in [r["instruction"] for r in train + test]
    assert len(test) == len(rows(data / "test.jsonl")) - 1
    assert len(train) == len(rows(data / "train.jsonl"))


def test_two_pages_editing_one_record_see_the_conflict_and_lose_nothing(browser, data, tmp_path):
    review = Review(data)
    with serving(review) as url:
        first = open_review(browser, url, name="甲")
        second = open_review(browser, url, name="乙")  # its own tab: asked for its own name
        for page in (first, second):
            page.keyboard.press("e")
        first.fill("#edit-answer", "甲的答案")
        second.fill("#edit-answer", "乙的答案")
        first.keyboard.press("Control+Enter")
        wait_reviewed(first, 1)
        second.keyboard.press("Control+Enter")
        second.locator("#conflict").wait_for()
        assert "甲" in second.inner_text("#conflict-text")
        question = second.inner_text("#show-question")
        assert second.inner_text("#conflict-theirs") == f"问题：{question}\n答案：甲的答案"
        assert second.inner_text("#conflict-mine") == f"问题：{question}\n答案：乙的答案"
        assert second.input_value("#edit-answer") == "乙的答案"  # still in the editor
        shot(second, tmp_path, "conflict")
        second.click("#conflict-mine-wins")
        second.locator("#conflict").wait_for(state="hidden")
        assert second.inner_text("#show-answer") == "乙的答案"
        # the first page hears of it at its next poll
        first.wait_for_function(
            "() => document.getElementById('show-answer').textContent === '乙的答案'",
            timeout=15_000,
        )
    ledger = rows(data / "review-ledger.jsonl")
    assert [(e["reviewer"], e["fields"]["answer"]) for e in ledger] == [
        ("甲", "甲的答案"),
        ("乙", "乙的答案"),
    ]
    assert [e["version"] for e in ledger] == [1, 2]


def test_a_cluster_edit_is_offered_to_its_paraphrases(browser, data):
    review = Review(data)
    with serving(review) as url:
        page = open_review(browser, url)
        # the first record: a question whose paraphrases follow it, in its cluster
        cluster = page.inner_text("#meta").split("簇 ")[1].split(" ")[0]
        page.keyboard.press("e")
        page.fill("#edit-answer", "按第一条执行。")
        page.keyboard.press("Control+Enter")
        page.locator("#cluster").wait_for()
        siblings = page.locator("#cluster-list input").count()
        assert siblings >= 2
        page.click("#cluster-apply")
        page.locator("#cluster").wait_for(state="hidden")
        assert progress(page).startswith(f"{siblings + 1} /")
    members = [r for r in rows(data / "reviewed" / "train.jsonl")
               if r["source"]["cluster"] == int(cluster)]  # fmt: skip
    assert len(members) == siblings + 1
    assert {r["output"] for r in members} == {"按第一条执行。"}


def test_data_text_is_shown_as_text_never_as_markup(browser, tmp_path):
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    data = tmp_path / "qa.jsonl"
    records = [
        {"instruction": f"问题{hostile}", "input": "", "output": f"答案{hostile}"},
        {
            "messages": [
                {"role": "user", "content": "普通问题"},
                {"role": "assistant", "content": "好"},
            ]
        },
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), "utf-8")
    review = Review(data)
    with serving(review) as url:
        requested: list[str] = []
        page = browser.new_context().new_page()
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{url}/")
        page.fill("#name", "王会计")
        page.click("#name-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert all(u.startswith(url) or u.startswith("data:") for u in requested), requested
        assert page.inner_text("#show-answer") == f"答案{hostile}"
        assert page.locator("#detail img, #list img").count() == 0
        page.keyboard.press("j")
        page.keyboard.press("e")  # a chat record: question and answer, no input field
        assert page.locator("#edit-input").is_hidden()
        page.fill("#edit-answer", f"改{hostile}")
        page.keyboard.press("Control+Enter")
        wait_reviewed(page, 1)
        assert page.evaluate("() => window.pwned") is None
    [_, chat] = rows(tmp_path / "reviewed" / "qa.jsonl")
    assert chat["messages"][-1]["content"] == f"改{hostile}"
