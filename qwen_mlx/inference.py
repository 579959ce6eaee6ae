"""One interface for using a model: a trained run through its backend, or a GGUF file.

``eval``, ``chat`` and ``serve`` all talk to an :class:`Engine`. ``open_engine`` finds the
base model and adapter behind a run folder (or takes ``--model`` / ``--gguf``) and loads
it with the chosen backend (``auto`` as for training) or with llama.cpp for a GGUF.
Stop strings are applied here, the same way for every engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_mlx.backends import get_backend
from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.errors import UserError

Messages = list[dict[str, str]]


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


class BackendEngine:
    """A base model (+ adapter) loaded by a training backend (torch or mlx)."""

    def __init__(self, backend_name: str, model_dir: Path, adapter_dir: Path | None, name: str):
        from qwen_mlx.model_files import read_model_config
        from qwen_mlx.tokens import load_tokenizer

        self.backend = get_backend(backend_name)
        self.loaded = self.backend.load(model_dir, adapter_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.model_id = name
        self.context_length = int(
            read_model_config(model_dir).get("max_position_embeddings", 32768)
        )
        self.description = f"{name} ({self.backend.name} backend)"

    def count_prompt_tokens(self, messages: Messages) -> int:
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return len(encoded["input_ids"])

    def pieces(self, messages: Messages, settings: GenerationSettings) -> Iterator[str]:
        return self.backend.generate(self.loaded, messages, settings)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, samples: list) -> tuple[float, int]:
        """Summed token loss and target count of tokenized samples (test loss)."""
        return self.backend.score(self.loaded, samples)


class GGUFEngine:
    """A GGUF file run by llama.cpp (llama-cpp-python), with the file's own chat template."""

    def __init__(self, path: Path, n_ctx: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(
                "running a GGUF needs llama-cpp-python: pip install 'qwen-mlx[gguf]'"
            ) from None
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, seed=0)
        self.model_id = path.stem
        self.context_length = n_ctx
        self.description = f"{path.name} (llama.cpp)"

    def _prompt(self, messages: Messages) -> list[int]:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise UserError(f"{self.model_id}: the GGUF has no chat template")
        text = (
            ImmutableSandboxedEnvironment()
            .from_string(template)
            .render(messages=messages, add_generation_prompt=True)
        )
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_prompt_tokens(self, messages: Messages) -> int:
        return len(self._prompt(messages))

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def pieces(self, messages: Messages, settings: GenerationSettings) -> Iterator[str]:
        self.llm.reset()
        greedy = settings.temperature <= 0
        stream = self.llm.create_completion(
            self._prompt(messages), max_tokens=settings.max_tokens, stream=True,
            temperature=0.0 if greedy else settings.temperature,
            top_p=1.0 if greedy else settings.top_p, top_k=1 if greedy else 40,
        )  # fmt: skip
        for part in stream:
            text = part["choices"][0]["text"]
            if text:
                yield text

    def score(self, samples: list) -> tuple[float, int]:
        raise UserError("test loss needs the trained run; a GGUF is scored on its answers only")


def with_stops(pieces: Iterator[str], stops: list[str], hit: list[str]) -> Iterator[str]:
    """Pass text through until a stop string appears (recorded in ``hit``); text that may be
    the start of a stop string is held back until it is known not to be."""
    buffer, hold = "", max((len(s) for s in stops), default=1) - 1
    for piece in pieces:
        buffer += piece
        found = [(i, s) for s in stops if (i := buffer.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            hit.append(stop)
            if buffer[:cut]:
                yield buffer[:cut]
            close = getattr(pieces, "close", None)
            if close:  # tells the backend to stop generating
                close()
            return
        if len(buffer) > hold:
            yield buffer[: len(buffer) - hold]
            buffer = buffer[len(buffer) - hold :]
    if buffer:
        yield buffer


def stream(engine: Any, messages: Messages, settings: GenerationSettings) -> Iterator[Chunk]:
    """Generate a reply as chunks; the last chunk carries the finish reason."""
    hit: list[str] = []
    produced = []
    for text in with_stops(engine.pieces(messages, settings), settings.stop, hit):
        # A stray byte-level token that is not valid UTF-8 decodes to U+FFFD in transformers
        # and MLX but to nothing in llama.cpp; drop it so every engine gives the same text.
        text = text.replace("\ufffd", "")
        if text:
            produced.append(text)
            yield Chunk(text)
    ran_out = not hit and engine.count_tokens("".join(produced)) >= settings.max_tokens
    yield Chunk("", "length" if ran_out else "stop")


def complete(engine: Any, messages: Messages, settings: GenerationSettings) -> tuple[str, str]:
    """The whole reply and its finish reason."""
    chunks = list(stream(engine, messages, settings))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason or "stop"


def open_engine(
    run_or_adapter: Path | None = None,
    model: Path | None = None,
    gguf: Path | None = None,
    backend: str = "auto",
) -> Any:
    """The engine for a run/adapter folder, a plain model folder, or a GGUF file."""
    if gguf is not None:
        return GGUFEngine(Path(gguf))
    from qwen_mlx.adapters import resolve_source

    source = resolve_source(run_or_adapter, model)
    adapter_dir = source.adapter.path if source.adapter else None
    name = Path(run_or_adapter).name if run_or_adapter else source.model_dir.name
    return BackendEngine(backend, source.model_dir, adapter_dir, name)
