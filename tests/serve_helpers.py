"""A real `qwen-mlx serve` server on a free loopback port, in a thread (shared by the tests)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app_server, **options):
    """Serve ``app_server`` (a ``qwen_mlx.serve.Server``); yields the port. ``options``: for
    ``make_server`` (``header_timeout``)."""
    from qwen_mlx.serve import make_server

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
