"""What ``qwen-mlx serve`` refuses before it does any work for a request.

* The ``Host`` header (DNS rebinding): a web page on ``attacker.example`` whose name the attacker
  re-points at 127.0.0.1 reaches a loopback server with the browser's blessing, but its requests
  still say ``Host: attacker.example``. So only loopback names, the bound address, names given
  with ``--allowed-host``, and IP addresses are answered; others get a 403. An IP address is
  safe: a page whose origin is an IP address can only make the browser connect to that address.
* The API key, then the body size (by Content-Length, then by counting what arrives).
* A prompt that cannot fit in the context, judged by counting (messages, characters) before the
  conversation is rendered and tokenized, so a hostile request costs milliseconds.
* A client that opens a connection and never finishes its request headers (slowloris): the
  connection is closed :data:`HEADER_TIMEOUT_S` after it opened or after its last reply; a
  body that has not all arrived :data:`BODY_TIMEOUT_S` after the headers gets a 408.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.responses import Response

from qwen_mlx.serve.api import ErrorResponse

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
HEADER_TIMEOUT_S = 10.0  # a browser or client sends its headers at once; only a stall is slower
BODY_TIMEOUT_S = 60.0  # the largest body allowed, at 1 Mbit/s, with room to spare
# Every message costs at least its opening and closing control tokens in a ChatML template.
MIN_TOKENS_PER_MESSAGE = 2
# No tokenizer of ours averages more characters per token (the body limit assumes the same).
MAX_CHARS_PER_TOKEN = 64


# ---------------------------------------------------------------- Host names


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The host names a server bound to ``bound`` answers to; None: any (``'*'`` in extra)."""
    names = {_bare(name) for name in extra}
    if "*" in names:
        return None
    if _bare(bound) not in WILDCARD_ADDRESSES:
        names.add(_bare(bound))
    return frozenset(LOOPBACK_NAMES | names)


def _bare(name: str) -> str:
    """A host name as compared: lower case, no brackets, no trailing dot."""
    return name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` → ``::1``."""
    header = header.strip()
    if header.startswith("["):
        return _bare(header.partition("]")[0] + "]")
    if header.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        header = header.partition(":")[0]
    return _bare(header)


def host_allowed(headers: Headers, allowed: frozenset[str] | None) -> str | None:
    """None if the request's Host is allowed, else the name it gave."""
    header = headers.get("host")
    if allowed is None or header is None:  # no Host: HTTP/1.0, never a browser
        return None
    name = host_name(header)
    if name in allowed or _is_ip(name):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_refused(name: str) -> Response:
    shown = name[:100]
    message = (
        f"this server does not answer to the host name `{shown}` (a guard against DNS "
        f"rebinding); start it with --allowed-host {shown} to allow it"
    )
    return ErrorResponse(403, message, kind="permission_error", code="host_not_allowed")


# ---------------------------------------------------------------- the middleware


class Guard:
    """ASGI middleware run before the app parses anything: the Host header, the API key
    (every path but the public ones, which the page loads before it asks for the key) and
    the body size."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body: int,
        hosts: frozenset[str] | None = None,
        public: frozenset[str] = frozenset(),
        body_timeout: float = BODY_TIMEOUT_S,
    ):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.hosts, self.public, self.body_timeout = hosts, public, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(Headers(scope=scope), scope["path"])
        body = None
        if refusal is None:
            body, refusal = await self._read(receive)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _refusal(self, headers: Headers, path: str) -> Response | None:
        stranger = host_allowed(headers, self.hosts)
        if stranger is not None:
            return _host_refused(stranger)
        if self.api_key and path not in self.public and not _authorized(headers, self.api_key):
            return ErrorResponse(
                401,
                "invalid or missing API key (Authorization: Bearer KEY)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large()
        return None

    def _too_large(self) -> Response:
        limit = f"{self.max_body / (1 << 20):.0f} MiB"
        message = f"the request body is larger than this server's {limit} limit"
        # Close the connection: the rest of the body would otherwise be read as a request.
        return ErrorResponse(413, message, headers={"Connection": "close"})

    async def _read(self, receive) -> tuple[bytes | None, Response | None]:
        try:
            with anyio.fail_after(self.body_timeout):
                return await self._read_all(receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_timeout:g} s"
            return None, ErrorResponse(408, message, headers={"Connection": "close"})

    async def _read_all(self, receive) -> tuple[bytes | None, Response | None]:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return None, self._too_large()
            if not message.get("more_body"):
                return bytes(body), None


def _authorized(headers: Headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    given = token.strip().encode("latin-1")  # header bytes, as the client sent them
    return scheme.lower() == "bearer" and secrets.compare_digest(given, api_key.encode())


def _replay(body: bytes, receive):
    """A receive channel that hands the app the body already read, then the real channel
    (which reports the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


# ---------------------------------------------------------------- the prompt, by counting


def cannot_fit(messages: list[dict], context_length: int, max_tokens: int) -> str | None:
    """Why ``messages`` cannot fit in the context beside ``max_tokens``, judged without
    rendering or tokenizing them; None when they might (the tokenizer then decides)."""
    room = context_length - max_tokens
    if room <= 0:
        return None  # the engine's own message says max_tokens does not fit
    least = MIN_TOKENS_PER_MESSAGE * len(messages)
    chars = sum(len(m["content"]) for m in messages)
    if least <= room and chars <= MAX_CHARS_PER_TOKEN * room:
        return None
    why = f"{len(messages)} messages" if least > room else f"{chars} characters"
    return (
        f"the prompt ({why}) cannot fit in the {room} tokens the model's context of "
        f"{context_length} leaves beside max_tokens: shorten the conversation or lower max_tokens"
    )


# ---------------------------------------------------------------- slow headers


class HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol: a connection whose next request line and headers
    have not all arrived :attr:`header_timeout` seconds after it opened, or after its last
    reply, is closed. uvicorn's keep-alive timer stops at the first byte of a request, so
    without this a client sending a header a byte at a time holds its connection forever."""

    header_timeout = HEADER_TIMEOUT_S
    _deadline: Any = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        # Still the same cycle, and it is not answering a request: the next one never came.
        idle = cycle is None or cycle.response_complete
        if self.cycle is cycle and idle and not self.transport.is_closing():
            self.transport.close()


def http_protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's HTTP protocol class (httptools where installed, as uvicorn picks it) with
    :class:`HeaderDeadline`."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    attrs = {"header_timeout": header_timeout}
    return type(f"Deadline{base.__name__}", (HeaderDeadline, base), attrs)


def allow_origins(app: Any, origins: Iterable[str]) -> None:
    """Let web pages from ``origins`` call ``app`` (``--cors-origin``). Added last, so it is
    the outermost layer: preflights and error replies carry the CORS headers too."""
    from fastapi.middleware.cors import CORSMiddleware

    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
