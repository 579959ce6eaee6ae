"""The OpenAI wire format of ``qwen-mlx serve``: request validation, replies and errors.

Requests are validated as strictly as OpenAI does (``"max_tokens": "4"``, ``"stream": "yes"``
and unknown arguments are errors), and fields that would change what a reply means but are not
supported yet (``tools``, ``response_format``, ``logprobs`` …) are refused, not ignored. Every
error, whatever raised it (validation, an unknown URL, a wrong method, a bug), reaches the
client in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

A reply that opens with a think block (Qwen3 with ``chat.enable_thinking``) returns the block
as ``reasoning_content`` beside ``content``, as OpenAI-compatible reasoning servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException

from qwen_mlx.reasoning import split_reply

# Messages per request, as OpenAI allows: far beyond a real conversation, and few enough that
# rendering and tokenizing them all takes a moment, not seconds of the one tokenizer.
MAX_MESSAGES = 2048
# Fields that change the meaning of a reply; refused until they are supported (and
# ``logprobs``, which text completions share: see Sampling).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "top_logprobs")
_STATUS_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}


def _utf8(text: str, where: str) -> str:
    """JSON can carry a lone surrogate (``"\\ud800"``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = f"{where} is not valid Unicode (a lone surrogate such as \\ud800)"
        raise ValueError(message) from None
    return text


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


# Parts of a message that are not text: OpenAI's and other servers' names for them.
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "video_url", "file")


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    arguments: str | dict

    @field_validator("arguments")
    @classmethod
    def _object(cls, value):
        # OpenAI sends the arguments as JSON text; the chat template writes an object.
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("arguments must be a JSON object (as text or not)") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object (as text or not)")
        return value


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn (OpenAI's shape), rendered by the template."""

    model_config = ConfigDict(strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant"]
    # Before content, so that content's check knows whether the turn calls tools.
    tool_calls: list[ToolCall] | None = None
    content: str | list[TextPart] | None

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, value, info: ValidationInfo):
        if value and info.data.get("role") != "assistant":
            raise ValueError("only an assistant turn carries tool calls")
        return value or None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value, info: ValidationInfo):
        # Said before pydantic tries each type of the union, whose errors name neither cause.
        if value is None:
            if info.data.get("tool_calls"):
                return ""  # an assistant turn that only calls tools
            role = info.data.get("role")
            detail = " or tool_calls" if role == "assistant" else ""
            raise ValueError(f"content is missing (null): every {role} turn needs text{detail}")
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in MEDIA_PARTS:
                    raise ValueError(
                        f"part {i} is {kind}: this model reads text only; send text parts"
                    )
        return value

    @field_validator("content")
    @classmethod
    def _text(cls, value, info: ValidationInfo):
        text = value if isinstance(value, str) else "".join(p.text for p in value)
        if not text and info.data.get("tool_calls"):
            return text
        if not text.strip():
            raise ValueError("content must not be empty")
        return _utf8(text, "content")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


SEED_RANGE = 1 << 63  # seeds are 64-bit integers, as in vLLM


class Sampling(BaseModel):
    """The decoding fields chat and text completions share: OpenAI's, and those vLLM and
    SGLang add (``top_k``, ``min_p``, ``repetition_penalty``), with their ranges."""

    # Strict like OpenAI, which also refuses arguments it does not know.
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    # Bounded by the model's context (the server checks it), as vLLM bounds it.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # -1 and 0: off (vLLM's and llama.cpp's "off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-SEED_RANGE, lt=SEED_RANGE)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    logprobs: Any = None
    # OpenAI's fields that do not change what a reply means: accepted and not used.
    user: Any = None

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        return value if value is None else _utf8(value, "model")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return [_utf8(s, "stop") for s in stops]

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value, info: ValidationInfo):
        if value not in (None, False, 0):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class ChatTemplateKwargs(BaseModel):
    """vLLM's and SGLang's ``chat_template_kwargs``: what the chat template is rendered with.
    Only ``enable_thinking`` is taken (Qwen3's; Qwen2.5's template does not read it, so there
    it changes nothing, as in vLLM); any other key is refused, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    enable_thinking: bool | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    top_logprobs: Any = None
    # OpenAI's fields that do not change what a reply means: accepted and not used.
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if value not in (None, False, 0, [], {}, "none"):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported')
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _not_too_many(cls, value):
        # Before each message is validated: counting costs nothing, validating 55,000 does.
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages per request, not {len(value)}")
        return value

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, value):
        if not any(m.role == "user" for m in value):
            raise ValueError("messages need at least one user message")
        return value


class TextRequest(Sampling):
    """``POST /v1/completions``: plain prompt text, no chat template (OpenAI's legacy
    completions, which llama-index's OpenAILike and older clients use)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's and vLLM's default
    echo: bool = False
    best_of: int = Field(default=1, ge=1, le=1)
    suffix: Any = None
    logit_bias: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("one prompt per request (n and batches of prompts: 1)")
        if not prompts[0]:
            raise ValueError("prompt must not be empty")
        return _utf8(prompts[0], "prompt")

    @field_validator("echo", "suffix", "logit_bias")
    @classmethod
    def _not_supported(cls, value, info: ValidationInfo):
        if value not in (None, False, {}):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


def text_completion(model: str, text: str, reason: str, tokens: dict[str, int]) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        "usage": tokens,
    }


class ErrorResponse(JSONResponse):
    """An error in OpenAI's shape. ASCII-escaped, so text echoed from a request can never
    make the error itself fail to encode."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        kind = kind or _STATUS_TYPES.get(status, "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        super().__init__(body, status_code=status, headers=headers)

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


def _where(loc: tuple) -> str:
    """A pydantic location as a JSON path: ``messages[0].content``."""
    path = ""
    for part in loc:
        if part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a character offset
            reason = first.get("ctx", {}).get("error", "")
            return ErrorResponse(400, f"the body is not valid JSON: {reason}".rstrip(": "))
        where = _where(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unrecognized request argument"
        return ErrorResponse(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return ErrorResponse(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # uvicorn logs the traceback
        return ErrorResponse(500, f"internal error: {type(exc).__name__}", kind="server_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def reply_message(text: str, think_tags: tuple[str, str] | None) -> dict[str, str]:
    """The assistant message of a whole reply: content, and reasoning_content if it thought
    (``think_tags``: the model family's)."""
    reasoning, content = split_reply(text, think_tags)
    message = {"role": "assistant", "content": content}
    return message if reasoning is None else {**message, "reasoning_content": reasoning}


def completion(
    model: str, text: str, reason: str, tokens: dict[str, int], think_tags: tuple | None
) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply_message(text, think_tags),
                "finish_reason": reason,
            }
        ],
        "usage": tokens,
    }


class ChunkWriter:
    """The server-sent events of one streamed chat completion."""

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.ident, self.created = f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    kind, prefix = "chat.completion.chunk", "chatcmpl"

    def event(self, choices: list, **extra) -> bytes:
        body = {
            "id": self.ident,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        if self.include_usage:  # OpenAI: null on every chunk but the last
            body.setdefault("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def delta(self, delta: dict, reason: str | None = None) -> bytes:
        return self.event([{"index": 0, "delta": delta, "finish_reason": reason}])

    def finish(self, reason: str, tokens: dict[str, int]) -> bytes:
        last = self.delta({}, reason)
        if self.include_usage:
            last += self.event([], usage=tokens)
        return last + b"data: [DONE]\n\n"

    def text(self, text: str, reason: str | None = None) -> bytes:
        """A text completion's chunk (``/v1/completions``)."""
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return self.event([choice])

    @staticmethod
    def error(message: str) -> bytes:
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return f"data: {json.dumps(body)}\n\n".encode()


class TextChunkWriter(ChunkWriter):
    """The server-sent events of one streamed text completion."""

    kind, prefix = "text_completion", "cmpl"

    def delta(self, delta: dict, reason: str | None = None) -> bytes:
        if "role" in delta:  # a chat stream's opening chunk: no such thing here
            return b""
        return self.text(delta.get("content", ""), reason)
