"""The chat page of `qwen-mlx serve`, in a real headless Chromium on a loopback server.

Scripted engines show streaming, Markdown and that model output stays text; the tiny model
answers through the page as through the API; a trained tiny run compares base and tuned
answers side by side. Each test leaves screenshots of its states under its tmp dir.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import running
from web_helpers import (
    ScriptedEngine,
    answers,
    api_answer,
    ask,
    chromium,
    http,
    open_chat,
    settings,
    shot,
)

from qwen_mlx.serve.server import Server

KEY = "sk-page-456"
QUESTION = "差旅费怎么报销？"
MARKDOWN_REPLY = (
    "差旅费按**实际发生**报销：\n\n"
    "| 项目 | 标准 |\n|---|---|\n| 住宿 | 每晚500元 |\n| 伙食 | 每天100元 |\n\n"
    "- 先填报销单\n- 再附发票\n"
)
HOSTILE_REPLY = (
    "看这里<script>window.pwned = 1</script>和"
    '<img src=x onerror="window.pwned = 2">，**<img src=y onerror="window.pwned = 3">**\n\n'
    '| a | b |\n|---|---|\n| <script>window.pwned = 4</script> | `<img src=z onerror="x">` |'
)


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def serve(engine, **page):
    return running(Server(engine, **page))


def test_the_page_loads_fast_offline_and_asks_for_the_key(browser, tmp_path):
    engine = ScriptedEngine("好的。")
    with serve(engine, api_key=KEY) as port:
        url = f"http://127.0.0.1:{port}"
        for path in ("/", "/ui/app.js", "/ui/style.css"):  # the page loads without the key
            assert http(url + path)[0] == 200, path
        for path in ("/ui/info", "/v1/models", "/run/loss.png"):  # everything else needs it
            assert http(url + path)[0] == 401, path
        refused = http(
            f"{url}/v1/chat/completions", body={"messages": [{"role": "user", "content": "x"}]}
        )
        assert refused[0] == 401

        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{url}/")
        # The browser's own clock: from the request to the end of the load event.
        timing = "() => performance.getEntriesByType('navigation')[0].loadEventEnd / 1000"
        loaded = page.evaluate(timing)
        assert 0 < loaded < 1.0, f"the page took {loaded:.2f} s on loopback"
        assert requested, "the page asked for nothing"
        assert all(u.startswith(url) or u.startswith("data:") for u in requested), requested
        page.locator("#key").wait_for()
        shot(page, tmp_path, "asks-for-key")

        page.fill("#key", "wrong")
        page.click("#key-form button")
        page.wait_for_function("() => document.getElementById('key-error').textContent !== ''")
        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert page.inner_text("#model-name") == "scripted"
        ask(page, QUESTION)
        assert answers(page) == {"scripted": "好的。"}  # the page's calls carry the key
        page.reload()  # asked once: the key is kept for the session
        page.wait_for_selector("body[data-ready=true]")
        shot(page, tmp_path, "key-accepted")


def test_a_chinese_question_streams_and_renders_markdown(browser, tmp_path):
    engine = ScriptedEngine(MARKDOWN_REPLY, delay=0.08)
    with serve(engine) as port:
        page = open_chat(browser, f"http://127.0.0.1:{port}")
        settings(page, temperature="0.7", max_tokens="512", system="你是报销助手。")
        ask(page, QUESTION)
        streaming = page.locator(".answer[data-state=streaming] .body")
        streaming.wait_for()
        page.wait_for_function(
            "() => document.querySelector('.answer .body').textContent.length > 0"
        )
        partial = page.locator(".answer .body").inner_text()
        assert page.locator(".answer").get_attribute("data-state") == "streaming"
        shot(page, tmp_path, "streaming")
        final = answers(page)["scripted"]
        assert len(partial) < len(final)
        body = page.locator(".answer .body")
        assert body.locator("strong").inner_text() == "实际发生"
        assert body.locator("th").all_inner_texts() == ["项目", "标准"]
        assert body.locator("td").all_inner_texts() == ["住宿", "每晚500元", "伙食", "每天100元"]
        assert body.locator("li").all_inner_texts() == ["先填报销单", "再附发票"]
        shot(page, tmp_path, "rendered")

        ask(page, "住宿呢？")  # the second turn carries the first, after the system prompt
        answers(page)
        assert engine.asked[-1] == [
            {"role": "system", "content": "你是报销助手。"},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": MARKDOWN_REPLY},
            {"role": "user", "content": "住宿呢？"},
        ]
        page.click("#new-chat")
        assert page.locator("section.turn").count() == 0


def test_stop_ends_the_reply_and_frees_the_model(browser, tmp_path):
    engine = ScriptedEngine("很长的回答。" * 100, delay=0.05)
    with serve(engine) as port:
        page = open_chat(browser, f"http://127.0.0.1:{port}")
        ask(page, QUESTION)
        page.locator(".answer[data-state=streaming]").wait_for()
        assert page.inner_text("#send") == "停止"
        page.click("#send")
        page.locator(".answer[data-state=stopped]").wait_for()
        assert page.inner_text(".answer .error") == "（已停止）"
        assert page.inner_text("#send") == "发送"
        time.sleep(0.5)
        stopped_at = engine.produced
        time.sleep(0.5)
        assert engine.produced == stopped_at < 200  # the server stopped generating too
        shot(page, tmp_path, "stopped")


def test_model_output_is_shown_as_text_never_run(browser, tmp_path):
    with serve(ScriptedEngine(HOSTILE_REPLY)) as port:
        page = open_chat(browser, f"http://127.0.0.1:{port}")
        ask(page, "你好")
        shown = answers(page)["scripted"]
        log = page.locator("#log")
        assert "<script>window.pwned = 1</script>" in shown
        assert '<img src=x onerror="window.pwned = 2">' in shown
        assert log.locator("script, img").count() == 0
        assert page.evaluate("window.pwned") is None
        assert log.locator("td").first.inner_text() == "<script>window.pwned = 4</script>"
        shot(page, tmp_path, "hostile-reply-as-text")


def test_enter_while_an_ime_composes_does_not_send(browser, tmp_path):
    engine = ScriptedEngine("好的。")
    with serve(engine) as port:
        page = open_chat(browser, f"http://127.0.0.1:{port}")
        ime = page.context.new_cdp_session(page)
        page.focus("#question")
        # Typing pinyin: the IME shows "chai" and Enter would pick a candidate.
        ime.send(
            "Input.imeSetComposition", {"text": "chai", "selectionStart": 4, "selectionEnd": 4}
        )
        page.keyboard.press("Enter")
        shot(page, tmp_path, "composing")
        assert page.locator("section.turn").count() == 0 and engine.asked == []
        ime.send("Input.insertText", {"text": "差旅"})  # the candidate is committed
        page.keyboard.press("Enter")
        assert answers(page) == {"scripted": "好的。"}
        assert engine.asked[0][-1]["content"].startswith("差旅")
        shot(page, tmp_path, "sent-after-composing")


def test_the_report_and_loss_curve_open_from_the_page(browser, tmp_path):
    from qwen_mlx.monitor import plot_loss

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.html").write_text(
        "<h1>评估报告</h1><script>parent.document.title = 'owned'</script>", encoding="utf-8"
    )
    (run / "config.yaml").write_text("secret: not served\n", encoding="utf-8")
    plot_loss([{"type": "train", "step": s, "loss": 3 / s} for s in range(1, 9)], run / "loss.png")
    with serve(ScriptedEngine("好"), api_key=KEY, run_dir=run) as port:
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert http(f"{url}/run/loss.png", auth) == (200, (run / "loss.png").read_bytes())
        for path in ("/run/config.yaml", "/run/eval/../config.yaml", "/run/%2e%2e/config.yaml"):
            status, body = http(url + path, auth)
            assert status == 404 and b"not served" not in body, path
        page = open_chat(browser, url, key=KEY)
        page.click("#show-report")
        report = page.frame_locator("#report-frame")
        assert report.locator("h1").inner_text() == "评估报告"
        assert page.title() == "qwen-mlx"  # the report's script did not run
        shot(page, tmp_path, "report")
        page.click("#panel-close")
        page.click("#show-loss")
        page.wait_for_function("() => document.getElementById('loss-image').naturalWidth > 100")
        shot(page, tmp_path, "loss-curve")
    (run / "loss.png").unlink()
    with serve(ScriptedEngine("好"), run_dir=run) as port:
        page = open_chat(browser, f"http://127.0.0.1:{port}")
        assert page.locator("#show-loss").is_hidden() and page.locator("#show-report").is_visible()
        assert http(f"http://127.0.0.1:{port}/run/loss.png")[0] == 404


# ---------------------------------------------------------------- the tiny model, trained


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, small_data, tmp_path_factory):
    """A tiny torch run trained for a few steps at a high learning rate."""
    pytest.importorskip("torch")
    from train_helpers import QUIET, run_config

    from qwen_mlx.config_file import save_config
    from qwen_mlx.training_run import train

    run = tmp_path_factory.mktemp("web") / "run"
    run.mkdir()
    cfg = run_config(tiny_model_dir, small_data, run, "training.backend=torch")
    save_config(cfg, run / "config.yaml")
    train(cfg, run, False, QUIET)
    return run


def squash(text: str) -> str:
    """Text without the whitespace and Markdown marks that rendering changes."""
    return "".join(c for c in text if not c.isspace() and c not in "*|#`-")


def test_compare_shows_the_base_and_the_tuned_answer(browser, trained_run, tmp_path):
    from qwen_mlx.inference import open_engine
    from qwen_mlx.serve.page import open_base

    tuned = open_engine(trained_run, backend="torch")
    base = open_base(tuned, trained_run, None, None)
    with serve(tuned, base=base, run_dir=trained_run) as port:
        url = f"http://127.0.0.1:{port}"
        page = open_chat(browser, url)
        settings(page, max_tokens="24")
        ask(page, QUESTION)
        alone = answers(page)
        assert list(alone) == ["run"]
        shot(page, tmp_path, "tuned-alone")

        page.check("#compare")
        ask(page, QUESTION)
        shown = answers(page)
        assert list(shown) == ["tiny-qwen2", "run"]  # the base model's folder, the run's
        assert squash(shown["tiny-qwen2"]) != squash(shown["run"])
        assert shown["run"] == alone["run"]  # the adapter is back on for the tuned answer
        for model, text in shown.items():
            assert squash(text) == squash(api_answer(url, model, QUESTION, 24)), model
        shot(page, tmp_path, "compare")
