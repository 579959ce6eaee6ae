"""The teacher: any OpenAI-compatible chat endpoint, asked through the ledger.

The official ``openai`` client sends each HTTP attempt; the retries are ours, so that each
attempt counts against ``--max-requests`` and Ctrl-C cuts a retry wait short: 429 (its
Retry-After honoured up to two minutes), 408/409/5xx, timeouts and dropped connections,
with exponential backoff, ``RETRIES`` times. A reply is checked before it is recorded: a
body that is not a chat completion, or whose ``content`` is not text, is asked again once
and then dropped as ``bad_reply``; one far longer than the tokens asked for is dropped as
``oversized`` (:mod:`qwen_mlx.distill.transport`). A request that fails is counted and
comes back as ``(None, reason)`` (its item is dropped, and asked again on a rerun); a
rejected key or an unknown model stops the run. :meth:`Teacher.probe` checks URL, key and
model before any chunk work.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qwen_mlx.distill import transport
from qwen_mlx.distill.ledger import Ledger, request_key
from qwen_mlx.errors import UserError

RETRIES = 5
RETRY_STATUS = {408, 409, 429}  # and every 5xx
LOCAL_KEY = "no-key"  # what a key-less local server (ollama, qwen-mlx serve) is sent
# The options that name a teacher's URL, model and key, for the messages that name them.
FLAGS = {
    "teacher": {"url": "--teacher-url", "model": "--teacher-model", "key": "--api-key-env"},
    "judge": {"url": "--judge-url", "model": "--judge-model", "key": "--judge-key-env"},
}


class Stopped(UserError):
    """Ctrl-C: the replies that landed in time are kept; the message says to run it again."""

    exit_code = 130  # as a shell reports SIGINT
    made = False  # one was raised in this process: :func:`exit_if_stopped` may end it

    def __init__(self, message: str):
        super().__init__(message)
        Stopped.made = True


def exit_if_stopped(done: SystemExit) -> None:
    """After a :class:`Stopped` (Ctrl-C) has been told, end the process at once.

    The stop has closed the ledger and printed its line; what is left is requests hung on
    the teacher (abandoned daemon threads) and the interpreter's teardown, which with torch
    loaded (``eval --judge-url``) alone takes one or two seconds: skip both."""
    if done.code != Stopped.exit_code or not Stopped.made:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(Stopped.exit_code)


def is_local(url: str) -> bool:
    """A teacher on this machine or the local network (where servers seldom need a key)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def api_key(url: str, env: str, flag: str = "--api-key-env") -> str:
    """The key from environment variable ``env``; a placeholder only for a local teacher."""
    key = os.environ.get(env, "").strip()
    if key:
        return key
    if is_local(url):
        return LOCAL_KEY
    raise UserError(
        f"no API key for {transport.public_url(url)}: set it with `export {env}=...` (or name "
        f"the variable that holds it with {flag}); keys are never taken on the command line"
    )


def _count(value: Any) -> int:
    """A token count from the server's ``usage``, or 0 when it is not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass
class Usage:
    """What the run cost so far (shared by the worker threads): ``sent`` logical requests,
    ``attempts`` HTTP attempts (retries and re-asks included; the budget counts these)."""

    sent: int = 0
    attempts: int = 0
    from_ledger: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, reply: dict | None, cached: bool) -> None:
        with self.lock:
            if reply is None:
                self.failed += 1
                return
            self.from_ledger += cached
            self.prompt_tokens += _count(reply.get("prompt_tokens"))
            self.completion_tokens += _count(reply.get("completion_tokens"))

    def as_dict(self) -> dict[str, int]:
        keys = ("sent", "attempts", "from_ledger", "failed", "prompt_tokens", "completion_tokens")
        return {k: getattr(self, k) for k in keys}


@dataclass
class _Outcome:
    """One HTTP attempt: a reply, or why not and how long to wait before trying again
    (``retry_in`` None: trying again cannot help)."""

    reply: dict | None = None
    why: str = "teacher_error"
    retry_in: float | None = None


class Teacher:
    """Chat completions through a ledger, with a budget of HTTP attempts."""

    def __init__(
        self,
        url: str,
        model: str,
        key_env: str,
        ledger_path: Path,
        *,
        timeout: float = 120.0,
        max_requests: int = 0,
        role: str = "teacher",
    ):
        import openai

        # ``url`` is shown and keyed without its credentials: a new password keeps the ledger
        self.url, self.model, self.key_env, self.role = (
            transport.public_url(url),
            model,
            key_env,
            role,
        )
        self.flags = FLAGS[role]
        self.timeout = timeout
        self.client = openai.OpenAI(
            base_url=url,
            api_key=api_key(url, key_env, self.flags["key"]),
            timeout=timeout,
            max_retries=0,  # ours: see the module docstring
            http_client=transport.http_client(),
        )
        self.ledger = Ledger(ledger_path)
        self.usage = Usage()
        self.max_requests = max_requests
        self.on_reply: Callable[[], None] = lambda: None
        self.stopping = threading.Event()  # Ctrl-C: no new attempt, no retry wait
        self._key_locks: dict[str, threading.Lock] = {}

    def close(self) -> None:
        """After Ctrl-C: send nothing more and record nothing more (the ledger's count is final)."""
        self.stopping.set()
        self.ledger.close()

    def _fatal(self, err: Exception) -> UserError | None:
        """The failures no retry can fix, as one line; None for the others."""
        import openai

        status = getattr(err, "status_code", None)
        if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
            return UserError(
                f"{self.url} rejected the API key in ${self.key_env} ({status}); "
                f"check the key, or {self.flags['key']}"
            )
        if isinstance(err, openai.NotFoundError):
            return UserError(
                f"{self.url} has no model '{self.model}' (404); check "
                f"{self.flags['model']} and that the URL ends in /v1"
            )
        return None

    def probe(self) -> None:
        """Stop at once, in one line, on a wrong URL, a rejected key or an unknown model."""
        import openai

        client = self.client.with_options(timeout=min(self.timeout, 30.0))
        try:
            served = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            served = None  # some servers have no /models; the tiny request below decides
        except openai.APIConnectionError as err:
            raise UserError(
                f"cannot reach the {self.role} at {self.url} ({err.__class__.__name__}); "
                f"check {self.flags['url']} and that the server is running"
            ) from None
        except (openai.APIError, ValueError, TypeError, AttributeError) as err:
            raise (
                self._fatal(err)
                or UserError(
                    f"{self.url} does not answer like an OpenAI-compatible API "
                    f"({getattr(err, 'status_code', type(err).__name__)}); the URL usually ends "
                    "in /v1, e.g. http://localhost:11434/v1"
                )
            ) from None
        # ollama answers to "qwen2.5" for the "qwen2.5:latest" it lists
        if served is not None and not {self.model, f"{self.model}:latest"} & set(served):
            raise UserError(
                f"{self.url} does not serve '{self.model}'; it serves: "
                f"{', '.join(sorted(map(str, served))) or 'no models'}"
            )
        if served is None:
            self._attempt(client, [{"role": "user", "content": "ping"}], {"max_tokens": 1})

    def _spend(self) -> None:
        """Count one HTTP attempt, within the budget."""
        with self.usage.lock:
            if self.max_requests and self.usage.attempts >= self.max_requests:
                raise UserError(
                    f"the request budget (--max-requests {self.max_requests} HTTP attempts, "
                    "retries included) is spent; every reply is kept in the ledger: rerun with "
                    "a larger budget to go on"
                )
            self.usage.attempts += 1

    def _fetch(self, messages: list[dict], params: dict) -> tuple[dict | None, str]:
        """The reply after retries, or (None, why); a bad reply is asked again once."""
        with self.usage.lock:
            self.usage.sent += 1
        outcome, bad = _Outcome(), 0
        for attempt in range(RETRIES + 1):
            if attempt and self.stopping.wait(outcome.retry_in or 0):
                break
            if self.stopping.is_set():
                break
            self._spend()
            outcome = self._attempt(self.client, messages, params, attempt + 1)
            bad += outcome.why == "bad_reply"
            if outcome.reply is not None or outcome.retry_in is None or bad == 2:
                return outcome.reply, outcome.why
        return None, "stopped" if self.stopping.is_set() else outcome.why

    def _attempt(self, client: Any, messages: list[dict], params: dict, n: int = 1) -> _Outcome:
        """One HTTP attempt (the ``n``-th of its request)."""
        import openai

        try:
            response = client.chat.completions.create(model=self.model, messages=messages, **params)
            choice = response.choices[0]
            content = choice.message.content
        except openai.APIStatusError as err:
            fatal = self._fatal(err)
            if fatal is not None:
                raise fatal from None
            return _Outcome(retry_in=_retry_in(err, n))
        except transport.ReplyTooLarge:  # as raised (openai 3), or wrapped (openai 1, below)
            return _Outcome(why="oversized")
        except openai.APIConnectionError as err:
            if isinstance(err.__cause__, transport.ReplyTooLarge):
                return _Outcome(why="oversized")
            return _Outcome(retry_in=transport.backoff(n))
        except (openai.APIError, IndexError, TypeError, AttributeError, ValueError):
            return _Outcome(why="bad_reply", retry_in=0.0)  # not a chat completion
        return _checked(response, choice, content, params)

    def request(self, messages: list[dict], params: dict) -> tuple[dict | None, str | None]:
        """``(reply, None)`` (from the ledger when it was asked before) or ``(None, why)``."""
        key = request_key(self.url, self.model, messages, params)
        with self.usage.lock:  # one lock per request: the same request in two threads is sent once
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        why = None
        with key_lock:
            reply = self.ledger.get(key)
            cached = reply is not None
            if not cached:
                reply, why = self._fetch(messages, params)
                if reply is not None:
                    self.ledger.add(key, reply)
        self.usage.count(reply, cached)
        self.on_reply()
        return reply, why if reply is None else None

    def ask(self, messages: list[dict], params: dict) -> dict | None:
        """The reply, or None (:meth:`request` says why)."""
        return self.request(messages, params)[0]


def _retry_in(err: Any, n: int) -> float | None:
    """Seconds before retrying after an HTTP error status, or None when retrying cannot help."""
    status = getattr(err, "status_code", 0)
    headers = getattr(getattr(err, "response", None), "headers", None)
    should = (headers or {}).get("x-should-retry")
    if should in ("true", "false"):
        return transport.backoff(n, headers) if should == "true" else None
    return transport.backoff(n, headers) if status in RETRY_STATUS or status >= 500 else None


def _checked(response: Any, choice: Any, content: Any, params: dict) -> _Outcome:
    """The reply to record, once its content is text of a size the request allows."""
    if not isinstance(content, str):  # a number, object, list or null: never recorded
        return _Outcome(why="bad_reply", retry_in=0.0)
    asked = params.get("max_tokens") or params.get("max_completion_tokens")
    if len(content) > transport.reply_char_limit(asked):
        return _Outcome(why="oversized")
    usage = getattr(response, "usage", None)
    finish = getattr(choice, "finish_reason", None)
    reply = {
        "content": content,
        "finish_reason": finish if isinstance(finish, str) else None,
        "prompt_tokens": _count(getattr(usage, "prompt_tokens", 0)),
        "completion_tokens": _count(getattr(usage, "completion_tokens", 0)),
    }
    return _Outcome(reply=reply, why="")
