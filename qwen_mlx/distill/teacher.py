"""The teacher: any OpenAI-compatible chat endpoint, asked through the ledger.

The official ``openai`` client does the retries: 429 (it honours Retry-After up to two
minutes), 5xx, timeouts and dropped connections, with exponential backoff, ``RETRIES``
times. A request that still fails is counted and comes back as ``None`` (its item is
dropped, and asked again on a rerun); a rejected key or an unknown model stops the run.
:meth:`Teacher.probe` checks URL, key and model before any chunk work.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qwen_mlx.distill.ledger import Ledger, request_key
from qwen_mlx.errors import UserError

RETRIES = 5
_MALFORMED = object()  # a 200 reply whose body is not a chat completion
LOCAL_KEY = "no-key"
# The options that name a teacher's URL, model and key, for the messages that name them.
FLAGS = {
    "teacher": {"url": "--teacher-url", "model": "--teacher-model", "key": "--api-key-env"},
    "judge": {"url": "--judge-url", "model": "--judge-model", "key": "--judge-key-env"},
}  # what a key-less local server (ollama, qwen-mlx serve) is sent


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
        f"no API key for {url}: set it with `export {env}=...` (or name the variable that "
        f"holds it with {flag}); keys are never taken on the command line"
    )


@dataclass
class Usage:
    """What the run cost so far (shared by the worker threads)."""

    sent: int = 0
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
            self.prompt_tokens += reply.get("prompt_tokens", 0)
            self.completion_tokens += reply.get("completion_tokens", 0)

    def as_dict(self) -> dict[str, int]:
        keys = ("sent", "from_ledger", "failed", "prompt_tokens", "completion_tokens")
        return {k: getattr(self, k) for k in keys}


class Teacher:
    """Chat completions through a ledger, with a request budget."""

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

        self.url, self.model, self.key_env = url, model, key_env
        self.flags = FLAGS[role]
        self.client = openai.OpenAI(
            base_url=url,
            api_key=api_key(url, key_env, self.flags["key"]),
            timeout=timeout,
            max_retries=RETRIES,
        )
        self.ledger = Ledger(ledger_path)
        self.usage = Usage()
        self.max_requests = max_requests
        self.on_reply: Callable[[], None] = lambda: None
        self._key_locks: dict[str, threading.Lock] = {}

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

        client = self.client.with_options(max_retries=1, timeout=30.0)
        try:
            served = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            served = None  # some servers have no /models; the tiny request below decides
        except openai.APIConnectionError as err:
            raise UserError(
                f"cannot reach the teacher at {self.url} ({err.__class__.__name__}); "
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
                f"{', '.join(sorted(served)) or 'no models'}"
            )
        if served is None:
            self._call(client, [{"role": "user", "content": "ping"}], {"max_tokens": 1})

    def _spend(self) -> None:
        with self.usage.lock:
            if self.max_requests and self.usage.sent >= self.max_requests:
                raise UserError(
                    f"the request budget (--max-requests {self.max_requests}) is spent; every "
                    f"reply is kept in the ledger: rerun with a larger budget to go on"
                )
            self.usage.sent += 1

    def _call(self, client: Any, messages: list[dict], params: dict) -> dict | None:
        """One request; a body that is not a chat completion is asked again once."""
        for _ in range(2):
            reply = self._call_once(client, messages, params)
            if reply is not _MALFORMED:
                return reply
        return None

    def _call_once(self, client: Any, messages: list[dict], params: dict) -> Any:
        import openai

        try:
            response = client.chat.completions.create(model=self.model, messages=messages, **params)
            choice = response.choices[0]
            content = choice.message.content
        except openai.APIError as err:
            fatal = self._fatal(err)
            if fatal is not None:
                raise fatal from None
            return None  # still failing after the client's retries
        except (IndexError, TypeError, AttributeError, ValueError):
            return _MALFORMED
        usage = response.usage
        return {
            "content": content or "",
            "finish_reason": choice.finish_reason,
            "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", 0) or 0,
        }

    def ask(self, messages: list[dict], params: dict) -> dict | None:
        """The teacher's reply (from the ledger when it was asked before), or None."""
        key = request_key(self.model, messages, params)
        with self.usage.lock:  # one lock per request: the same request in two threads is sent once
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            reply = self.ledger.get(key)
            cached = reply is not None
            if not cached:
                self._spend()
                reply = self._call(self.client, messages, params)
                if reply is not None:
                    self.ledger.add(key, reply)
        self.usage.count(reply, cached)
        self.on_reply()
        return reply
