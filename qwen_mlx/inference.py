"""One interface for using a model: a trained run through its backend, or a GGUF file.

``eval``, ``chat`` and ``serve`` all talk to an :class:`Engine`. ``open_engine`` finds the
base model and adapter behind a run folder (or takes ``--model`` / ``--gguf``) and asks the
chosen backend (``auto`` as for training) for its engine (``backends/mlx_engine.py``,
``backends/torch_engine.py``, both built on :class:`HFEngine`), or loads a GGUF with
llama.cpp. Prompts are encoded through :mod:`qwen_mlx.chat_template` (message text stays
text); stop strings (:func:`with_stops`), token counts and finish reasons are applied here,
the same way for every engine.

Several prompts are answered together where the engine can (:func:`complete_batch`,
:func:`answer_all`: the torch, MLX and llama.cpp engines' ``pieces_batch``); each sequence
still stops at its own end of turn, ``max_tokens`` or stop string, and greedy answers are the
one-by-one answers token for token. An engine without ``pieces_batch`` (a test fake, an old
llama-cpp-python) answers one by one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from qwen_mlx.backends import get_backend
from qwen_mlx.backends.base import GenerationSettings, token_texts
from qwen_mlx.chat_template import (
    PromptTooLong,
    encode_pieces,
    for_template,
    hf_prompt_ids,
    hf_text,
    template_pieces,
)
from qwen_mlx.errors import UserError
from qwen_mlx.families import Family, by_gguf_arch

Messages = list[dict[str, str]]


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    completion_tokens: int = 0  # on the last chunk: how many tokens were generated


class Completion(NamedTuple):
    """A whole reply: its text, why it ended ("stop" or "length") and its token count."""

    text: str
    finish_reason: str
    completion_tokens: int


# Sequences answered together when the caller does not say (eval's --batch-size): decoding
# on a Mac or a GPU is bound by memory bandwidth, so 8 cost little more than 1; the memory
# estimate (:func:`fitting_batch_size`) lowers it where a big model leaves little room.
DEFAULT_BATCH_SIZE = 8


def room(context_length: int, max_tokens: int) -> int:
    """How many prompt tokens fit in the context beside ``max_tokens`` of reply."""
    if max_tokens >= context_length:
        raise UserError(
            f"max_tokens={max_tokens} does not fit in the model's context of "
            f"{context_length} tokens; lower it"
        )
    return context_length - max_tokens


def fitting(ids: list[int], context_length: int, max_tokens: int) -> list[int]:
    """``ids``, or :class:`PromptTooLong` when they leave no room for ``max_tokens``."""
    limit = room(context_length, max_tokens)
    if len(ids) > limit:
        raise PromptTooLong(len(ids), limit)
    return ids


class Engine(Protocol):
    """A loaded model that answers conversations: what ``eval``, ``chat`` and ``serve`` use."""

    model_id: str  # the name clients see (the run folder's, or the model's)
    description: str  # what it is, for the user: "run (torch backend)", "x.gguf (llama.cpp)"
    context_length: int
    family: Family  # the model's family: its stop tokens and think tags
    # The template's enable_thinking for every prompt (a run's chat.enable_thinking); None
    # lets the template decide (a GGUF's own, which our export sets as the run was tuned).
    thinking: bool | None
    tokenizer: Any | None  # the Hugging Face tokenizer (None for a GGUF: no test loss then)
    has_adapter: bool  # whether adapter_disabled() answers as a different (the base) model

    def name(self, model_id: str) -> None:
        """Name the engine for clients (``model_id``) and for the user (``description``)."""
        ...

    def adapter_disabled(self) -> AbstractContextManager[None]:
        """Inside, the engine answers as its base model (no change without an adapter)."""
        ...

    def prompt_ids(
        self, messages: Messages, max_tokens: int, thinking: bool | None = None
    ) -> list[int]:
        """The prompt's token ids; :class:`PromptTooLong` when it leaves no room to reply.
        ``thinking``: this prompt's enable_thinking (a request's), None: the engine's."""
        ...

    def text_ids(self, text: str, max_tokens: int) -> list[int]:
        """The ids of plain prompt text (no chat template; control-token strings in it
        stay text); :class:`PromptTooLong` when it leaves no room to reply."""
        ...

    def pieces(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[str]:
        """One text piece per generated token, up to the end of the turn or
        ``settings.max_tokens``; closing the iterator stops generation."""
        ...

    def score(self, samples: list) -> tuple[float, int]:
        """Summed token loss and target count of tokenized samples (test loss)."""
        ...

    def target_logits(self, sample: Any) -> Any:
        """float32 logits (numpy, targets × vocabulary) where a tokenized sample's targets
        are predicted, teacher-forced (eval's general drift)."""
        ...

    # Optional; without it :func:`complete_batch` answers one by one (test fakes):
    # def pieces_batch(self, prompts: list[list[int]], settings) -> list[list[str]]:
    #     """``pieces`` of several prompts generated together, each up to its own end of
    #     the turn or ``settings.max_tokens``; greedy, the one-by-one pieces exactly."""
    # Optional; without it ``serve`` answers one request at a time (test fakes):
    # def decoder(self) -> Decoder:
    #     """A new :class:`Decoder`: continuous batching over this engine's model."""


class HFEngine:
    """What the backends' engines share: the model folder's tokenizer (loaded once, as
    training loads it), the tokens a reply ends at, the context length, and prompts."""

    backend_name = ""
    thinking: bool | None = False  # enable_thinking: open_engine sets chat.enable_thinking
    has_adapter = False  # the backends' engines set it when they load one
    value_bytes = 2  # bytes per weight and cached value (bf16/fp16; torch on CPU: fp32)

    def __init__(self, model_dir: Path):
        from qwen_mlx.families import family_of
        from qwen_mlx.model_files import read_model_config
        from qwen_mlx.tokens import load_tokenizer

        config = read_model_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.family = family_of(config, model_dir)
        self.end_ids = end_token_ids(self.tokenizer, self.family, model_dir)
        self.context_length = int(config.get("max_position_embeddings", 32768))
        self.config = config  # for the memory a batch of answers needs
        self.name(model_dir.name)

    def name(self, model_id: str) -> None:
        self.model_id = model_id
        self.description = f"{model_id} ({self.backend_name} backend)"

    def adapter_disabled(self) -> AbstractContextManager[None]:
        return nullcontext()  # no adapter: the base already

    def prompt_ids(
        self, messages: Messages, max_tokens: int, thinking: bool | None = None
    ) -> list[int]:
        """The prompt's token ids; :class:`PromptTooLong` when it leaves no room to reply."""
        limit = room(self.context_length, max_tokens)
        thinking = self.thinking if thinking is None else thinking
        return hf_prompt_ids(self.tokenizer, messages, limit, thinking)

    def text_ids(self, text: str, max_tokens: int) -> list[int]:
        """Plain prompt text's ids (control-token strings in it stay text)."""
        return fitting(hf_text(self.tokenizer, text)["input_ids"], self.context_length, max_tokens)


def end_token_ids(tokenizer: Any, family: Any, model_dir: Path) -> set[int]:
    """The tokens a reply ends at: the family's stop tokens (even where no config names
    them) and the ``eos_token_id`` of config.json and generation_config.json."""
    import json

    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in family.stop_tokens if token in vocab}
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text("utf-8")).get("eos_token_id") if path.is_file() else None
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return ids


class GGUFEngine:
    """A GGUF file run by llama.cpp (llama-cpp-python), with the file's own chat template.

    One prompt at a time (``pieces``: chat, ``serve --max-concurrent 1``) goes through
    llama-cpp-python's high-level ``Llama``, which keeps one sequence and reuses its cached
    prompt prefix. Several together (``pieces_batch``: eval's batches; ``decoder``: serve's
    continuous batching) go through :class:`~qwen_mlx.gguf_decoder.GGUFDecoder`, llama.cpp's
    multi-sequence batch in a context of its own, up to ``max_sequences`` at once (serve sets
    it to ``--max-concurrent``), each with the whole ``context_length``; serve's keeps the
    prompts it read for a later turn to reuse, and is freed when idle. A sequence decoding
    alone is computed as one by one; beside others, llama.cpp's several-token kernels round
    differently (up to ~1e-3 of a logit on an f16 file), so greedy replies agree except at a
    near tie, and a seeded reply can part where a draw lands that close to a boundary (see
    :mod:`qwen_mlx.gguf_decoder`).
    """

    # Qwen3's enable_thinking, as for HFEngine; None: the GGUF's own template decides (our
    # export makes it default to how the run was tuned).
    thinking: bool | None = None
    tokenizer = None  # llama.cpp tokenizes; no test loss on a GGUF
    has_adapter = False  # a fused file: its base is another GGUF (serve --base-gguf)
    max_sequences = DEFAULT_BATCH_SIZE  # serve's batch bound (sizes its KV cache): serve sets it

    def __init__(self, path: Path, n_ctx: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(
                "running a GGUF needs llama-cpp-python: pip install 'qwen-mlx[gguf]'"
            ) from None
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        try:
            # Penalties look back over the whole context (llama-cpp-python's default: 64).
            self.llm = Llama(
                model_path=str(path), n_ctx=n_ctx, verbose=False, last_n_tokens_size=n_ctx
            )
        except ValueError as err:  # llama.cpp says only "Failed to load model from file"
            raise UserError(
                f"{path}: llama.cpp cannot load this file ({err}); is it a complete GGUF model? "
                "(`qwen-mlx export` writes one)"
            ) from None
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        if not self.template:
            raise UserError(f"{path}: the GGUF has no chat template (tokenizer.chat_template)")
        self.controls = _llama_controls(self.llm)
        self.family = by_gguf_arch(self.llm.metadata.get("general.architecture", ""))
        self.context_length = n_ctx
        self.file_name = path.name
        self.name(path.stem)
        from qwen_mlx.gguf_decoder import supported

        if not supported():  # an old llama-cpp-python: one prompt at a time
            self.pieces_batch = self.decoder = None

    def name(self, model_id: str) -> None:
        self.model_id = model_id
        self.description = f"{self.file_name} (llama.cpp)"

    def adapter_disabled(self) -> AbstractContextManager[None]:
        return nullcontext()

    def _render(self, messages: Messages, thinking: bool | None = None) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment().from_string(self.template)
        thinking = self.thinking if thinking is None else thinking
        said = {} if thinking is None else {"enable_thinking": thinking}
        return template.render(messages=messages, add_generation_prompt=True, **said)

    def _text_ids(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def text_ids(self, text: str, max_tokens: int) -> list[int]:
        """Plain prompt text's ids (control-token strings in it stay text)."""
        return fitting(self._text_ids(text), self.context_length, max_tokens)

    def prompt_ids(
        self, messages: Messages, max_tokens: int, thinking: bool | None = None
    ) -> list[int]:
        """The prompt's token ids; :class:`PromptTooLong` when it leaves no room to reply."""
        messages = for_template(messages, self.family, self.template)
        render = partial(self._render, thinking=thinking)
        pieces = template_pieces(render, messages, self.controls)
        limit = room(self.context_length, max_tokens)
        return encode_pieces(pieces, self._text_ids, self.controls.__getitem__, limit)

    def decode(self, ids: list[int]) -> str:
        """The text of tokens (control tokens dropped)."""
        return _llama_text(self.llm, ids)

    def pieces(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[str]:
        from qwen_mlx.gguf_decoder import draw_seed, llama_sampling

        # llama.cpp's sampler chain draws from the seed set here (a fresh one without a seed)
        self.llm.set_seed(draw_seed(settings))
        tokens = self.llm.generate(prompt_ids, **llama_sampling(settings))
        with closing(tokens):
            yield from token_texts(self._until_end(tokens, settings.max_tokens), self.decode)

    def pieces_batch(
        self, prompts: list[list[int]], settings: GenerationSettings
    ) -> list[list[str]]:
        """The pieces of several prompts' replies, decoded together (the caller's batch:
        eval's ``--batch-size``)."""
        from qwen_mlx.gguf_decoder import generate_all

        tokens = generate_all(self.decoder(len(prompts)), prompts, settings)
        return [list(token_texts(ids, self.decode)) for ids in tokens]

    def decoder(self, max_sequences: int | None = None) -> Any:
        """Continuous batching over this model (``serve``): a
        :class:`~qwen_mlx.gguf_decoder.GGUFDecoder` of ``max_sequences`` (None: the engine's)."""
        from qwen_mlx.gguf_decoder import GGUFDecoder

        return GGUFDecoder(self, max_sequences or self.max_sequences)

    def _until_end(self, tokens: Iterator[int], max_tokens: int) -> Iterator[int]:
        """Tokens up to the end of the turn, at most ``max_tokens`` of them (llama.cpp's
        generator would go on forever)."""
        from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

        vocab = llama_model_get_vocab(self.llm.model)
        for count, token in enumerate(tokens, start=1):
            if llama_vocab_is_eog(vocab, token):
                return
            yield token
            if count >= max_tokens:
                return

    def score(self, samples: list) -> tuple[float, int]:
        raise UserError("test loss needs the trained run; a GGUF is scored on its answers only")

    def target_logits(self, sample: Any) -> Any:
        raise UserError("drift needs the trained run; a GGUF has no adapter to switch off")


def _llama_text(llm: Any, ids: list[int]) -> str:
    return llm.detokenize(ids).decode("utf-8", errors="replace")


def _llama_controls(llm: Any) -> dict[str, int]:
    """The GGUF's control tokens (``<|im_end|>`` …) by text."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    controls = {}
    for token in range(llm.n_vocab()):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            controls[llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8")] = token
    return controls


class StopText:
    """A reply's text as its pieces arrive, cut at the first stop string (then ``hit`` names
    it): text that may be the start of a stop string is held back until it is known not to
    be. The push form, for replies decoded together; :func:`with_stops` pulls."""

    def __init__(self, stops: list[str]):
        self.stops, self.hit = stops, None
        self._buffer, self._hold = "", max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        """The text now known to be the reply's ("" while held back or after a stop)."""
        if self.hit is not None:
            return ""
        self._buffer += piece
        found = [(i, s) for s in self.stops if (i := self._buffer.find(s)) >= 0]
        if found:
            cut, self.hit = min(found)
            text, self._buffer = self._buffer[:cut], ""
            return text
        if len(self._buffer) <= self._hold:
            return ""
        keep = len(self._buffer) - self._hold
        text, self._buffer = self._buffer[:keep], self._buffer[keep:]
        return text

    def flush(self) -> str:
        """The text held back, once the reply has ended without a stop string."""
        text, self._buffer = self._buffer, ""
        return text


def with_stops(pieces: Iterator[str], stops: list[str], hit: list[str]) -> Iterator[str]:
    """Pass text through until a stop string appears (recorded in ``hit``); text that may be
    the start of a stop string is held back until it is known not to be."""
    text = StopText(stops)
    for piece in pieces:
        if out := text.feed(piece):
            yield out
        if text.hit is not None:
            hit.append(text.hit)
            return
    if rest := text.flush():
        yield rest


def stream(
    engine: Engine,
    prompt_ids: list[int],
    settings: GenerationSettings,
    cancel: threading.Event | None = None,
) -> Iterator[Chunk]:
    """Generate a reply as chunks; the last chunk carries the finish reason and the number
    of generated tokens. Setting ``cancel`` stops generation at the next token (no last
    chunk then)."""
    return _chunks(engine.pieces(prompt_ids, settings), settings, cancel)


def _chunks(
    pieces: Iterator[str], settings: GenerationSettings, cancel: threading.Event | None = None
) -> Iterator[Chunk]:
    """:func:`stream`'s chunks of a reply's text pieces (a generator, closed when done)."""
    hit: list[str] = []
    counted = [0]

    def tokens(pieces: Iterator[str]) -> Iterator[str]:
        for piece in pieces:
            counted[0] += 1
            if cancel is not None and cancel.is_set():
                return
            yield piece

    with closing(pieces):
        for text in with_stops(tokens(pieces), settings.stop, hit):
            # A stray byte-level token that is not valid UTF-8 decodes to U+FFFD; dropping it
            # gives every engine the same text.
            text = text.replace("\ufffd", "")
            if text:
                yield Chunk(text)
    if cancel is not None and cancel.is_set():
        return
    ran_out = not hit and counted[0] >= settings.max_tokens
    yield Chunk("", "length" if ran_out else "stop", counted[0])


class Step(NamedTuple):
    """What a :class:`Decoder` step did for one sequence: the token it generated (None when
    the sequence ended its turn) and whether the sequence has left the batch (its end of
    turn or ``max_tokens``)."""

    seq: int
    token: int | None
    done: bool


class Decoder(Protocol):
    """Continuous batching on one engine (``engine.decoder()``): sequences join between
    steps and leave when done or when told to; each step decodes one token of every
    sequence together. Greedy, each sequence's tokens are its one-by-one tokens. Used from
    one thread only (the thread that made it)."""

    def decode(self, ids: list[int]) -> str:
        """The text of a sequence's tokens (special tokens dropped)."""
        ...

    def join(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        """Add a sequence; its prompt is read at the next step. Returns its id."""
        ...

    def leave(self, seq: int) -> None:
        """Drop a sequence now (its client went, or a stop string ended it)."""
        ...

    def step(self) -> list[Step]:
        """Read the prompts of sequences that joined, decode one token of the others."""
        ...

    def __len__(self) -> int:
        """Sequences in the batch (joined and not left)."""
        ...


def _pushed_pieces(decode) -> Any:
    """``token_texts`` fed one token at a time: call the result with a token, get its piece
    (it yields one piece per token, so each call pulls exactly the token given)."""
    box: list[int] = []
    pieces = token_texts(iter(box.pop, None), decode)

    def piece(token: int) -> str:
        box.append(token)
        return next(pieces)

    return piece


class ReplyChunks:
    """One reply's :class:`Chunk` s as its tokens arrive from a :class:`Decoder`: the same
    text, stop strings, token count and finish reason as :func:`stream` gives one by one."""

    def __init__(self, settings: GenerationSettings, decode):
        self.max_tokens = settings.max_tokens
        self._piece = _pushed_pieces(decode)
        self._text = StopText(settings.stop)
        self.count = 0
        self.stopped = False  # a stop string ended it: the decoder should drop it

    def token(self, token: int) -> list[Chunk]:
        self.count += 1
        chunks = _text_chunk(self._text.feed(self._piece(token)))
        if self._text.hit is not None:
            self.stopped = True
            chunks.append(Chunk("", "stop", self.count))
        return chunks

    def end(self) -> list[Chunk]:
        """The model ended the reply (its end of turn, or ``max_tokens``)."""
        reason = "length" if self.count >= self.max_tokens else "stop"
        return [*_text_chunk(self._text.flush()), Chunk("", reason, self.count)]


def _text_chunk(text: str) -> list[Chunk]:
    # A stray byte-level token that is not valid UTF-8 decodes to U+FFFD (as in _chunks).
    text = text.replace("\ufffd", "")
    return [Chunk(text)] if text else []


def _completion(chunks: Iterator[Chunk]) -> Completion:
    chunks = list(chunks)
    last = chunks[-1]
    return Completion(
        "".join(c.text for c in chunks), last.finish_reason or "stop", last.completion_tokens
    )


def complete_batch(
    engine: Engine, prompts: list[list[int]], settings: GenerationSettings
) -> list[Completion]:
    """The replies to several prompts (``engine.prompt_ids``), generated together where the
    engine batches (``pieces_batch``), else one by one; stop strings, token counts and finish
    reasons as :func:`stream` gives them."""
    batched = getattr(engine, "pieces_batch", None)
    if batched is None or len(prompts) < 2:
        return [_completion(stream(engine, ids, settings)) for ids in prompts]
    return [
        _completion(_chunks((p for p in pieces), settings)) for pieces in batched(prompts, settings)
    ]


def answer_all(
    engine: Engine,
    conversations: list[Messages],
    settings: GenerationSettings,
    batch_size: int | None = None,
) -> Iterator[tuple[int, Completion]]:
    """The reply to each conversation as (its index, :class:`Completion`), as they come: by
    batches of ``batch_size`` (None: :func:`fitting_batch_size`), shortest prompts first so a
    batch pads little, where the engine batches; else one by one, in order."""
    if getattr(engine, "pieces_batch", None) is None or batch_size == 1:
        for i, messages in enumerate(conversations):
            ids = engine.prompt_ids(messages, settings.max_tokens)
            yield i, complete_batch(engine, [ids], settings)[0]
        return
    prompts = [engine.prompt_ids(m, settings.max_tokens) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    longest = max((len(p) for p in prompts), default=0) + settings.max_tokens
    size = batch_size or fitting_batch_size(engine, longest)
    for start in range(0, len(order), size):
        part = order[start : start + size]
        done = complete_batch(engine, [prompts[i] for i in part], settings)
        yield from zip(part, done, strict=True)


def fitting_batch_size(engine: Engine, tokens: int, limit: int = DEFAULT_BATCH_SIZE) -> int:
    """How many sequences of ``tokens`` tokens to generate together: ``limit``, fewer where
    the memory estimate says a batch would not fit beside the weights in 80% of this
    machine's memory (each sequence needs its KV cache and its prompt's activations)."""
    from qwen_mlx.memory import system_memory

    config, memory = getattr(engine, "config", None), system_memory()
    if not config or not memory:
        return limit
    size = getattr(engine, "value_bytes", 2)
    weights = generation_memory(config, 0, tokens, size)
    per_sequence = generation_memory(config, 1, tokens, size) - weights
    spare = 0.8 * memory - weights
    return max(1, min(limit, int(spare // per_sequence)))


def generation_memory(config: dict, sequences: int, tokens: int, value_bytes: int) -> int:
    """The memory estimate of generating ``sequences`` sequences of ``tokens`` tokens (prompt
    and reply) together: the weights, and each sequence's KV cache and its prompt's
    activations, at ``value_bytes`` a value."""
    from qwen_mlx.memory import parameter_count

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim
    activations = 4 * config["hidden_size"] + 3 * config["intermediate_size"]
    per_sequence = tokens * (kv + activations) * value_bytes
    return parameter_count(config) * value_bytes + sequences * per_sequence


def ask(engine: Engine, messages: Messages, settings: GenerationSettings) -> Iterator[Chunk]:
    """The reply to a conversation, as :func:`stream` chunks."""
    return stream(engine, engine.prompt_ids(messages, settings.max_tokens), settings)


def complete(engine: Engine, messages: Messages, settings: GenerationSettings) -> tuple[str, str]:
    """The whole reply and its finish reason."""
    text, reason, _ = _completion(ask(engine, messages, settings))
    return text, reason


def open_engine(
    run_or_adapter: Path | None = None,
    model: Path | None = None,
    gguf: Path | None = None,
    backend: str = "auto",
) -> Engine:
    """The engine for a run/adapter folder, a plain model folder, or a GGUF file."""
    if gguf is not None:
        return GGUFEngine(Path(gguf))
    from qwen_mlx.adapters import resolve_source

    source = resolve_source(run_or_adapter, model)
    adapter_dir = source.adapter.path if source.adapter else None
    engine = get_backend(backend).engine(source.model_dir, adapter_dir)
    engine.thinking = source.thinking
    engine.name(Path(run_or_adapter).name if run_or_adapter else source.model_dir.name)
    return engine
