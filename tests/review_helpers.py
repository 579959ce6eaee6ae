"""For the review tests: a data set made by the real `data distill` against the loopback
teacher stub, a review server on a free port (in a thread, or as its own process to kill),
and plain HTTP calls to it (a helper module, not a test module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner
from serve_helpers import free_port
from teacher_stub import REPO_ROOT, RULES, TeacherStub, default_reply

# Three chunks, three questions each, their paraphrases, an unanswerable question and a
# follow-up: a little over 20 records in train and test.
DISTILL = [
    "--teacher-model",
    "teacher",
    "--questions-per-chunk",
    "3",
    "--chunk-tokens",
    "80",
    "--test-ratio",
    "0.3",
    "--set",
    "distill.followup_ratio=0.2",
]


def distilled(folder: Path) -> Path:
    """``data distill`` of :data:`RULES` into ``folder / "distilled"`` (train, test, chunks,
    report); the working folder must hold no config.yaml (the tests chdir to tmp)."""
    from qwen_mlx.cli import cli

    rules = folder / "rules.md"
    rules.write_text(RULES, encoding="utf-8")
    out = folder / "distilled"
    with TeacherStub() as stub:
        stub.reply = _one_repeat
        args = ["data", "distill", str(rules), "-o", str(out), "--teacher-url", stub.url]
        result = CliRunner().invoke(cli, [*args, *DISTILL], env={"OPENAI_API_KEY": ""})
    assert result.exit_code == 0, result.output
    return out


def _one_repeat(body: dict) -> str:
    """The stub's replies, but the questions of the third chunk repeat their first one word
    for word: curation drops it (``duplicate``), so the report has a drop to show."""
    text = default_reply(body)
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if "出题" in system and "第五条" in user:
        questions = json.loads(text)["questions"]
        questions[1:1] = [questions[0]]
        return json.dumps({"questions": questions}, ensure_ascii=False)
    return text


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@contextmanager
def serving(work, **options):
    """A review server for ``work`` (a Review or Grading) in a thread; yields its URL."""
    from qwen_mlx.review.server import ReviewServer, make_server

    port = free_port()
    uv = make_server(ReviewServer(work, **options), "127.0.0.1", port, log_level="error")
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        work.ledger.close()


@contextmanager
def review_process(target: Path, *options: str):
    """``qwen-mlx review TARGET`` as its own process (to be killed); yields (process, URL)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "qwen_mlx", "review", str(target), "--port", str(port)]
    process = subprocess.Popen(
        [*command, *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _wait_until_up(url: str, process) -> None:
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode())
        try:
            with urllib.request.urlopen(f"{url}/api/info", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the review server did not start")


def doc_shot(page, path: Path) -> None:
    """With QWEN_MLX_DOC_SHOTS=1: ``page`` as the README's picture at ``path``, a small PNG
    (a 64-colour palette: text and flat colours lose nothing visible)."""
    if not os.environ.get("QWEN_MLX_DOC_SHOTS"):
        return
    import io

    from PIL import Image

    page.set_viewport_size({"width": 1280, "height": 760})
    image = Image.open(io.BytesIO(page.screenshot()))
    image.convert("RGB").quantize(colors=64).save(path, optimize=True)
