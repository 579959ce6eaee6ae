"""A real `qwen-mlx serve` server on a free loopback port, in a thread, and raw HTTP calls to
it (shared by the serve tests; a helper module, not a test module)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app_server, **options):
    """Serve ``app_server`` (a ``qwen_mlx.serve.server.Server``); yields the port. ``options``: for
    ``make_server`` (``header_timeout``)."""
    from qwen_mlx.serve.server import make_server

    port = free_port()
    uv = make_server(app_server, "127.0.0.1", port, log_level="error", **options)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


class Response:
    def __init__(self, status: int, body: bytes, headers=None):
        self.status_code, self.text = status, body.decode("utf-8", "replace")
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def json(self):
        return json.loads(self.text)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    timeout: float = 60,
    headers: dict | None = None,
) -> Response:
    """A raw HTTP request (stdlib), for what the openai client would refuse to send."""
    headers = {"content-type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(reply.status, reply.read(), dict(reply.headers))
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read(), dict(err.headers))
