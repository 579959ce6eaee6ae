"""`qwen-mlx serve` against the official openai client, on 127.0.0.1, with the tiny model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from serve_helpers import http, running  # noqa: E402

from qwen_mlx.inference import open_engine  # noqa: E402
from qwen_mlx.serve.server import Server  # noqa: E402

KEY = "sk-test-123"
MODEL = "tiny-qwen2"  # the model folder's name, which the server answers to


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return open_engine(None, model=tiny_model_dir, backend="torch")


@contextmanager
def start(engine, api_key=None, cors=()):
    """A server of ``engine``; yields its base URL."""
    with running(Server(engine, api_key, cors_origins=cors)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(engine):
    with start(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", timeout=120, max_retries=0)


ASK = [{"role": "user", "content": "差旅费怎么报销？"}]
LONG = "".join(chr(0x4E00 + i % 3000) for i in range(40000))  # > the 32,768-token context


def test_plain_completion(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content  # a random model still says something
    assert reply.usage.completion_tokens <= 8
    assert (choice.finish_reason == "length") == (reply.usage.completion_tokens == 8)


def test_streamed_completion_matches_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=10, temperature=0, stream=True
    )
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: same text
    assert reasons[-1] in ("stop", "length") and len(pieces) > 2


def test_stop_strings_cut_the_answer(client):
    full = (
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
        .choices[0]
        .message.content
    )
    stop = full[3:5]
    cut = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_all_answered(client):
    def ask(i):
        messages = [{"role": "user", "content": f"第{i}个问题：发票丢了怎么办？"}]
        return (
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=6, temperature=0
            )
            .choices[0]
            .message.content
        )

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


def test_a_model_is_fetched_by_its_id_and_says_when_it_was_created(client, live):
    listed = client.models.list().data[0]
    fetched = client.models.retrieve(MODEL)
    assert fetched.id == MODEL and fetched.created == listed.created
    assert abs(fetched.created - time.time()) < 24 * 3600  # a Unix time, in seconds
    missing = http("GET", f"{live}/v1/models/gpt-4o")
    assert missing.status_code == 404 and "tiny-qwen2" in missing.json()["error"]["message"]


def test_max_tokens_is_bounded_by_the_context_not_a_fixed_limit(client, engine):
    # Qwen3's cards ask for up to 32768; the tiny model's context is 32768 tokens.
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16384, temperature=0, stream=True
    )
    with stream:
        assert next(iter(stream))  # accepted: the reply has begun
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=engine.context_length, temperature=0
        )
    error = refused.value.body
    assert error["param"] == "max_tokens" and str(engine.context_length) in error["message"]


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "text only",
        ),
        ({"role": "assistant", "content": None}, "null"),
    ],
    ids=["image part", "assistant content null"],
)
def test_what_the_model_cannot_read_is_refused_with_a_clear_message(live, message, said):
    body = {"messages": [{"role": "user", "content": "你好"}, message, *ASK]}
    reply = http("POST", f"{live}/v1/chat/completions", json.dumps(body).encode())
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "messages[1].content" and said in error["message"]


def test_api_key_is_enforced(engine):
    with start(engine, api_key=KEY) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        assert http("GET", f"{url}/v1/models").status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert right.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices
        assert http("GET", f"{url}/health").status_code == 200  # health stays open for probes


def test_the_key_guards_everything_but_health(engine):
    with start(engine, api_key=KEY) as url:
        for path in ("/v1/models", "/docs", "/openapi.json", "/nope"):
            refused = http("GET", url + path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["error"]["type"] == "authentication_error"
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive
            given = {"Authorization": f"{scheme} {KEY}"}
            assert http("GET", f"{url}/v1/models", headers=given).status_code == 200
        assert http("GET", f"{url}/v1/models", headers={"Authorization": KEY}).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        docs = http("GET", f"{url}/docs", headers=auth)
        assert docs.status_code == 200 and "/v1/chat/completions" in docs.text
        assert "<script" not in docs.text and "https://" not in docs.text  # nothing from a CDN
        schema = http("GET", f"{url}/openapi.json", headers=auth).json()
        assert "/v1/chat/completions" in schema["paths"]


def test_cors_only_for_the_origins_given(engine, live):
    origin = "http://localhost:3000"
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with start(engine, api_key=KEY, cors=(origin,)) as url:
        answer = http("OPTIONS", f"{url}/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200  # before the key check: browsers send no key here
        assert answer.headers["access-control-allow-origin"] == origin
        refused = http("GET", f"{url}/v1/models", headers={"Origin": origin})
        assert refused.status_code == 401  # with the header, so the page can read why
        assert refused.headers["access-control-allow-origin"] == origin
        other = http("GET", f"{url}/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    plain = http("GET", f"{live}/v1/models", headers={"Origin": origin})
    assert "access-control-allow-origin" not in plain.headers  # off unless asked for
