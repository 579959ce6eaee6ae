"""The pages of ``qwen-mlx serve``: the chat page with its base-vs-tuned compare, and ``/docs``.

The page (``qwen_mlx/serve/web/``: one HTML file, a script and a style sheet of our own, nothing
from elsewhere) is served at ``/`` without the API key, so it can load and ask for the key;
everything it then calls is the API, behind the key. ``/ui/info`` tells it the models, and
``/run/eval/report.html`` and ``/run/loss.png`` hand it the run's eval report and loss curve:
only those two files of the run folder, by fixed name, so no request reaches any other file.

Compare: a run served with its adapter also answers as its base model (:class:`AdapterOff`,
the same weights in memory with the adapter bypassed), or, with ``--gguf`` and
``--base-gguf``, as a second GGUF engine. Requests choose one by the ``model`` field.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Engine
from qwen_mlx.serve.api import ErrorResponse

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# What loads without the key: the page itself, which then asks for it.
PUBLIC_PATHS = frozenset({"/", *(f"/ui/{name}" for name in ASSETS)})
RUN_FILES = {"/run/eval/report.html": "eval/report.html", "/run/loss.png": "loss.png"}
# Scripts only from this server; model output never becomes markup, and this is the backstop.
# No framing: another site must not overlay the page, whose key is in the user's browser.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# X-Frame-Options for browsers older than frame-ancestors.
PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"}


class AdapterOff:
    """The base model of an engine that carries an adapter: the same loaded weights, with
    the adapter bypassed while this engine generates (the server runs one generation at a
    time, so the tuned engine never sees it switched off)."""

    has_adapter = False  # it is the base

    def __init__(self, engine: Engine, model_id: str):
        self.engine = engine
        self.context_length, self.family = engine.context_length, engine.family
        self.tuned_id = engine.model_id
        self.name(model_id)

    @property
    def thinking(self) -> bool | None:  # prompts are the tuned engine's
        return self.engine.thinking

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.tokenizer

    def name(self, model_id: str) -> None:
        self.model_id = model_id
        self.description = f"{model_id} (the base of {self.tuned_id}, adapter off)"

    def adapter_disabled(self) -> AbstractContextManager[None]:
        return nullcontext()  # off already

    def prompt_ids(self, messages: list[dict], max_tokens: int, **thinking) -> list[int]:
        return self.engine.prompt_ids(messages, max_tokens, **thinking)

    def text_ids(self, text: str, max_tokens: int) -> list[int]:
        return self.engine.text_ids(text, max_tokens)

    def pieces(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[str]:
        pieces = self.engine.pieces(prompt_ids, settings)
        with self.engine.adapter_disabled(), closing(pieces):
            yield from pieces

    @property
    def decoder(self):
        """The tuned engine's continuous batching, stepped with the adapter off (a batch of
        its own: the server never mixes the two in one batch)."""
        make = self.engine.decoder  # AttributeError where the engine has none
        return lambda: AdapterOffDecoder(make(), self.engine.adapter_disabled)

    def score(self, samples: list) -> tuple[float, int]:
        with self.engine.adapter_disabled():
            return self.engine.score(samples)


class AdapterOffDecoder:
    """A :class:`~qwen_mlx.inference.Decoder` whose steps run with the adapter bypassed."""

    def __init__(self, decoder: Any, adapter_disabled):
        self.inner, self.adapter_disabled = decoder, adapter_disabled
        self.decode, self.join, self.leave = decoder.decode, decoder.join, decoder.leave

    def __len__(self) -> int:
        return len(self.inner)

    def step(self) -> list:
        with self.adapter_disabled():
            return self.inner.step()


def base_engine(
    engine: Engine, base_name: str | None = None, base_gguf: Path | None = None
) -> Engine | None:
    """The base model to compare ``engine`` with: ``base_gguf`` when given, else ``engine``
    with its adapter off (``base_name`` names it), else None (nothing to compare)."""
    if base_gguf is not None:
        from qwen_mlx.inference import GGUFEngine

        base = GGUFEngine(Path(base_gguf), n_ctx=engine.context_length)
    elif engine.has_adapter and base_name:
        base = AdapterOff(engine, base_name)
    else:
        return None
    if base.model_id == engine.model_id:  # two models the API must tell apart
        base.name(f"{base.model_id}-base")
    return base


def open_base(
    engine: Engine, run_or_adapter: Path | None, model_dir: Path | None, base_gguf: Path | None
) -> Engine | None:
    """``serve``'s base model for the page's compare, from its arguments."""
    if base_gguf is not None or run_or_adapter is None:
        return base_engine(engine, base_gguf=base_gguf)
    from qwen_mlx.adapters import resolve_source

    return base_engine(engine, resolve_source(run_or_adapter, model_dir).model_dir.name)


def _asset(name: str) -> bytes:
    return resources.files("qwen_mlx.serve").joinpath("web", name).read_bytes()


def add_page_routes(app: FastAPI, server: Any) -> None:
    """``/`` and its assets, ``/ui/info``, the run's files (see the module docstring), and
    ``/docs``: the API's endpoints."""

    @app.get("/", include_in_schema=False)
    async def page():
        headers = {**PAGE_HEADERS, "Cache-Control": "no-cache"}
        return Response(_asset("index.html"), media_type="text/html", headers=headers)

    for name, media_type in ASSETS.items():
        app.add_api_route(f"/ui/{name}", _asset_route(name, media_type), include_in_schema=False)

    @app.get("/ui/info", include_in_schema=False)
    async def info():
        base = server.base.model_id if server.base is not None else None
        found = {path: _run_file(server.run_dir, path) is not None for path in RUN_FILES}
        return {
            "model": server.engine.model_id,
            "base": base,
            "report": found["/run/eval/report.html"],
            "loss": found["/run/loss.png"],
            "system_prompt": server.system_prompt,
        }

    for path in RUN_FILES:
        app.add_api_route(path, _run_file_route(server, path), include_in_schema=False)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app), headers=PAGE_HEADERS)


def _docs_page(app: FastAPI) -> str:
    """The endpoints, from the OpenAPI schema; no scripts or assets from elsewhere."""
    rows = "".join(
        f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
        f"<td>{html.escape(op.get('summary', ''))}</td></tr>"
        for path, ops in app.openapi()["paths"].items()
        for method, op in ops.items()
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>qwen-mlx API</title><h1>qwen-mlx API</h1>"
        f"<p>OpenAI-compatible. Schema: <a href=openapi.json>/openapi.json</a></p>"
        f"<table>{rows}</table>"
    )


def _asset_route(name: str, media_type: str):
    async def asset():
        return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "no-cache"})

    return asset


def _run_file(run_dir: Path | None, path: str) -> Path | None:
    if run_dir is None:
        return None
    file = Path(run_dir) / RUN_FILES[path]
    return file if file.is_file() else None


def _run_file_route(server: Any, path: str):
    async def run_file():
        file = _run_file(server.run_dir, path)
        if file is None:
            return ErrorResponse(404, f"this run has no {RUN_FILES[path]}", code="not_found")
        # Opened on its own, the report still runs no script: a sandbox of its own.
        headers = {"Content-Security-Policy": "sandbox; frame-ancestors 'none'"}
        return FileResponse(file, headers={**headers, "X-Frame-Options": "DENY"})

    return run_file
