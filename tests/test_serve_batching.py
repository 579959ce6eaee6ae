"""Continuous batching in `qwen-mlx serve`: concurrent requests decoded together get the replies
they get one by one, a client that goes leaves the batch, and --max-concurrent bounds it.

Real servers on loopback ports run the torch and MLX engines (fp32 on the CPU) of the tiny
Qwen2 and Qwen3 (thinking on) with a PEFT adapter on; the engine's decoder is wrapped to record
what the batch held at each join and step, so a test can show a request joined a running batch.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lora_helpers import make_peft_adapter
from serve_helpers import http, running
from test_batched import CONVERSATIONS

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Completion, complete_batch
from qwen_mlx.serve.api import reply_message
from qwen_mlx.serve.page import AdapterOff
from qwen_mlx.serve.server import Server

# Each request its own max_tokens: they leave the batch at different steps.
MAX_TOKENS = [24, 40, 16, 48, 32]
CASES = [("qwen2", False), ("qwen3", True)]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-batching")
    return lambda arch: make_peft_adapter(tiny_models(arch), root / arch, seed=3, b_std=0.1)


def load(backend: str, arch: str, thinking: bool, tiny_models, adapters):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    from qwen_mlx.inference import open_engine

    engine = open_engine(adapters(arch), model=tiny_models(arch), backend=backend)
    engine.thinking = thinking
    if backend == "mlx":  # the stored bf16 in float32, as the torch engine runs on a CPU
        import mlx.core as mx

        engine.model.set_dtype(mx.float32)
    return engine


class Recorded:
    """An engine whose decoders record the batch: the sequences in it when each request
    joined and at each step, and the largest it grew."""

    def __init__(self, engine):
        self.engine = engine
        self.joined_into: list[int] = []  # sequences already decoding at each join
        self.steps: list[int] = []  # sequences in the batch at each step
        self.tokens: dict[int, int] = {}  # tokens decoded per sequence
        self.left: list[int] = []  # sequences dropped before their end

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @property
    def decoder(self):
        make = self.engine.decoder
        return lambda: RecordingDecoder(make(), self)


class RecordingDecoder:
    def __init__(self, decoder, record: Recorded):
        self.decoder, self.record = decoder, record
        self.decode = decoder.decode

    def __len__(self):
        return len(self.decoder)

    def join(self, prompt_ids, settings):
        self.record.joined_into.append(len(self.decoder))
        seq = self.decoder.join(prompt_ids, settings)
        self.record.tokens[seq] = 0
        return seq

    def leave(self, seq):
        self.record.left.append(seq)
        self.decoder.leave(seq)

    def step(self):
        self.record.steps.append(len(self.decoder))
        steps = self.decoder.step()
        for step in steps:
            self.record.tokens[step.seq] += step.token is not None
        return steps


def one_by_one(engine, conversations, max_tokens) -> list[Completion]:
    replies = []
    for messages, limit in zip(conversations, max_tokens, strict=True):
        settings = GenerationSettings(max_tokens=limit, temperature=0.0)
        replies.append(complete_batch(engine, [engine.prompt_ids(messages, limit)], settings)[0])
    return replies


def post(port: int, body: dict) -> dict:
    reply = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode())
    assert reply.status_code == 200, reply.text
    return reply.json() if not body.get("stream") else streamed(reply.text)


def streamed(text: str) -> dict:
    """A streamed reply put together: content, reasoning, finish reason and usage."""
    events = [json.loads(e) for e in text.split("data: ")[1:] if e.strip() != "[DONE]"]
    message = {"role": "assistant", "content": ""}
    reason = None
    for event in events:
        for choice in event["choices"]:
            for field in ("content", "reasoning_content"):
                if choice["delta"].get(field):
                    message[field] = message.get(field, "") + choice["delta"][field]
            reason = choice["finish_reason"] or reason
    usage = events[-1]["usage"]
    return {"choices": [{"message": message, "finish_reason": reason}], "usage": usage}


def request(messages, max_tokens, stream, model=None, **fields) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **fields}
    if model:
        body["model"] = model
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def assert_same(reply: dict, expected: Completion, think_tags) -> None:
    choice = reply["choices"][0]
    assert choice["message"] == reply_message(expected.text, think_tags)
    assert choice["finish_reason"] == expected.finish_reason
    assert reply["usage"]["completion_tokens"] == expected.completion_tokens


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize(("arch", "thinking"), CASES, ids=["qwen2", "qwen3-think"])
def test_concurrent_greedy_replies_are_the_one_by_one_replies_token_for_token(
    backend, arch, thinking, tiny_models, adapters
):
    engine = load(backend, arch, thinking, tiny_models, adapters)
    expected = one_by_one(engine, CONVERSATIONS, MAX_TOKENS)
    assert len({c.text for c in expected}) == len(expected)  # not trivial answers
    lengths = [len(engine.prompt_ids(c, 48)) for c in CONVERSATIONS]
    assert max(lengths) > 3 * min(lengths)  # very different prompt lengths
    recorded = Recorded(engine)
    server = Server(recorded, max_concurrent=8)
    late = len(CONVERSATIONS) - 1  # joins once the others are decoding
    with running(server) as port, ThreadPoolExecutor(len(CONVERSATIONS) + 1) as pool:
        sampled = pool.submit(  # a sampled request in the same batch changes no greedy reply
            post, port, request(CONVERSATIONS[0], 48, True, temperature=1.0, top_p=0.9)
        )
        early = [
            pool.submit(post, port, request(c, n, stream=i % 2 == 0))
            for i, (c, n) in enumerate(zip(CONVERSATIONS[:late], MAX_TOKENS[:late], strict=True))
        ]
        wait_for(lambda: len(recorded.steps) >= 3, "the batch to decode")
        last = pool.submit(post, port, request(CONVERSATIONS[late], MAX_TOKENS[late], False))
        replies = [f.result(timeout=300) for f in [*early, last]]
        assert sampled.result(timeout=300)["usage"]["completion_tokens"] >= 1
    for reply, completion in zip(replies, expected, strict=True):
        assert_same(reply, completion, engine.family.think_tags)
    assert max(recorded.steps) > 1  # decoded together
    assert recorded.joined_into[-1] > 0  # the last request joined a running batch


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_base_and_tuned_requests_are_never_mixed_in_one_batch(backend, tiny_models, adapters):
    engine = load(backend, "qwen2", False, tiny_models, adapters)
    tuned = one_by_one(engine, CONVERSATIONS, MAX_TOKENS)
    with engine.adapter_disabled():
        base = one_by_one(engine, CONVERSATIONS, MAX_TOKENS)
    assert tuned != base  # the adapter changes the replies: a mix-up would show
    server = Server(engine, base=AdapterOff(engine, "base"), max_concurrent=8)
    asked = [
        (request(c, n, i % 2 == 1, model=model), want)
        for i, (c, n) in enumerate(zip(CONVERSATIONS, MAX_TOKENS, strict=True))
        for model, want in ((engine.model_id, tuned[i]), ("base", base[i]))
    ]
    with running(server) as port, ThreadPoolExecutor(len(asked)) as pool:
        replies = list(pool.map(lambda a: post(port, a[0]), asked, timeout=300))
    for reply, (_, want) in zip(replies, asked, strict=True):
        assert_same(reply, want, engine.family.think_tags)


def open_stream(port: int, body: dict):
    """A streamed request read up to its first text chunk; returns the open connection."""
    import socket

    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode() + raw)
    seen = b""
    while seen.count(b"data: ") < 2:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended early"
        seen += chunk
    return sock


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_client_that_goes_leaves_the_batch_and_the_others_finish(backend, tiny_models, adapters):
    engine = load(backend, "qwen2", False, tiny_models, adapters)
    long_reply = 3000  # far more steps than the test takes: a sequence left decoding shows
    expected = one_by_one(engine, CONVERSATIONS[:3], [long_reply // 10] * 3)
    recorded = Recorded(engine)
    server = Server(recorded, max_concurrent=8)
    with running(server) as port, ThreadPoolExecutor(3) as pool:
        others = [
            pool.submit(post, port, request(c, long_reply // 10, stream=i == 0))
            for i, c in enumerate(CONVERSATIONS[:3])
        ]
        wait_for(lambda: server.scheduler.decoding() == 3, "three requests decoding")
        going = open_stream(port, request(CONVERSATIONS[3], long_reply, True))
        wait_for(lambda: server.scheduler.decoding() == 4, "the fourth to join")
        gone = max(recorded.tokens)  # the last sequence to join
        going.close()
        wait_for(lambda: recorded.left == [gone], "the gone client to leave")
        assert all(not f.done() for f in others)  # it left while they went on
        replies = [f.result(timeout=300) for f in others]
    for reply, completion in zip(replies, expected, strict=True):
        assert_same(reply, completion, engine.family.think_tags)
    assert recorded.tokens[gone] < long_reply // 10  # it stopped long before the others


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_max_concurrent_bounds_the_batch_and_the_rest_wait_their_turn(
    backend, tiny_models, adapters
):
    engine = load(backend, "qwen2", False, tiny_models, adapters)
    conversations = CONVERSATIONS * 2
    limits = [32] * len(conversations)
    expected = one_by_one(engine, conversations, limits)
    recorded = Recorded(engine)
    server = Server(recorded, max_concurrent=3)
    waited = []
    with running(server) as port, ThreadPoolExecutor(len(conversations)) as pool:
        futures = [
            pool.submit(post, port, request(c, n, stream=i % 2 == 0))
            for i, (c, n) in enumerate(zip(conversations, limits, strict=True))
        ]
        while not all(f.done() for f in futures):
            waited.append(server.scheduler.waiting)
            time.sleep(0.002)
        replies = [f.result() for f in futures]
    for reply, completion in zip(replies, expected, strict=True):
        assert_same(reply, completion, engine.family.think_tags)
    assert max(recorded.steps) == 3  # full, and never more
    assert max(waited) > 0  # the rest waited in the queue
    assert len(recorded.joined_into) == len(conversations)


def test_max_concurrent_1_answers_one_at_a_time_without_a_batch(tiny_models, adapters):
    engine = load("torch", "qwen2", False, tiny_models, adapters)
    expected = one_by_one(engine, CONVERSATIONS, MAX_TOKENS)
    recorded = Recorded(engine)
    answering = []

    class OneAtATime:
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def pieces(self, prompt_ids, settings):
            answering.append(1)
            assert sum(answering) == 1, "two requests generating at once"
            with closing(self.engine.pieces(prompt_ids, settings)) as pieces:
                yield from pieces
            answering.append(-1)

    server = Server(OneAtATime(recorded), max_concurrent=1)
    with running(server) as port, ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        asked = [request(c, n, False) for c, n in zip(CONVERSATIONS, MAX_TOKENS, strict=True)]
        replies = list(pool.map(lambda body: post(port, body), asked))
    for reply, completion in zip(replies, expected, strict=True):
        assert_same(reply, completion, engine.family.think_tags)
    assert recorded.joined_into == []  # no batch: today's one-at-a-time path
    assert answering.count(1) == len(CONVERSATIONS)


def test_stopping_the_server_ends_waiting_and_decoding_requests(tiny_models, adapters):
    engine = load("torch", "qwen2", False, tiny_models, adapters)
    server = Server(engine, max_concurrent=2)
    results = []

    def ask(body):
        results.append(
            http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode())
        )

    with running(server) as port:
        body = request(CONVERSATIONS[0], 3000, False)
        threads = [threading.Thread(target=ask, args=(body,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: server.scheduler.decoding() == 2, "two decoding")
        wait_for(lambda: server.scheduler.waiting == 2, "two waiting")
        server.stop_all()
        for thread in threads:
            thread.join(timeout=10)
    assert [r.status_code for r in results] == [503] * 4
