"""Continuous batching on llama.cpp: several sequences of a GGUF decoded together.

llama-cpp-python's high-level ``Llama`` (what :class:`~qwen_mlx.inference.GGUFEngine` answers
one prompt with) keeps a single sequence in its context: ``generate`` and ``eval`` take one
token list and clear every sequence's cache past it. llama.cpp itself decodes many sequences
in one call, and llama-cpp-python exposes that C API as it is, so this module is written
against it: a context of its own with ``n_seq_max`` sequences, one ``llama_batch`` a step
holding each decoding sequence's last token (joining ones' prompts are read in calls of
their own), each sequence's logits read with ``llama_get_logits_ith`` by a sampler chain of
its own, and a sequence's slot (its cache stream) given to the next one the moment it leaves,
with ``llama_memory_seq_rm`` dropping the cells the next one does not share.

Each sequence gets the engine's whole context: the batch's context has ``max_sequences ×
context_length`` cells, one stream of ``context_length`` per sequence (``kv_unified`` off, so a
sequence attends over its own cells only). That is the KV memory the batch costs, beside the
one-by-one context: ``2 × layers × KV heads × head dim × 2 bytes`` (an f16 cache) a cell, e.g.
12 KiB a token on Qwen2.5-0.5B, 384 MiB for 8 sequences of 4,096. The context is made when a
batch starts and freed :data:`IDLE_RELEASE_S` (5 minutes) after its last sequence leaves (at
once when the decoder is closed, as eval's batches do), so an idle server holds none; until
then its free slots keep the cells of the prompts they last read, for a next turn to reuse.

A sequence decoding alone is computed exactly as ``GGUFEngine.pieces`` computes it (the
high-level ``Llama``: the prompt in one call, then one token a call). Beside others, its
token shares a call with theirs: llama.cpp computes one token's matrix products as matrix ×
vector and several tokens' as matrix × matrix, whose sums round differently, and with the
activations and the cache rounded to f16 between layers a logit can differ by ~1e-3. So a
greedy reply in a batch is the one-by-one reply except where its two likeliest tokens are
that close, and a seeded sampled reply (the chain of ``Llama.generate``,
:func:`sampler_chain`) is the same except where a draw lands that close to a boundary. An
earlier version padded a lone token with a throwaway second one so that it always went
through the matrix × matrix kernels (replies then never depended on the batch), but a lone
step then cost 37 ms instead of 6.5 ms on the Qwen2.5-0.5B shape (q8_0, 2 cores): a single
client's tokens came 3–5× slower than one at a time.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Step, fitting

# How long serve's batch context outlives an empty batch. Its free slots keep the cells of
# the prompts they last read, so a chat's next turn (the same conversation, longer) reads only
# what is new, as llama-cpp-python's one-by-one Llama does; kept as long as ollama keeps a
# model loaded (its keep_alive, 5 minutes), then freed: an idle server holds none.
IDLE_RELEASE_S = 300.0


def supported() -> bool:
    """Whether this llama-cpp-python exposes what batching needs (its llama.cpp's memory
    API, mid 2025 on); an older one answers one prompt at a time."""
    import llama_cpp

    return all(hasattr(llama_cpp, name) for name in ("llama_get_memory", "llama_memory_seq_rm"))


def llama_sampling(settings: GenerationSettings) -> dict[str, Any]:
    """A request's settings as ``Llama.generate``'s sampling arguments: greedy at temperature
    0 (with the filters that would change nothing), else what was asked; min_p 0 unless asked
    (llama-cpp-python's default is 0.05)."""
    greedy = settings.temperature <= 0
    return {
        "temp": 0.0 if greedy else settings.temperature,
        "top_p": 1.0 if greedy else settings.top_p,
        "top_k": 1 if greedy else settings.top_k,  # 0: off, as everywhere else
        "min_p": 0.0 if greedy else settings.min_p,
        "repeat_penalty": settings.repetition_penalty,
        "presence_penalty": settings.presence_penalty,
        "frequency_penalty": settings.frequency_penalty,
    }


def draw_seed(settings: GenerationSettings) -> int:
    """The seed llama.cpp's draw starts from: the request's, else a fresh one."""
    return settings.seed if settings.seed is not None else secrets.randbits(31)


def sampler_chain(settings: GenerationSettings, n_vocab: int, penalty_last_n: int) -> Any:
    """A sequence's llama.cpp sampler chain, as ``Llama.generate`` builds its one from
    :func:`llama_sampling`: the penalties (over the tokens it samples), then greedy, or top-k,
    typical (off), top-p, min-p, temperature and a draw from :func:`draw_seed`. Free it with
    ``llama_sampler_free``."""
    import llama_cpp as llama

    s = llama_sampling(settings)
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    links = [
        llama.llama_sampler_init_penalties(
            n_vocab,
            penalty_last_n,
            s["repeat_penalty"],
            s["frequency_penalty"],
            s["presence_penalty"],
        )
    ]
    if s["temp"] == 0.0:
        links.append(llama.llama_sampler_init_greedy())
    else:
        links += [
            llama.llama_sampler_init_top_k(s["top_k"]),
            llama.llama_sampler_init_typical(1.0, 1),
            llama.llama_sampler_init_top_p(s["top_p"], 1),
            llama.llama_sampler_init_min_p(s["min_p"], 1),
            llama.llama_sampler_init_temp(s["temp"]),
            llama.llama_sampler_init_dist(draw_seed(settings)),
        ]
    for link in links:
        llama.llama_sampler_chain_add(chain, link)  # the chain owns it from here
    return chain


@dataclass
class _Sequence:
    """One sequence: its prompt, how much of it the cache holds, the token it feeds next,
    how many it has generated, its cache stream (``slot``, once it has one) and sampler."""

    seq: int
    prompt: list[int]
    settings: GenerationSettings
    slot: int = -1
    position: int = 0  # tokens in its cache stream
    fed: list[int] = field(default_factory=list)  # those tokens (the start of a later prompt?)
    last: int | None = None  # the token it feeds next, once its prompt is read
    count: int = 0
    chain: Any = field(default=None, repr=False)


class GGUFDecoder:
    """Continuous batching on llama.cpp (:class:`qwen_mlx.inference.Decoder`), up to
    ``max_sequences`` decoding at once; more wait for a slot, oldest first.

    A step is one ``llama_decode`` of the decoding sequences' last tokens, then the joining
    sequences' prompts, each in a call of its own, ``n_ubatch`` prompt tokens a step at most
    (a long prompt is read over several steps while the others go on decoding). Threads as
    llama.cpp sets them for the engine's context: ``n_threads`` for a call of one token,
    ``n_threads_batch`` for more (a step of several sequences is a batch: on 2 cores a step of
    8 sequences took 144 ms on one thread, 75 ms on two, on the Qwen2.5-0.5B shape).

    llama.cpp splits a call into micro-batches of consecutive sequence ids (with a stream per
    sequence), so the decoding sequences hold the lowest slots (the highest moves into a slot
    that frees, their cells swapped): a step is one micro-batch, the weights read once for
    all. Each sequence samples with its own chain and seed (:func:`sampler_chain`).

    A sequence that leaves keeps its cells (in the slot it ends in: the highest sequence takes
    its slot, their cells swapped), and a joining sequence takes the cells of the free slot
    that shares the longest start with its prompt (swapped into the slot it is seated in), so
    it reads only the rest: a conversation's next turn costs its new tokens, not the whole
    conversation again. Cells read in an earlier
    call round as that call did, so such a reply can part from a fresh read's at a near tie.
    """

    def __init__(self, engine: Any, max_sequences: int, idle_release_s: float = IDLE_RELEASE_S):
        if max_sequences < 1:
            raise ValueError("max_sequences must be at least 1")
        self.llm = engine.llm
        self.context_length = engine.context_length
        self.max_sequences = max_sequences
        self.decode = engine.decode
        self._prompt_budget = self.llm.context_params.n_ubatch  # prompt tokens a step
        # a call holds every decoding sequence's token, or a prompt chunk
        self._n_batch = max(self._prompt_budget, max_sequences)
        self._waiting: deque[_Sequence] = deque()  # joined, no slot yet
        self._active: dict[int, _Sequence] = {}  # by seq: holding a slot
        self._cached: dict[int, list[int]] = {}  # free slot -> the tokens its cells hold
        self._seqs = 0
        self._ctx: Any = None
        self._batch: Any = None
        self._idle_release_s = idle_release_s
        # The context is freed from a timer's thread: the lock keeps that off a running step.
        self._lock = threading.Lock()
        self._release_timer: threading.Timer | None = None

    def __len__(self) -> int:
        return len(self._waiting) + len(self._active)

    @property
    def cells(self) -> int:
        """The KV cells its context holds now (0 while none is: no batch running)."""
        import llama_cpp as llama

        return 0 if self._ctx is None else llama.llama_n_ctx(self._ctx)

    def join(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        fitting(prompt_ids, self.context_length, settings.max_tokens)
        with self._lock:
            self._seqs += 1
            self._waiting.append(_Sequence(self._seqs, list(prompt_ids), settings))
            return self._seqs

    def leave(self, seq: int) -> None:
        with self._lock:
            self._waiting = deque(s for s in self._waiting if s.seq != seq)
            if seq in self._active:
                self._release(self._active[seq])
            self._release_later()

    def step(self) -> list[Step]:
        with self._lock:
            if not self._waiting and not self._active:
                return []
            self._open()
            self._seat_waiting()
            steps = self._decode_step()
            self._seat_waiting()
            steps += self._read_prompts()
            self._release_later()
            return steps

    def close(self) -> None:
        """Drop every sequence and free the context now."""
        with self._lock:
            for sequence in list(self._active.values()):
                self._release(sequence)
            self._waiting.clear()
            self._free_context()

    def __del__(self) -> None:
        with suppress(Exception):  # interpreter shutdown: llama.cpp may be gone already
            self.close()

    # ------------------------------------------------------------------ the steps

    def _seat_waiting(self) -> None:
        while self._waiting and len(self._active) < self.max_sequences:
            # the active sequences hold the lowest slots: the next one free is theirs + 1
            self._seat(self._waiting.popleft(), len(self._active))

    def _seat(self, sequence: _Sequence, slot: int) -> None:
        """Give ``sequence`` ``slot``, with the cached cells that share the longest start with
        its prompt (its last prompt token is always read: its logits give the first token)."""
        import llama_cpp as llama

        best, shared = slot, 0
        for cached, tokens in self._cached.items():
            if (n := _shared_start(tokens, sequence.prompt)) > shared:
                best, shared = cached, n
        shared = min(shared, len(sequence.prompt) - 1)
        if shared and best != slot:  # those cells move to its slot; that slot's cache to theirs
            self._swap_cells(best, slot)
            del self._cached[best]
            if slot in self._cached:
                self._cached[best] = self._cached[slot]
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), slot, shared, -1)
        self._cached.pop(slot, None)  # the slot is a sequence's now, no longer a cache
        sequence.slot, sequence.position = slot, shared
        sequence.fed = sequence.prompt[:shared]
        # Penalties look back over the whole context, as GGUFEngine's Llama does.
        sequence.chain = sampler_chain(sequence.settings, self.llm.n_vocab(), self.context_length)
        self._active[sequence.seq] = sequence

    def _decode_step(self) -> list[Step]:
        """One token of every sequence whose prompt has been read, in one call."""
        decoding = sorted(
            (s for s in self._active.values() if s.last is not None), key=lambda s: s.slot
        )
        if not decoding:
            return []
        self._batch.n_tokens = 0
        outputs = [(s, self._put(s.last, s, logits=True)) for s in decoding]
        self._run()
        return [self._sample(sequence, index) for sequence, index in outputs]

    def _read_prompts(self) -> list[Step]:
        """The next prompt tokens of the sequences reading theirs, oldest first, each in a
        call of its own; the first token of each whose prompt is now read."""
        steps, budget = [], self._prompt_budget
        reading = sorted((s for s in self._active.values() if s.last is None), key=_by_seq)
        for sequence in reading:
            if budget <= 0:
                break
            part = sequence.prompt[sequence.position :][:budget]
            budget -= len(part)
            done = sequence.position + len(part) == len(sequence.prompt)
            self._batch.n_tokens = 0
            for i, token in enumerate(part):
                index = self._put(token, sequence, logits=done and i == len(part) - 1)
            self._run()
            if done:
                steps.append(self._sample(sequence, index))
        return steps

    def _put(self, token: int, sequence: _Sequence, logits: bool) -> int:
        """Add a token of ``sequence`` at its next position; its index in the batch."""
        batch = self._batch
        n = batch.n_tokens
        batch.token[n] = token
        batch.pos[n] = sequence.position
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = sequence.slot
        batch.logits[n] = logits
        batch.n_tokens = n + 1
        sequence.position += 1
        sequence.fed.append(token)
        return n

    def _run(self) -> None:
        import llama_cpp as llama

        status = llama.llama_decode(self._ctx, self._batch)
        if status != 0:  # 1: no room in the cache (cannot happen: each has its stream)
            raise RuntimeError(f"llama.cpp could not decode the batch (llama_decode: {status})")

    def _sample(self, sequence: _Sequence, index: int) -> Step:
        import llama_cpp as llama

        token = llama.llama_sampler_sample(sequence.chain, self._ctx, index)
        sequence.count += 1
        vocab = llama.llama_model_get_vocab(self.llm.model)
        if llama.llama_vocab_is_eog(vocab, token):
            self._release(sequence)
            return Step(sequence.seq, None, True)
        if sequence.count >= sequence.settings.max_tokens:
            self._release(sequence)
            return Step(sequence.seq, token, True)
        sequence.last = token
        return Step(sequence.seq, token, False)

    # ------------------------------------------------------------------ the context

    def _release(self, sequence: _Sequence) -> None:
        """A sequence leaves: its sampler is freed, and the sequence in the highest slot moves
        into its slot (the slots stay the lowest ones, their cells swapped); its cells stay in
        the slot it ends in, a cache for a later prompt that starts the same way."""
        import llama_cpp as llama

        del self._active[sequence.seq]
        llama.llama_sampler_free(sequence.chain)
        if self._ctx is None:
            return
        highest = max(self._active.values(), key=lambda s: s.slot, default=None)
        if highest is not None and highest.slot > sequence.slot:
            self._swap_cells(sequence.slot, highest.slot)
            sequence.slot, highest.slot = highest.slot, sequence.slot
        if sequence.fed:
            self._cached[sequence.slot] = sequence.fed

    def _swap_cells(self, a: int, b: int) -> None:
        """Swap the cache cells of two slots (llama.cpp's per-sequence state, through host
        memory: a few MB per thousand cells on a small model)."""
        cells_a, cells_b = self._cells(a), self._cells(b)
        self._put_cells(a, cells_b)
        self._put_cells(b, cells_a)

    def _cells(self, slot: int) -> Any:
        """A slot's cells as llama.cpp's sequence state; None when it holds none."""
        import ctypes

        import llama_cpp as llama

        if llama.llama_memory_seq_pos_max(llama.llama_get_memory(self._ctx), slot) < 0:
            return None
        size = llama.llama_state_seq_get_size(self._ctx, slot)
        data = (ctypes.c_uint8 * size)()
        llama.llama_state_seq_get_data(self._ctx, data, size, slot)
        return data

    def _put_cells(self, slot: int, data: Any) -> None:
        import llama_cpp as llama

        self._clear(slot)
        if data is None:  # an empty slot's: nothing to put
            return
        if llama.llama_state_seq_set_data(self._ctx, data, len(data), slot) == 0:
            raise RuntimeError("llama.cpp could not move a sequence's cache to a free slot")

    def _clear(self, slot: int) -> None:
        import llama_cpp as llama

        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), slot, -1, -1)

    def _open(self) -> None:
        """The batch's context, made on the first step after it was freed."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._ctx is not None:
            return
        import llama_cpp as llama

        params = llama.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max = self.max_sequences
        params.n_ctx = self.max_sequences * self.context_length
        params.n_batch = params.n_ubatch = self._n_batch  # a call is one micro-batch
        if hasattr(params, "kv_unified"):
            params.kv_unified = False  # a stream per sequence: it attends over its own cells
        ctx = llama.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError(
                f"llama.cpp could not make a context for {self.max_sequences} sequences of "
                f"{self.context_length} tokens (out of memory?); lower --max-concurrent"
            )
        self._ctx = ctx
        self._batch = llama.llama_batch_init(self._n_batch, 0, 1)

    def _release_later(self) -> None:
        """Free the context ``idle_release_s`` after the batch empties, unless a step runs
        again before then."""
        if len(self) or self._ctx is None or self._release_timer is not None:
            return
        if self._idle_release_s <= 0:
            self._free_context()
            return
        self._release_timer = threading.Timer(self._idle_release_s, self._release_if_idle)
        self._release_timer.daemon = True
        self._release_timer.start()

    def _release_if_idle(self) -> None:
        with self._lock:
            self._release_timer = None
            if not len(self):
                self._free_context()

    def _free_context(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._ctx is None:
            return
        import llama_cpp as llama

        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        self._ctx = self._batch = None
        self._cached.clear()


def _by_seq(sequence: _Sequence) -> int:
    return sequence.seq


def _shared_start(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def generate_all(decoder: Any, prompts: list[list[int]], settings: GenerationSettings):
    """Every prompt's generated tokens (not the end of turn), decoded together by
    ``decoder`` until all have ended."""
    seqs = [decoder.join(prompt, settings) for prompt in prompts]
    tokens: dict[int, list[int]] = {seq: [] for seq in seqs}
    try:
        while len(decoder):
            for step in decoder.step():
                if step.token is not None:
                    tokens[step.seq].append(step.token)
    finally:
        decoder.close()
    return [tokens[seq] for seq in seqs]
