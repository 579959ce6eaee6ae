"""What `qwen-mlx serve` refuses before any work: Host names (DNS rebinding), clients that never
finish their headers, framing of the page, and the API key from the environment.

A scripted engine on a real loopback server: these are about the HTTP layer, not the model.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from click.testing import CliRunner
from serve_helpers import running
from web_helpers import ScriptedEngine

from qwen_mlx.serve.guard import HEADER_TIMEOUT_S, allowed_hosts, host_name
from qwen_mlx.serve.server import Server

KEY = "sk-guard-789"
JSON = "application/json"


def get(port: int, path: str = "/health", host: str | None = None, headers=None):
    """GET with a raw Host header; (status, headers, JSON or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        given = {**({"Host": host} if host is not None else {}), **(headers or {})}
        connection.request("GET", path, headers=given)
        reply = connection.getresponse()
        body = reply.read()
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = body.decode("utf-8", "replace")
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, decoded
    finally:
        connection.close()


# ---------------------------------------------------------------- Host names

ANSWERED = [
    "localhost",
    "LOCALHOST",
    "localhost.",
    "127.0.0.1",
    "[::1]",
    "192.168.1.5",
    "[fe80::1]",
]
REFUSED = ["attacker.example", "localhost.attacker.example", "127.0.0.1.nip.io", "qwen.lan.evil"]


def test_only_loopback_addresses_and_allowed_names_are_answered():
    with running(Server(ScriptedEngine("好"), allowed_hosts=("qwen.lan",))) as port:
        for name in [*ANSWERED, "qwen.lan", "QWEN.LAN"]:
            for host in (name, f"{name}:{port}"):
                assert get(port, host=host)[0] == 200, host
        for name in REFUSED:
            for path in ("/health", "/", "/v1/models"):
                status, _, reply = get(port, path, host=f"{name}:{port}")
                assert status == 403, (name, path)
                message = reply["error"]["message"]
                assert "\n" not in message and f"--allowed-host {name}" in message


def test_the_host_is_checked_before_the_key():
    with running(Server(ScriptedEngine("好"), api_key=KEY)) as port:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert get(port, "/v1/models", host="attacker.example", headers=auth)[0] == 403
        assert get(port, "/v1/models", host="localhost", headers=auth)[0] == 200


def test_a_star_allows_every_host_name():
    with running(Server(ScriptedEngine("好"), allowed_hosts=("*",))) as port:
        assert get(port, host="attacker.example")[0] == 200


def test_the_bound_name_is_allowed_but_not_a_wildcard_address():
    assert "qwen.internal" in allowed_hosts("qwen.internal")
    assert allowed_hosts("0.0.0.0") == allowed_hosts("127.0.0.1") == allowed_hosts("::")
    assert allowed_hosts("0.0.0.0", ["*"]) is None
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.:80") == "example.com"


# ---------------------------------------------------------------- slow headers


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closed ``sock``, sending ``trickle`` a byte at a time."""
    start = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - start < seconds:
        if sent < len(trickle):
            sock.sendall(trickle[sent : sent + 1])
            sent += 1
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    pytest.fail(f"the connection was still open after {seconds} s")


def test_a_client_that_never_finishes_its_headers_is_cut_off():
    assert 1 <= HEADER_TIMEOUT_S <= 30  # the default: patient with people, not with stalls
    with running(Server(ScriptedEngine("好")), header_timeout=1) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no end
            assert closed_within(sock, 4) >= 0.9
        with socket.create_connection(("127.0.0.1", port)) as sock:
            slow = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
            closed_within(sock, 4, trickle=slow)  # a byte every 0.2 s does not keep it open
        with socket.create_connection(("127.0.0.1", port)) as sock:  # after a first reply
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            assert b"200 OK" in sock.recv(65536)
            closed_within(sock, 4, trickle=b"GET /health HTTP/1.1\r\nHost: 1")


def test_a_body_that_stops_arriving_gets_a_408():
    server = Server(ScriptedEngine("好"))
    server.body_timeout = 1
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with running(server) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + b'{"messages": ')  # and the rest never comes
        sock.settimeout(5)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 408 and reply.getheader("connection") == "close"
        assert "did not arrive" in json.loads(reply.read())["error"]["message"]


def test_a_slow_answer_is_not_cut_off_by_the_header_timeout():
    engine = ScriptedEngine("一二三四五六七八九十" * 3, delay=0.2)  # 10 pieces: 2 s
    with running(Server(engine), header_timeout=0.5) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": JSON})
        reply = json.loads(connection.getresponse().read())
        assert reply["choices"][0]["message"]["content"] == engine.reply, reply
        connection.close()


# ---------------------------------------------------------------- framing


def test_the_page_may_not_be_framed():
    with running(Server(ScriptedEngine("好"))) as port:
        for path in ("/", "/docs"):
            status, headers, _ = get(port, path)
            assert status == 200
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert headers["x-frame-options"] == "DENY", path


# ---------------------------------------------------------------- the key from the environment


def serve_cli(monkeypatch, tmp_path, *args: str, env: dict | None = None):
    """`qwen-mlx serve` with the model loading and the server stubbed; (result, run's key)."""
    from qwen_mlx.cli import cli

    seen = {}
    monkeypatch.setattr("qwen_mlx.cli_models._engine", lambda *a: ScriptedEngine("好"))
    monkeypatch.setattr(
        "qwen_mlx.serve.server.run", lambda e, h, p, key, *a, **k: seen.update(key=key)
    )
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), *args], env=env)
    return result, seen.get("key")


def test_the_api_key_can_come_from_an_environment_variable(monkeypatch, tmp_path):
    result, key = serve_cli(monkeypatch, tmp_path, "--api-key-env", "QM_KEY", env={"QM_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert key == KEY


@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_missing_or_empty_key_variable_is_one_error_line(monkeypatch, tmp_path, value):
    monkeypatch.delenv("QM_KEY", raising=False)
    env = {} if value is None else {"QM_KEY": value}
    result, key = serve_cli(monkeypatch, tmp_path, "--api-key-env", "QM_KEY", env=env)
    assert result.exit_code == 1 and key is None
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "QM_KEY" in lines[0]


def test_a_key_and_a_key_variable_together_are_refused(monkeypatch, tmp_path):
    env = {"QM_KEY": KEY}
    result, _ = serve_cli(
        monkeypatch, tmp_path, "--api-key", "x", "--api-key-env", "QM_KEY", env=env
    )
    assert result.exit_code == 1 and "not both" in result.output
