"""``qwen-mlx serve``: an OpenAI-compatible HTTP API over one loaded model.

Endpoints: ``POST /v1/chat/completions`` (plain, or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /health``, and ``/openapi.json``. The wire format and its errors live
in :mod:`qwen_mlx.serve.api`; the pages (the chat page at ``/``, ``/docs``) and the base model
the chat page compares with, in :mod:`qwen_mlx.serve.page`.

One model serves everyone: one thread (:mod:`qwen_mlx.serve.scheduler`) decodes the
requests in flight together, up to ``max_concurrent`` of them, between steps admitting those
that wait and dropping those whose client went away (the request side sets the job's cancel
flag when the client goes, and stopping the server sets every flag, so an abandoned request
never keeps its slot, and SIGTERM ends the server in moments). The Host header, the API key
and the body size are checked before anything is parsed, and a prompt's size before it is
tokenized (:mod:`qwen_mlx.serve.guard`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.errors import UserError
from qwen_mlx.reasoning import ReasoningSplit
from qwen_mlx.serve.api import (
    SEED_RANGE,
    ChatRequest,
    ChunkWriter,
    ErrorResponse,
    Sampling,
    TextChunkWriter,
    TextRequest,
    completion,
    install_error_handlers,
    text_completion,
    usage,
)
from qwen_mlx.serve.guard import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    Guard,
    allow_origins,
    allowed_hosts,
    cannot_fit,
    http_protocol,
)
from qwen_mlx.serve.page import PUBLIC_PATHS, add_page_routes
from qwen_mlx.serve.scheduler import DEFAULT_MAX_CONCURRENT, Job, Scheduler

SHUTDOWN_GRACE_S = 3  # after SIGTERM, in-flight replies are cut off after this long at most
MIN_BODY_LIMIT = 1 << 20
BODY_BYTES_PER_TOKEN = 64  # a full context of JSON-escaped CJK text needs about 8


class Server:
    """The model (and the base model it is compared with), the scheduler that runs its
    generations, and what the page shows of the run."""

    def __init__(
        self,
        engine: Any,
        api_key: str | None = None,
        default_max_tokens: int = 512,
        cors_origins: tuple[str, ...] = (),
        base: Any = None,
        run_dir: Path | None = None,
        system_prompt: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ):
        self.engine, self.base = engine, base
        # Requests pick one by their `model` field; a base adapter-off view shares the weights.
        self.engines = {e.model_id: e for e in (engine, base) if e is not None}
        self.run_dir, self.system_prompt = run_dir, system_prompt
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts  # beside loopback and the bound address
        self.default_max_tokens = default_max_tokens
        self.cors_origins = list(cors_origins)
        self.max_body = max(MIN_BODY_LIMIT, BODY_BYTES_PER_TOKEN * engine.context_length)
        self.body_timeout = BODY_TIMEOUT_S  # seconds for a request's body to arrive
        self.started = int(time.time())  # the `created` of its model objects
        self.scheduler = Scheduler(max_concurrent)  # the model: requests decoded together
        for each in self.engines.values():
            if hasattr(each, "max_sequences"):  # llama.cpp sizes its batch's cache by it
                each.max_sequences = max_concurrent
        self._encoding = threading.Lock()  # one prompt encoding at a time per tokenizer

    def settings(self, req: Sampling, max_tokens: int | None = None) -> GenerationSettings:
        return GenerationSettings(
            max_tokens=max_tokens or req.max_tokens or self.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop or []),
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=None if req.seed is None else req.seed % SEED_RANGE,
        )

    def prompt_ids(
        self,
        engine: Any,
        messages: list[dict],
        settings: GenerationSettings,
        thinking: bool | None = None,
    ) -> list[int]:
        """``thinking``: the request's enable_thinking (None: the engine's own setting)."""
        with self._encoding:
            if thinking is None:
                return engine.prompt_ids(messages, settings.max_tokens)
            return engine.prompt_ids(messages, settings.max_tokens, thinking=thinking)

    def text_ids(self, engine: Any, text: str, settings: GenerationSettings) -> list[int]:
        with self._encoding:
            return engine.text_ids(text, settings.max_tokens)

    @property
    def closing(self) -> bool:
        return self.scheduler.closing

    def stop_all(self) -> None:
        """The server is stopping: end every generation now, refuse new ones."""
        self.scheduler.stop_all()


class EventStream(Response):
    """The server-sent events of a streamed reply. A client that disconnects cancels the job
    at once, without waiting for the next chunk to fail to send."""

    media_type = "text/event-stream"

    def __init__(self, job: Job, writer: ChunkWriter):
        self.job, self.writer = job, writer
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache"})  # no body attribute: no length

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                await send(start)
                await self._events(send)
                group.cancel_scope.cancel()
        finally:
            self.job.cancel.set()

    async def _events(self, send) -> None:
        async def write(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await write(self.writer.delta({"role": "assistant", "content": ""}))
        split = ReasoningSplit(self.job.think_tags)  # a think block streams as reasoning_content
        try:
            while (chunk := await self.job.next()) is not None:
                parts = split.feed(chunk.text) + (split.finish() if chunk.finish_reason else [])
                for field, text in parts:
                    await write(self.writer.delta({field: text}))
                if chunk.finish_reason:
                    tokens = usage(self.job.prompt_tokens, chunk.completion_tokens)
                    await write(self.writer.finish(chunk.finish_reason, tokens))
        except Exception as err:  # the status line has gone out: say it in the stream
            await write(self.writer.error(f"generation failed: {type(err).__name__}"))
        await write(b"", more=False)


async def _cancel_on_disconnect(receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _answer(job: Job, request: Request, model_id: str, text: bool = False):
    """The whole reply of a non-streamed request, polling for a client that gave up."""
    task = asyncio.ensure_future(job.collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await request.is_disconnected():
                return Response(status_code=499)  # nobody will read it
        chunks = task.result()
    finally:
        job.cancel.set()
        task.cancel()
    if not chunks or not chunks[-1].finish_reason:
        return ErrorResponse(503, "the server is shutting down", kind="server_error")
    said, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
    tokens = usage(job.prompt_tokens, chunks[-1].completion_tokens)
    if text:
        return text_completion(model_id, said, reason, tokens)
    return completion(model_id, said, reason, tokens, job.think_tags)


def create_app(server: Server, bound: str = "127.0.0.1") -> FastAPI:
    """The app of ``server``, listening on the address ``bound`` (which it answers to)."""
    app = FastAPI(title="qwen-mlx", version="1", docs_url=None, redoc_url=None)
    model_id = server.engine.model_id
    install_error_handlers(app)
    app.add_middleware(
        Guard,
        api_key=server.api_key,
        max_body=server.max_body,
        hosts=allowed_hosts(bound, server.allowed_hosts),
        public=PUBLIC_PATHS | {"/health"},
        body_timeout=server.body_timeout,
    )
    allow_origins(app, server.cors_origins)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.started, "owned_by": "local"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object(name) for name in server.engines]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in server.engines:
            return _no_such_model(server, name)
        return model_object(name)

    add_page_routes(app, server)

    def refused(req: Sampling, settings: GenerationSettings) -> ErrorResponse | None:
        engine = server.engines.get(req.model or model_id)
        if engine is None:
            return _no_such_model(server, req.model)
        if server.closing:
            return ErrorResponse(503, "the server is shutting down", kind="server_error")
        if settings.max_tokens >= engine.context_length:
            return ErrorResponse(
                400,
                f"max_tokens={settings.max_tokens} does not fit in the model's context of "
                f"{engine.context_length} tokens beside the prompt; lower it",
                "max_tokens",
                code="context_length_exceeded",
            )
        return None

    @app.post("/v1/completions")
    async def text(req: TextRequest, request: Request):
        settings = server.settings(req)
        if (error := refused(req, settings)) is not None:
            return error
        engine = server.engines[req.model or model_id]
        prompt = req.prompt  # one string (validated)
        too_long = cannot_fit([{"content": prompt}], engine.context_length, settings.max_tokens)
        if too_long:
            return ErrorResponse(400, too_long, "prompt", code="context_length_exceeded")
        try:
            ids = await asyncio.to_thread(server.text_ids, engine, prompt, settings)
        except UserError as err:
            return ErrorResponse(400, str(err), "prompt", code="context_length_exceeded")
        job = Job(server.scheduler, engine, ids, settings)
        job.think_tags = None  # plain text: no think block to split off
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(job, TextChunkWriter(engine.model_id, include_usage))
        return await _answer(job, request, engine.model_id, text=True)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        settings = server.settings(req, req.max_completion_tokens)
        if (error := refused(req, settings)) is not None:
            return error
        engine = server.engines[req.model or model_id]
        messages = [_message(m) for m in req.messages]
        too_long = cannot_fit(messages, engine.context_length, settings.max_tokens)
        if too_long:  # refused by counting: a hostile request never holds the tokenizer
            return ErrorResponse(400, too_long, "messages", code="context_length_exceeded")
        try:
            kwargs = req.chat_template_kwargs
            thinking = kwargs.enable_thinking if kwargs else None
            ids = await asyncio.to_thread(server.prompt_ids, engine, messages, settings, thinking)
        except UserError as err:
            return ErrorResponse(400, str(err), "messages", code="context_length_exceeded")
        job = Job(server.scheduler, engine, ids, settings)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(job, ChunkWriter(engine.model_id, include_usage))
        return await _answer(job, request, engine.model_id)

    return app


def _message(message: Any) -> dict:
    """A request's message as the chat template takes it (tool calls in OpenAI's shape,
    their arguments an object)."""
    out = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
    return out


def _no_such_model(server: Server, name: str | None) -> ErrorResponse:
    names = ", ".join(f"`{known}`" for known in server.engines)
    return ErrorResponse(
        404,
        f"the model `{name}` does not exist; this server runs {names}",
        "model",
        code="model_not_found",
    )


class Uvicorn(uvicorn.Server):
    """uvicorn's server, which ends every generation in flight as it begins to stop, so
    open streams close at once instead of holding the shutdown up."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.app_server = server

    async def shutdown(self, sockets=None) -> None:
        self.app_server.stop_all()
        await super().shutdown(sockets)


def make_server(
    server: Server,
    host: str,
    port: int,
    log_level: str = "warning",
    header_timeout: float = HEADER_TIMEOUT_S,
) -> Uvicorn:
    """``header_timeout``: seconds a connection may take to send a request's headers."""
    config = uvicorn.Config(
        create_app(server, bound=host),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        http=http_protocol(header_timeout),
    )
    return Uvicorn(config, server)


def api_key_of(given: str | None, env_var: str | None) -> str | None:
    """The key of ``--api-key``, or of the variable ``--api-key-env`` names (kept out of ps)."""
    import os

    if env_var is None:
        return given
    if given is not None:
        raise UserError("give --api-key or --api-key-env, not both")
    key = os.environ.get(env_var, "")
    if not key.strip():
        raise UserError(f"--api-key-env {env_var}: the environment variable is not set or empty")
    return key


def run(
    engine: Any,
    host: str,
    port: int,
    api_key: str | None,
    console,
    cors_origins: tuple[str, ...] = (),
    **page: Any,
) -> None:
    """Serve until Ctrl-C or SIGTERM. ``page``: the :class:`Server`'s base model, run folder,
    system prompt, allowed host names and ``max_concurrent``."""
    server = Server(engine, api_key, cors_origins=cors_origins, **page)
    where = f"http://{host}:{port}"
    console.print(f"serving {engine.description} at {where}/v1 (Ctrl-C stops)", highlight=False)
    if server.base is not None:
        console.print(f"  and its base, {server.base.description}, to compare", highlight=False)
    if callable(getattr(engine, "decoder", None)) and server.scheduler.max_concurrent > 1:
        together = f"up to {server.scheduler.max_concurrent} requests decoded together"
    else:
        together = "one request at a time"
    console.print(f"  {together}; chat page: {where}/", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print("[yellow]⚠[/] listening beyond this machine without --api-key")
    make_server(server, host, port).run()
