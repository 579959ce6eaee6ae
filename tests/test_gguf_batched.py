"""Batched generation on a GGUF (llama.cpp's multi-sequence batch): the one-by-one replies.

The tiny Qwen2 and Qwen3 (thinking on and off) exported to f16 GGUFs answer prompts of very
different lengths through :class:`~qwen_mlx.gguf_decoder.GGUFDecoder` (eval's ``pieces_batch``
and ``answer_all``, serve's continuous batching) and one by one through llama-cpp-python's
``Llama``: greedy, token for token the same, with sequences joining a running batch, each
leaving at its own end of turn, ``max_tokens`` or stop string, more sequences over time than
the batch has slots (a slot that frees is reused at once), and a seeded sampled reply the
same whatever else is in the batch.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

pytest.importorskip("llama_cpp")

from test_batched import CONVERSATIONS as SHORTER

from qwen_mlx.backends.base import GenerationSettings, token_texts
from qwen_mlx.chat_template import PromptTooLong
from qwen_mlx.gguf_decoder import IDLE_RELEASE_S, GGUFDecoder, generate_all
from qwen_mlx.inference import Completion, answer_all, complete_batch

MAX_TOKENS = 24
GREEDY = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
CASES = [("qwen2", None), ("qwen3", False), ("qwen3", True)]
CASE_IDS = ["qwen2", "qwen3", "qwen3-think"]
# and one longer than a step's prompt tokens (n_ubatch, 512): read over two steps
CONVERSATIONS = [*SHORTER, [{"role": "user", "content": "报销需要哪些发票和审批单？" * 150}]]


@pytest.fixture(scope="module")
def ggufs(tiny_models, tmp_path_factory):
    """arch -> that tiny model's f16 GGUF engine (each exported and loaded once)."""
    from qwen_mlx.export.gguf import export
    from qwen_mlx.inference import GGUFEngine

    root = tmp_path_factory.mktemp("gguf-batched")

    @functools.cache
    def engine(arch: str) -> GGUFEngine:
        out = export(None, root / f"{arch}.gguf", model=tiny_models(arch), quant="f16")
        return GGUFEngine(out.path)

    return engine


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _engine(ggufs, arch: str, thinking: bool | None):
    engine = ggufs(arch)
    engine.thinking = thinking
    engine.max_sequences = 8
    return engine


def _alone(engine, prompt: list[int], settings: GenerationSettings) -> list[str]:
    return list(engine.pieces(prompt, settings))


def _one_by_one(engine, prompts, settings) -> list[Completion]:
    return [complete_batch(engine, [ids], settings)[0] for ids in prompts]


def _decoded(decoder, joins: list[tuple[int, list[int], GenerationSettings]]) -> list[list[int]]:
    """Each join's tokens: ``(step, prompt, settings)`` joins the decoder before that step
    (counting from 0), so later ones join a running batch."""
    seqs, tokens, step = [], {}, 0
    waiting = sorted(joins, key=lambda j: j[0])
    while waiting or len(decoder):
        while waiting and waiting[0][0] <= step:
            _, prompt, settings = waiting.pop(0)
            seq = decoder.join(prompt, settings)
            seqs.append(seq)
            tokens[seq] = []
        for done in decoder.step():
            if done.token is not None:
                tokens[done.seq].append(done.token)
        step += 1
    return [tokens[seq] for seq in seqs]


@pytest.mark.parametrize(("arch", "thinking"), CASES, ids=CASE_IDS)
def test_batched_greedy_replies_are_the_one_by_one_replies(arch, thinking, ggufs):
    engine = _engine(ggufs, arch, thinking)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-1] > 8 * lengths[0] and lengths[-1] > engine.llm.context_params.n_ubatch
    one = [_alone(engine, p, GREEDY) for p in prompts]
    assert len({"".join(pieces) for pieces in one}) == len(prompts)  # not trivial replies
    assert engine.pieces_batch(prompts, GREEDY) == one  # token for token (a piece each)
    # fewer slots than prompts: each next one takes a slot as one frees
    two = generate_all(engine.decoder(2), prompts, GREEDY)
    assert [list(token_texts(ids, engine.decode)) for ids in two] == one
    assert complete_batch(engine, prompts, GREEDY) == _one_by_one(engine, prompts, GREEDY)
    # eval's path: batches of 8 give what batches of 1 give, in the callers' order
    eights = dict(answer_all(engine, CONVERSATIONS, GREEDY, batch_size=8))
    ones = dict(answer_all(engine, CONVERSATIONS, GREEDY, batch_size=1))
    assert [eights[i] for i in range(len(prompts))] == [ones[i] for i in range(len(prompts))]


def test_sequences_join_a_running_batch_and_each_ends_at_its_own_max_tokens(ggufs):
    engine = _engine(ggufs, "qwen3", False)
    prompts = [engine.prompt_ids(c, 40) for c in CONVERSATIONS]
    limits = [24, 40, 3, 1, 32, 16]
    joins = [
        (at, p, replace(GREEDY, max_tokens=n))
        for at, p, n in zip([0, 0, 2, 5, 9, 12], prompts, limits, strict=True)
    ]
    decoder = GGUFDecoder(engine, 3, idle_release_s=1.0)  # serve's keeps it 5 minutes
    got = _decoded(decoder, joins)
    want = [_greedy_ids(engine, p, n) for p, n in zip(prompts, limits, strict=True)]
    assert got == want
    assert [len(t) for t in got] == limits
    # its context outlives the batch a while (the next request reuses it and its cached
    # prompts), then is freed: an idle server holds none
    assert len(decoder) == 0 and decoder.cells >= 3 * engine.context_length
    wait_for(lambda: decoder.cells == 0, "the idle context to be freed", 1.0 + 10)
    assert IDLE_RELEASE_S == 300  # serve's: ollama's keep_alive


def test_each_sequence_has_the_whole_context_beside_the_others(ggufs):
    engine = _engine(ggufs, "qwen2", None)
    n = 16
    text = "报销需要哪些发票和审批单？"
    repeats = 700
    while True:  # the most repeats that still fit beside n tokens of reply
        try:
            prompt = engine.prompt_ids([{"role": "user", "content": text * repeats}], n)
            break
        except PromptTooLong:
            repeats -= 1
    assert len(prompt) > engine.context_length - 3 * n  # nearly the whole context
    prompts = [engine.prompt_ids(c, n) for c in SHORTER[:2]] + [prompt]
    settings = replace(GREEDY, max_tokens=n)
    got = _decoded(engine.decoder(3), [(0, p, settings) for p in prompts])
    assert got == [_greedy_ids(engine, p, n) for p in prompts]


def _greedy_ids(engine, prompt: list[int], n: int) -> list[int]:
    """The one-by-one greedy tokens (``Llama.generate``, as ``pieces`` runs it)."""
    return list(engine._until_end(engine.llm.generate(prompt, temp=0.0, top_k=1), n))


def test_each_sequence_stops_at_its_own_end_of_turn(ggufs, monkeypatch):
    import llama_cpp

    engine = _engine(ggufs, "qwen2", None)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    ids = [_greedy_ids(engine, p, MAX_TOKENS) for p in prompts]
    # a token the first reply says early, which some other reply never says, ends turns too
    stop = next(
        t
        for k, t in enumerate(ids[0][2:], start=2)
        if t not in ids[0][:k] and any(t not in other for other in ids[1:])
    )
    is_eog = llama_cpp.llama_vocab_is_eog
    monkeypatch.setattr(
        llama_cpp, "llama_vocab_is_eog", lambda vocab, token: token == stop or is_eog(vocab, token)
    )
    one = _one_by_one(engine, prompts, GREEDY)
    assert one[0].finish_reason == "stop" and one[0].completion_tokens < MAX_TOKENS
    assert "length" in {c.finish_reason for c in one}  # others went on in the same batch
    assert complete_batch(engine, prompts, GREEDY) == one
    # a stop string ends a sequence too, in the batch as one by one
    stopped = replace(GREEDY, stop=[one[1].text[3:5]])
    assert complete_batch(engine, prompts, stopped) == _one_by_one(engine, prompts, stopped)


def test_a_sequence_that_leaves_frees_its_slot_for_the_next(ggufs):
    import llama_cpp

    engine = _engine(ggufs, "qwen2", None)
    prompts = [engine.prompt_ids(c, 40) for c in CONVERSATIONS * 2]
    settings = replace(GREEDY, max_tokens=40)
    want = [_greedy_ids(engine, p, 40) for p in prompts]
    decoder = engine.decoder(3)
    first, kept, last = (decoder.join(p, settings) for p in prompts[:3])
    tokens = {first: [], kept: [], last: []}
    for _ in range(4):
        for step in decoder.step():
            tokens[step.seq].append(step.token)
    memory = llama_cpp.llama_get_memory(decoder._ctx)
    cells = [llama_cpp.llama_memory_seq_pos_max(memory, slot) for slot in range(3)]
    assert all(c >= len(p) for c, p in zip(cells, prompts, strict=False))  # prompts read
    decoder.leave(last)  # its client went: its slot (the highest) is free, its cells a cache
    assert llama_cpp.llama_memory_seq_pos_max(memory, 2) == cells[2]
    decoder.leave(first)  # the lowest: the highest left moves into its slot (cells swapped)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 1) == cells[0]
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == cells[1]
    assert len(decoder) == 1
    # nine more sequences through the slots beside it, each its one-by-one reply
    later = [decoder.join(p, settings) for p in prompts[3:]]
    tokens |= {seq: [] for seq in later}
    while len(decoder):
        for step in decoder.step():
            if step.token is not None:
                tokens[step.seq].append(step.token)
    assert [tokens[seq] for seq in [kept, *later]] == [want[1], *want[3:]]
    assert tokens[first] == want[0][: len(tokens[first])]
    assert tokens[last] == want[2][: len(tokens[last])]
    decoder.close()
    assert decoder.cells == 0  # closed: no context held


def test_a_conversations_next_turn_reads_only_its_new_tokens(ggufs, monkeypatch):
    import llama_cpp

    engine = _engine(ggufs, "qwen2", None)
    settings = replace(GREEDY, max_tokens=16)
    turn = [{"role": "user", "content": "差旅费报销需要哪些票据？" * 8}]
    other = [{"role": "user", "content": "Which receipts does a taxi fare need?" * 8}]
    first, unrelated = engine.prompt_ids(turn, 16), engine.prompt_ids(other, 16)
    reply = complete_batch(engine, [first], settings)[0].text
    follow = [
        *turn,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "住宿呢？"},
    ]
    second = engine.prompt_ids(follow, 16)
    assert second[: len(first)] == first
    calls: list[int] = []  # the tokens of each llama.cpp call
    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):
        calls.append(batch.n_tokens)
        return real_decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    decoder = GGUFDecoder(engine, 2, idle_release_s=60)
    # the first turn and another conversation: the first leaves first, from the lowest slot
    _decoded(decoder, [(0, first, replace(settings, max_tokens=2)), (0, unrelated, settings)])
    calls.clear()
    (got,) = _decoded(decoder, [(0, second, settings)])
    assert 0 < calls[0] <= len(second) - len(first)  # its prompt: only what the first lacks
    assert got == _greedy_ids(engine, second, 16)  # the reply one by one gives
    calls.clear()
    (again,) = _decoded(decoder, [(0, unrelated, settings)])  # the other slot's cells kept too
    assert calls[0] == 1  # its last token: the rest was cached
    assert again == _greedy_ids(engine, unrelated, 16)
    decoder.close()
    assert decoder.cells == 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_seeded_sampled_reply_alone_is_the_one_by_one_reply_and_reproducible(arch, ggufs):
    engine = _engine(ggufs, arch, None)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    sampled = GenerationSettings(max_tokens=MAX_TOKENS, temperature=1.0, seed=1234)
    by_itself = _decoded(engine.decoder(1), [(0, prompts[2], sampled)])[0]
    # alone in the batch it goes through one-by-one's kernels with one-by-one's chain and seed
    alone = list(engine.pieces(prompts[2], sampled))
    assert list(token_texts(by_itself, engine.decode)) == alone
    assert _decoded(engine.decoder(4), [(0, prompts[2], sampled)])[0] == by_itself
    other = _decoded(engine.decoder(1), [(0, prompts[2], replace(sampled, seed=99))])[0]
    assert other != by_itself  # the seed is what makes it the same
    crowd = [
        (0, prompts[0], replace(sampled, seed=5)),
        (0, prompts[1], replace(GREEDY, repetition_penalty=1.3)),
        (3, prompts[2], sampled),
        (5, prompts[3], replace(sampled, seed=7, top_k=5)),
    ]
    # in a crowd its token shares llama.cpp's matrix × matrix kernels with the others' (a
    # logit may move ~1e-3): the same crowd gives the same replies
    assert _decoded(engine.decoder(4), crowd) == _decoded(engine.decoder(4), crowd)


def test_the_one_by_one_llama_works_before_during_and_after_batches(ggufs):
    engine = _engine(ggufs, "qwen3", True)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    first = _alone(engine, prompts[2], GREEDY)
    assert engine.pieces_batch(prompts, GREEDY)[2] == first
    assert _alone(engine, prompts[2], GREEDY) == first  # its cached prompt is still right
    # a reply one by one while a batch is half decoded, then the batch finishes unchanged
    decoder = engine.decoder(2)
    seqs = [decoder.join(p, GREEDY) for p in prompts[:2]]
    tokens = {seq: [] for seq in seqs}
    for _ in range(5):
        for step in decoder.step():
            if step.token is not None:
                tokens[step.seq].append(step.token)
    assert _alone(engine, prompts[4], GREEDY) == _alone(engine, prompts[4], GREEDY)
    while len(decoder):
        for step in decoder.step():
            if step.token is not None:
                tokens[step.seq].append(step.token)
    assert [tokens[s] for s in seqs] == [_greedy_ids(engine, p, MAX_TOKENS) for p in prompts[:2]]


# ------------------------------------------------------------------ through the server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_serve_decodes_concurrent_requests_together_and_a_client_that_goes_leaves(ggufs):
    from serve_helpers import running
    from test_serve_batching import (
        Recorded,
        assert_same,
        open_stream,
        post,
        request,
    )

    from qwen_mlx.serve.server import Server

    engine = _engine(ggufs, "qwen3", True)
    limits = [24, 40, 16, 48, 32]
    expected = [
        complete_batch(engine, [engine.prompt_ids(c, n)], replace(GREEDY, max_tokens=n))[0]
        for c, n in zip(SHORTER, limits, strict=True)
    ]
    stops = [None, expected[1].text[4:6], None, None, expected[4].text[2:4]]
    expected[1] = _stopped(engine, SHORTER[1], limits[1], stops[1])
    expected[4] = _stopped(engine, SHORTER[4], limits[4], stops[4])
    recorded = Recorded(engine)
    server = Server(recorded, max_concurrent=4)
    with running(server) as port, ThreadPoolExecutor(len(SHORTER)) as pool:
        going = open_stream(port, request(SHORTER[0], 3000, True))
        wait_for(lambda: server.scheduler.decoding() == 1, "the first to decode")
        futures = [
            pool.submit(
                post, port, request(c, n, stream=i % 2 == 0, **({"stop": [s]} if s else {}))
            )
            for i, (c, n, s) in enumerate(zip(SHORTER, limits, stops, strict=True))
        ]
        wait_for(lambda: max(recorded.steps, default=0) > 2, "a batch of several")
        going.close()  # its client went: it leaves the batch, the others go on
        wait_for(lambda: len(recorded.left) == 1, "the gone client to leave")
        replies = [f.result(timeout=300) for f in futures]
    for reply, completion in zip(replies, expected, strict=True):
        assert_same(reply, completion, engine.family.think_tags)
    assert max(recorded.steps) <= 4  # never more than --max-concurrent
    assert recorded.tokens[min(recorded.tokens)] < 3000  # the one that went stopped early


def _stopped(engine, conversation, limit: int, stop: str) -> Completion:
    settings = replace(GREEDY, max_tokens=limit, stop=[stop])
    return complete_batch(engine, [engine.prompt_ids(conversation, limit)], settings)[0]
