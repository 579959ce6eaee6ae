"""``qwen-mlx serve``: an OpenAI-compatible HTTP API over one loaded model.

Endpoints: ``POST /v1/chat/completions`` (plain, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``. Every request body is validated
and a bad one gets a 400 with an OpenAI-style error object, never a 500. One model serves
everyone, so generations run one at a time behind a lock, in a worker thread so the event
loop stays responsive; a streamed reply holds the lock until its last chunk.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Chunk, stream

MAX_TOKENS_LIMIT = 8192


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value):
        text = value if isinstance(value, str) else "".join(p.text for p in value)
        if not text.strip():
            raise ValueError("content must not be empty")
        return text


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, value):
        if not any(m.role == "user" for m in value):
            raise ValueError("messages need at least one user message")
        return value


def _error(status: int, message: str, param: str | None = None, kind: str | None = None):
    body = {
        "error": {
            "message": message,
            "type": kind or "invalid_request_error",
            "param": param,
            "code": None,
        }
    }
    return JSONResponse(status_code=status, content=body)


class Server:
    """The model, its lock, and the request handling that needs both."""

    def __init__(self, engine: Any, api_key: str | None = None, default_max_tokens: int = 512):
        self.engine = engine
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()

    def settings(self, req: ChatRequest) -> GenerationSettings:
        return GenerationSettings(
            max_tokens=req.max_completion_tokens or req.max_tokens or self.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop or []),
        )

    def check_length(self, messages: list[dict], settings: GenerationSettings) -> str | None:
        prompt = self.engine.count_prompt_tokens(messages)
        room = self.engine.context_length - settings.max_tokens
        if prompt > room:
            return (
                f"the prompt is {prompt} tokens; with max_tokens={settings.max_tokens} it must "
                f"stay within {room} (context {self.engine.context_length})"
            )
        return None

    def locked_chunks(self, messages, settings) -> Iterator[Chunk]:
        with self.lock:
            yield from stream(self.engine, messages, settings)


def _completion(model: str, text: str, reason: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }
        ],
    }


def _sse(model: str, chunks: Iterator[Chunk]) -> Iterator[str]:
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def event(delta: dict, reason: str | None) -> str:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""}, None)
    for chunk in chunks:
        if chunk.text:
            yield event({"content": chunk.text}, None)
        if chunk.finish_reason:
            yield event({}, chunk.finish_reason)
    yield "data: [DONE]\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="qwen-mlx", version="1")
    model_id = server.engine.model_id

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg')}" if where else first.get("msg"), where)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        protected = server.api_key and request.url.path.startswith("/v1/")
        if protected and request.headers.get("authorization") != f"Bearer {server.api_key}":
            return _error(401, "invalid or missing API key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "owned_by": "local"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        settings = server.settings(req)
        problem = await asyncio.to_thread(server.check_length, messages, settings)
        if problem:
            return _error(400, problem, "messages", kind="context_length_exceeded")
        if req.stream:
            chunks = server.locked_chunks(messages, settings)
            return StreamingResponse(_sse(model_id, chunks), media_type="text/event-stream")
        pieces = await asyncio.to_thread(lambda: list(server.locked_chunks(messages, settings)))
        text = "".join(c.text for c in pieces)
        return _completion(model_id, text, pieces[-1].finish_reason or "stop")

    return app


def run(engine: Any, host: str, port: int, api_key: str | None, console) -> None:
    """Serve until Ctrl-C."""
    import uvicorn

    app = create_app(Server(engine, api_key))
    where = f"http://{host}:{port}/v1"
    console.print(f"serving {engine.description} at {where} (Ctrl-C stops)", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print("[yellow]⚠[/] listening beyond this machine without --api-key")
    uvicorn.run(app, host=host, port=port, log_level="warning")
