"""The HTTP side of the teacher: URLs safe to show, reply size bounds, retry waits.

A teacher (or judge) is anyone's server: its reply may be far larger than what was asked
for, its URL may carry a password, and it may ask us to wait. These helpers keep each of
those bounded and out of what we write or print.
"""

from __future__ import annotations

import email.utils
import functools
import importlib
import json
import random
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# A reply's length bound, in characters, for ``max_tokens`` asked: a Qwen/GPT-style BPE
# token averages about 4 characters of English and 1–2 of Chinese, so ``max_tokens * 4``
# is already a generous "max_tokens worth of characters"; four times that again leaves
# room for any real tokenizer. Past it the server ignored max_tokens (or is hostile): such
# a reply is dropped, never recorded.
CHARS_PER_TOKEN = 4
SLACK = 4
DEFAULT_MAX_TOKENS = 4096  # the bound for a request that names no max_tokens
# The body may hold each character JSON-escaped (``\\uXXXX``: 6 bytes), plus the envelope.
JSON_BYTES_PER_CHAR = 6
ENVELOPE_BYTES = 64 * 1024
# Query parameters that carry a secret (api-key=, key=, token=, sig=, ...).
SECRET_PARAMS = ("key", "token", "secret", "password", "passwd", "sig", "auth", "credential")
MAX_RETRY_AFTER = 120.0  # seconds: the longest Retry-After honoured
BACKOFF_START, BACKOFF_MAX = 0.5, 8.0  # as the openai client: 0.5 s doubling, at most 8 s


class ReplyTooLarge(Exception):
    """The body grew past the bound for the tokens asked."""


def reply_char_limit(max_tokens: int | None) -> int:
    return (max_tokens or DEFAULT_MAX_TOKENS) * CHARS_PER_TOKEN * SLACK


def body_byte_limit(max_tokens: int | None) -> int:
    return reply_char_limit(max_tokens) * JSON_BYTES_PER_CHAR + ENVELOPE_BYTES


def public_url(url: str) -> str:
    """``url`` without a user:password and with secret-looking query values masked."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<the URL given>"  # unparseable: print none of it
    if ":" in host:
        host = f"[{host}]"
    query = [
        (k, "***" if any(s in k.lower() for s in SECRET_PARAMS) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit((parts.scheme, host + port, parts.path, urlencode(query, safe="*"), ""))


@functools.cache
def _capped_stream(base: type) -> type:
    """A body stream of the openai client's HTTP library (httpx, or httpx2 in openai 3)
    that raises once the body passes ``limit`` bytes, so the rest is never read."""

    class CappedStream(base):
        def __init__(self, inner: Any, limit: int):
            self.inner, self.limit = inner, limit

        def __iter__(self):
            seen = 0
            for chunk in self.inner:
                seen += len(chunk)
                if seen > self.limit:
                    raise ReplyTooLarge(f"more than {self.limit} bytes")
                yield chunk

        def close(self) -> None:
            self.inner.close()

    return CappedStream


def _max_tokens(request: Any) -> int | None:
    try:
        value = json.loads(request.content).get("max_tokens")
    except Exception:  # not JSON, or a streamed body: the default bound then
        return None
    return value if isinstance(value, int) and value > 0 else None


def cap_body(response: Any) -> None:
    """An httpx response hook (it runs before the body is read): bound a chat reply's body."""
    if response.request.method != "POST":
        return
    limit = body_byte_limit(_max_tokens(response.request))
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ReplyTooLarge(f"{declared} bytes announced")  # not a byte of it is read
    library = importlib.import_module(type(response).__module__.split(".")[0])
    response.stream = _capped_stream(library.SyncByteStream)(response.stream, limit)


def http_client() -> Any:
    """The openai client's own HTTP client (its defaults), reading chat replies with a cap."""
    import openai

    return openai.DefaultHttpxClient(event_hooks={"response": [cap_body]})


def retry_after(headers: Any) -> float | None:
    """The server's Retry-After (seconds or an HTTP date), when it is one we honour."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms", "")
    value = headers.get("retry-after", "")
    try:
        seconds = float(ms) / 1000 if ms else float(value)
    except ValueError:
        date = email.utils.parsedate_tz(value)
        seconds = email.utils.mktime_tz(date) - time.time() if date else -1.0
    return seconds if 0 < seconds <= MAX_RETRY_AFTER else None


def backoff(attempt: int, headers: Any = None) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): Retry-After, else backoff."""
    asked = retry_after(headers)
    if asked is not None:
        return asked
    return min(BACKOFF_START * 2 ** (attempt - 1), BACKOFF_MAX) * (1 - 0.25 * random.random())
