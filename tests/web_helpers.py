"""For the chat page tests: Debian's Chromium driven by Playwright, a scripted engine, and
plain HTTP calls to the API the page uses.

The browser is the OS package's (``apt-get install chromium``; ``.ci/run`` installs it), never
one Playwright downloads. Tests skip, saying why, where Playwright or Chromium is missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qwen_mlx.families import QWEN3

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and nothing that would reach beyond loopback (updates, sync, QUIC probes).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium():
    """A headless Chromium (Playwright's Browser), with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class ScriptedEngine:
    """An engine that answers every conversation with ``reply``, a few characters at a time
    and slowly enough to watch it stream; it keeps the conversations it was asked."""

    context_length = 4096
    family = QWEN3  # a reply's think block is reasoning
    thinking, tokenizer, has_adapter = None, None, False

    def __init__(self, reply: str, model_id: str = "scripted", delay: float = 0.0):
        self.reply, self.delay = reply, delay
        self.name(model_id)
        self.asked: list[list[dict]] = []
        self.produced = 0  # pieces generated, over all requests

    def name(self, model_id: str) -> None:
        self.model_id, self.description = model_id, f"{model_id} (scripted)"

    def adapter_disabled(self):
        return contextlib.nullcontext()

    def prompt_ids(self, messages: list[dict], max_tokens: int) -> list[int]:
        self.asked.append(messages)
        return [1, 2, 3]

    def pieces(self, prompt_ids: list[int], settings) -> Iterator[str]:
        for start in range(0, len(self.reply), 3):
            time.sleep(self.delay)
            self.produced += 1
            yield self.reply[start : start + 3]

    def score(self, samples: list) -> tuple[float, int]:
        raise NotImplementedError


def open_chat(browser, url: str, key: str | None = None):
    """The page at ``url``, past the key form when ``key`` is given, ready to ask."""
    page = browser.new_page()
    page.goto(f"{url}/")
    if key is not None:
        page.fill("#key", key)
        page.click("#key-form button")
    page.wait_for_selector("body[data-ready=true]")
    return page


def settings(page, temperature: str = "0", max_tokens: str = "24", system: str = "") -> None:
    page.click("#settings summary")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#system", system)


def ask(page, question: str) -> None:
    """Type ``question`` as a person would and press Enter."""
    page.locator("#question").press_sequentially(question)
    page.press("#question", "Enter")


def answers(page, turn: int = -1, timeout: float = 60_000) -> dict[str, str]:
    """The finished answers of a turn, by model, as the page shows them."""
    section = page.locator("section.turn").nth(turn)
    section.locator(".answer").first.wait_for()
    page.wait_for_function(
        "el => [...el.querySelectorAll('.answer')].every(a => a.dataset.state === 'done')",
        arg=section.element_handle(),
        timeout=timeout,
    )
    found = section.locator(".answer")
    return {
        found.nth(i).get_attribute("data-model"): found.nth(i).locator(".body").inner_text()
        for i in range(found.count())
    }


def shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000  # an image of the page, not an empty file
    return path


def http(url: str, headers: dict | None = None, body: dict | None = None):
    """(status, bytes) of a GET, or of a POST when ``body`` is given."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def api_answer(url: str, model: str, question: str, max_tokens: int) -> str:
    """The server's greedy answer through the API, as the page asks for it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stop": ["<|im_end|>"],
    }
    status, reply = http(f"{url}/v1/chat/completions", body=body)
    assert status == 200, reply
    return json.loads(reply)["choices"][0]["message"]["content"]
