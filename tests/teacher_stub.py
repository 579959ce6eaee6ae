"""A scripted OpenAI-compatible teacher on 127.0.0.1, for the distill and judge tests.

It speaks ``GET /v1/models`` and ``POST /v1/chat/completions`` over real HTTP, so the
official ``openai`` client is tested as users run it. Replies are deterministic functions
of the request (questions from the passage's sentences, an answer quoting the sentence
asked about, a verdict), and faults can be queued for the next requests: ``429`` (with
Retry-After), ``500``, ``slow`` (past the client's timeout), ``drop`` (connection closed),
``garbage`` (a body that is not JSON), ``not_json`` (a completion whose text is not the
JSON asked for), ``huge`` (a body that never ends: 20 MB, then held) and ``huge_declared``
(a Content-Length of 20 MB, a little of it sent, then held). ``reply`` may return any JSON
value as the ``content`` (a number, object, list or None). Every request body is kept,
with the time it arrived. Below the server: helpers to run ``data distill`` as its own
process (so it can be sent Ctrl-C or killed) against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HUGE_BYTES = 20_000_000

UNSUPPORTED_MARK = "火星"  # an answer containing this is one the passage does not support
# What the stub's "unanswerable" questions ask about: none is in the tests' rules, so each is
# kept unless a document given alongside mentions it (the check then says "answered").
OPEN_TOPICS = ("出国签证费", "学术会议注册费", "实验动物饲养费", "外籍专家的医疗保险费")
# How the stub rewords a question (the first N, for --paraphrases N).
REWORDINGS = ("请问，{q}", "我是新来的老师，想问一下：{q}", "麻烦问下，{q}", "烦请告知：{q}")


def _passage(text: str) -> str:
    for marker in ("材料：\n", "Passage:\n"):
        if marker in text:
            return text.split(marker, 1)[1].split("\n\n问题", 1)[0]
    for marker in ("：\n",):  # the answer prompt: 材料（…）：\n
        if marker in text:
            return text.split(marker, 1)[1].split("\n\n问题", 1)[0]
    return text


def sentences(passage: str) -> list[str]:
    parts = re.split(r"(?<=[。；])|\n", passage)
    return [p.strip() for p in parts if len(p.strip()) >= 8 and not p.startswith("#")]


def default_reply(body: dict) -> str:
    """The stub's answer to one chat request, from its messages alone."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if "出题" in system:
        n = int(re.search(r"提出 (\d+) 个", user).group(1))
        questions = [
            {"question": f"“{s[:24]}”这一条具体是怎么规定的？", "input": ""}
            for s in sentences(_passage(user))[:n]
        ]
        return json.dumps({"questions": questions}, ensure_ascii=False)
    if "追问" in system:  # distinct per request, so follow-ups never look alike
        tag = hashlib.sha256(user.encode()).hexdigest()[:8]
        return json.dumps({"question": f"追问{tag}：那换一种情形会怎样？"}, ensure_ascii=False)
    if "阅卷" in system:
        return json.dumps(_grade(user), ensure_ascii=False)
    if "改写" in system:
        n = int(re.search(r"改写成 (\d+) 种", user).group(1))
        question = user.split("原问题：", 1)[1].split("\n\n", 1)[0]
        texts = [form.format(q=question) for form in REWORDINGS[:n]]
        return json.dumps({"paraphrases": texts}, ensure_ascii=False)
    if "没有覆盖" in system:
        return json.dumps({"questions": open_questions(user)}, ensure_ascii=False)
    if "查证员" in system:
        passages, question = user.rsplit("\n\n问题：", 1)
        topics = [t for t in OPEN_TOPICS if t in question]
        answered = any(t in passages for t in topics)
        return json.dumps({"answered": answered, "passage": 0, "reason": "对照材料"})
    if "审核员" in system:
        answer = user.split("回答：", 1)[1]
        return json.dumps({"supported": UNSUPPORTED_MARK not in answer, "reason": "对照材料"})
    asked = re.search(r"“(.+?)”这一条", user)
    matches = [s for s in sentences(_passage(user)) if asked and s.startswith(asked.group(1))]
    return (matches[0] if matches else "材料没有规定。") + "（依据本细则相应条款）"


def open_questions(user: str) -> list[dict]:
    """``n`` questions on topics the rules leave open, starting at a topic picked by the
    passage (so chunks differ, and a rerun asks the same)."""
    n = int(re.search(r"请提出 (\d+) 个", user).group(1))
    start = int(hashlib.sha256(_passage(user).encode()).hexdigest(), 16)
    topics = [OPEN_TOPICS[(start + i) % len(OPEN_TOPICS)] for i in range(n)]
    return [{"question": f"{t}可以报销吗？", "topic": t} for t in topics]


def _grade(user: str) -> dict:
    """correct when the answer is (a part of) the reference, partly when it shares half its
    characters, else wrong."""
    reference = user.split("参考答案：", 1)[1].split("\n", 1)[0].strip()
    answer = user.split("待评回答：", 1)[1].split("\n\n", 1)[0].strip()
    if answer and (answer in reference or reference in answer):
        return {"grade": "correct", "reason": "与参考答案一致"}
    shared = len(set(answer) & set(reference)) / max(len(set(reference)), 1)
    return {"grade": "partly" if shared > 0.5 else "wrong", "reason": f"重合 {shared:.0%}"}


class _Handler(BaseHTTPRequestHandler):
    stub: TeacherStub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, payload: object, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.stub.key is None or self.headers.get("Authorization") == f"Bearer {self.stub.key}":
            return True
        self._send(401, {"error": {"message": "invalid api key", "type": "auth"}})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, {"error": {"message": "not found"}})
            return
        models = [
            {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in self.stub.models
        ]
        self._send(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fault = self.stub.arrived(body)
        if not self._authorised():
            return
        served = {body.get("model"), f"{body.get('model')}:latest"} & set(self.stub.models)
        if self.path != "/v1/chat/completions" or not served:  # as ollama: "m" is "m:latest"
            self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
            return
        if fault and self._fault(fault):
            return
        self.stub.hold_if_asked()
        content = self.stub.reply(body)
        self.stub.answered_one(body)
        self._send(200, _completion(body, content))

    def _fault(self, fault: str) -> bool:
        """Act out one fault; True when no normal reply should follow."""
        if fault == "429":
            self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
        elif fault == "500":
            self._send(500, {"error": {"message": "boom"}})
        elif fault == "garbage":
            self._send(200, b"<html>oops")
        elif fault == "drop":
            self.close_connection = True
            self.connection.close()
        elif fault == "slow":
            time.sleep(self.stub.slow_seconds)
            return False
        elif fault in ("huge", "huge_declared"):
            self._huge(declared=fault == "huge_declared")
        return fault != "not_json" or self._not_json()

    def _huge(self, declared: bool) -> None:
        """A completion whose content goes on for 20 MB, then the connection is held:
        only a client that stops reading early answers before the stub is released."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if declared:
            self.send_header("Content-Length", str(HUGE_BYTES))
        self.end_headers()
        head = b'{"id":"x","object":"chat.completion","created":0,"model":"teacher",'
        self.wfile.write(head + b'"choices":[{"index":0,"message":{"role":"assistant","content":"')
        chunk = b"x" * 65536
        for _ in range(HUGE_BYTES // len(chunk) if not declared else 4):
            self.wfile.write(chunk)
            self.stub.huge_sent += len(chunk)
        self.stub.release.wait()
        self.close_connection = True

    def _not_json(self) -> bool:
        self._send(200, _completion({"model": "x", "messages": []}, "好的，下面是问题：一、二、三"))
        return True


def _completion(body: dict, content: object) -> dict:
    prompt = sum(len(m.get("content", "")) for m in body["messages"])
    size = len(content) if isinstance(content, str) else len(json.dumps(content))
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": size,
            "total_tokens": prompt + size,
        },
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a held or dropped request ends its handler by raising: nothing to report


class TeacherStub:
    """The server; ``with TeacherStub() as stub: stub.url``."""

    def __init__(self, models=("teacher",), key: str | None = None, latency: float = 0.0):
        self.models, self.key, self.latency = list(models), key, latency
        self.reply: Callable[[dict], str] = default_reply
        self.faults: list[str] = []
        self.slow_seconds = 1.5
        self.requests: list[tuple[float, dict]] = []
        self.answered: list[dict] = []
        self.hold_after: int | None = None  # answer this many, then hold every request
        self.huge_sent = 0  # bytes of a ``huge`` body written before the client left
        self.release = threading.Event()
        self._granted = 0
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"stub": self})
        self.server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def arrived(self, body: dict) -> str | None:
        with self._lock:
            self.requests.append((time.monotonic(), body))
            return self.faults.pop(0) if self.faults else None

    def hold_if_asked(self) -> None:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:  # check and count in one step, so exactly hold_after get through
            hold = self.hold_after is not None and self._granted >= self.hold_after
            self._granted += not hold
        if hold:
            self.release.wait()
            raise ConnectionAbortedError  # never answer a held request

    def answered_one(self, body: dict) -> None:
        with self._lock:
            self.answered.append(body)

    def repeats(self, since: int = 0) -> int:
        """How many answered requests (from index ``since``) had been answered before."""
        seen = Counter(json.dumps(b["messages"], sort_keys=True) for b in self.answered[since:])
        return sum(n - 1 for n in seen.values())

    def __enter__(self) -> TeacherStub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def held(stub: TeacherStub) -> int:
    """How many requests the stub holds unanswered right now (with ``hold_after`` set)."""
    return len(stub.requests) - len(stub.answered)


def distill_command(doc: Path, out: Path, url: str, *extra: str) -> list[str]:
    """``data distill`` as its own process: small chunks, three questions, no follow-ups,
    paraphrases or unanswerable questions (tests/test_distill*.py ask for those)."""
    settings = ["--teacher-model", "teacher", "--questions-per-chunk", "3", "--chunk-tokens"]
    settings += ["80", "--set", "distill.followup_ratio=0", "--paraphrases", "0"]
    settings += ["--unanswerable-ratio", "0"]
    cli = [sys.executable, "-m", "qwen_mlx", "data", "distill", str(doc), "-o", str(out)]
    return [*cli, "--teacher-url", url, *settings, *extra]


def process_env() -> dict[str, str]:
    """The environment a subprocess of the tests runs qwen_mlx from this checkout in."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("OPENAI_API_KEY", None)
    return env


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def ledger_lines(out: Path, name: str = "ledger.jsonl") -> list[dict]:
    """The complete lines of a ledger, parsed."""
    path = out / name
    if not path.is_file():
        return []
    data = path.read_bytes()
    return [json.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]


# A short set of rules in the bundled documents' style: what the distill tests distill.
RULES = """# 差旅费报销细则
## 第一章 总则
第一条 为规范学校差旅费管理，根据国家有关规定，制定本细则。
第二条 本细则适用于学校全体教职工因公出差。出差人员应当先审批后出差。
## 第二章 住宿费
第三条 住宿费在标准内凭发票据实报销，超出部分自理。
第四条 讲师到北京出差，住宿标准为每人每晚550元；到上海出差，标准为每人每晚500元。
（一）会议主办方统一安排住宿的，不再报销住宿费；
（二）与亲友同住的，不得报销住宿费。
## 第三章 伙食补助
第五条 伙食补助按出差天数包干发放，每人每天100元。到西藏、青海、新疆出差，每人每天120元。
第六条 参加会议期间由主办方提供全天用餐的，不发放伙食补助。
"""


def rules_file(tmp_path: Path, monkeypatch, text: str) -> Path:
    """``text`` as ``rules.md`` in ``tmp_path``, which becomes the working folder (no
    ./config.yaml of the repo's) with no OPENAI_API_KEY set: what the distill tests run in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "rules.md"
    path.write_text(text, encoding="utf-8")
    return path


def ctrl_c_while_the_judge_hangs(args: list[str]) -> tuple[int, float, str]:
    """``python -m qwen_mlx ARGS`` judged by a stub that gives one verdict and then hangs on
    every request; one Ctrl-C once the next request waits. Returns the exit code, the seconds
    from Ctrl-C to exit, and the output."""
    import signal
    import subprocess

    with TeacherStub() as stub:
        stub.hold_after = 1
        cmd = [sys.executable, "-m", "qwen_mlx", *args]
        cmd += ["--judge-url", stub.url, "--judge-model", "teacher"]
        proc = subprocess.Popen(
            cmd, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert wait_for(lambda: len(stub.requests) > len(stub.answered) == 1, 120)
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
        return proc.returncode, time.monotonic() - start, output
