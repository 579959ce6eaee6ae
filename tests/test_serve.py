"""`qwen-mlx serve` against the official openai client, on 127.0.0.1, with the tiny model."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from qwen_mlx.inference import open_engine  # noqa: E402
from qwen_mlx.serve import Server, create_app  # noqa: E402

KEY = "sk-test-123"


class Response:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: bytes | None = None, timeout: float = 60) -> Response:
    """A raw HTTP request (stdlib), for what the openai client would refuse to send."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(reply.status, reply.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return open_engine(None, model=tiny_model_dir, backend="torch")


def start(engine, api_key=None):
    port = free_port()
    config = uvicorn.Config(create_app(Server(engine, api_key)), host="127.0.0.1", port=port,
                            log_level="error")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(engine):
    server, thread, url = start(engine)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", timeout=120, max_retries=0)


ASK = [{"role": "user", "content": "差旅费怎么报销？"}]
LONG = "".join(chr(0x4E00 + i % 3000) for i in range(40000))  # > the 32,768-token context


def test_plain_completion(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8,
                                           temperature=0)  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content  # a random model still says something
    if choice.finish_reason == "length":
        assert engine.count_tokens(choice.message.content) >= 8 - 1


def test_streamed_completion_matches_plain(client):
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10,
                                           temperature=0)  # fmt: skip
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10,
                                            temperature=0, stream=True)  # fmt: skip
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: same text
    assert reasons[-1] in ("stop", "length") and len(pieces) > 2


def test_stop_strings_cut_the_answer(client):
    full = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12,
                                          temperature=0).choices[0].message.content  # fmt: skip
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12,
                                         temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_all_answered(client):
    def ask(i):
        messages = [{"role": "user", "content": f"第{i}个问题：发票丢了怎么办？"}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                              temperature=0).choices[0].message.content  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert len(answers) == 16 and all(answers)
    # One at a time on the model: a request answers like it does alone (no interleaving).
    assert answers[3] == ask(3)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": ""}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user"}]},
        {"messages": "hello"},
        {"messages": ASK, "max_tokens": 0},
        {"messages": ASK, "max_tokens": 10**6},
        {"messages": ASK, "temperature": "hot"},
        {"messages": ASK, "stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "system", "content": "only a system turn"}]},
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 16},
    ],
)
def test_bad_bodies_get_400_with_a_message(live, body):
    response = http("POST", f"{live}/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_malformed_json_is_a_4xx(live):
    response = http("POST", f"{live}/v1/chat/completions", b"{not json")
    assert 400 <= response.status_code < 500


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list()] == ["tiny-qwen2"]
    assert http("GET", f"{live}/health").json()["status"] == "ok"


def test_api_key_is_enforced(engine):
    server, thread, url = start(engine, api_key=KEY)
    try:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
        assert http("GET", f"{url}/v1/models").status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert right.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices
        assert http("GET", f"{url}/health").status_code == 200  # health stays open for probes
    finally:
        server.should_exit = True
        thread.join(timeout=10)
