"""Batched generation: answers generated together are the one-by-one answers, token for token.

The torch and MLX engines (fp32 on the CPU) answer prompts of very different lengths with a
PEFT adapter on, on the tiny Qwen2 and the tiny Qwen3 with thinking on and off; the batch
pads the short prompts on the left. The random tiny model rarely ends its turn, so one test
also makes one of the model's own greedy tokens an end-of-turn token: a sequence that reaches
it stops there, the others go on to ``max_tokens``, in the batch as one by one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_helpers import make_peft_adapter
from repo_helpers import QWEN25_3B

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.inference import Completion, answer_all, complete_batch

CONVERSATIONS = [
    [{"role": "user", "content": "差旅费?"}],
    [
        {"role": "system", "content": "你是报销助手，按学校的报销细则回答问题。" * 6},
        {"role": "user", "content": "出差住宿费的标准是多少？发票丢了怎么办？" * 30},
    ],
    [{"role": "user", "content": "What receipts do I need for a conference trip abroad?"}],
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "请详细说明会议费、培训费和劳务费的报销流程与所需材料。" * 3}],
]
CASES = [("qwen2", False), ("qwen3", False), ("qwen3", True)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """arch -> a PEFT adapter for that tiny model (B large enough that the random model's
    answers vary from prompt to prompt)."""
    root = tmp_path_factory.mktemp("batched")
    return lambda arch: make_peft_adapter(tiny_models(arch), root / arch, seed=3, b_std=0.1)


def _engine(backend: str, model_dir: Path, adapter: Path, thinking: bool):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    from qwen_mlx.inference import open_engine

    engine = open_engine(adapter, model=model_dir, backend=backend)
    engine.thinking = thinking
    if backend == "mlx":  # the stored bf16 in float32, as the torch engine runs on a CPU
        import mlx.core as mx

        engine.model.set_dtype(mx.float32)
    return engine


def _one_by_one(engine, prompts, settings) -> list[Completion]:
    return [complete_batch(engine, [ids], settings)[0] for ids in prompts]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize(("arch", "thinking"), CASES, ids=["qwen2", "qwen3", "qwen3-think"])
def test_batched_greedy_answers_are_the_one_by_one_answers(
    backend, arch, thinking, tiny_models, adapters
):
    engine = _engine(backend, tiny_models(arch), adapters(arch), thinking)
    settings = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-1] > 3 * lengths[0]  # very different lengths: much left padding
    one = [list(engine.pieces(ids, settings)) for ids in prompts]
    assert len({"".join(pieces) for pieces in one}) == len(prompts)  # not trivial answers
    assert engine.pieces_batch(prompts, settings) == one  # token for token (a piece each)
    assert complete_batch(engine, prompts, settings) == _one_by_one(engine, prompts, settings)
    # eval's path: shortest prompts first, in batches of 2, back in the callers' order
    answers = dict(answer_all(engine, CONVERSATIONS, settings, batch_size=2))
    assert [answers[i] for i in range(len(prompts))] == _one_by_one(engine, prompts, settings)


def _greedy_ids(engine, prompt: list[int], n: int) -> list[int]:
    """The model's own first ``n`` greedy tokens after ``prompt`` (one by one)."""
    if engine.backend_name == "mlx":
        from mlx_lm.generate import stream_generate

        return [r.token for r in stream_generate(engine.model, engine.wrapped, prompt, n)]
    import torch

    from qwen_mlx.backends.torch_engine import _sampling

    ids = torch.tensor([prompt])
    settings = GenerationSettings(max_tokens=n, temperature=0.0)
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            **_sampling(settings, len(prompt)),
        )
    return out[0, len(prompt) :].tolist()


def _stop_also_at(engine, token: int) -> None:
    engine.end_ids = {*engine.end_ids, token}
    if engine.backend_name == "mlx":  # mlx-lm's one-by-one generation asks its tokenizer
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        engine.wrapped = TokenizerWrapper(engine.tokenizer, eos_token_ids=engine.end_ids)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize(("arch", "thinking"), CASES[:2], ids=["qwen2", "qwen3"])
def test_each_sequence_stops_at_its_own_end_of_turn(backend, arch, thinking, tiny_models, adapters):
    engine = _engine(backend, tiny_models(arch), adapters(arch), thinking)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in CONVERSATIONS]
    ids = [_greedy_ids(engine, p, MAX_TOKENS) for p in prompts]
    # a token the first answer says early, which some other answer never says
    stop = next(
        t
        for k, t in enumerate(ids[0][2:], start=2)
        if t not in ids[0][:k] and any(t not in other for other in ids[1:])
    )
    _stop_also_at(engine, stop)
    settings = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
    one = _one_by_one(engine, prompts, settings)
    assert one[0].finish_reason == "stop" and one[0].completion_tokens < MAX_TOKENS
    assert "length" in {c.finish_reason for c in one}  # others went on in the same batch
    assert complete_batch(engine, prompts, settings) == one
    # a stop string ends a sequence too, in the batch as one by one
    stopped = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0, stop=[one[1].text[3:5]])
    assert complete_batch(engine, prompts, stopped) == _one_by_one(engine, prompts, stopped)


def test_an_engine_without_batching_answers_one_by_one_in_order():
    asked = []

    class OneByOne:
        def prompt_ids(self, messages, max_tokens):
            asked.append(messages[-1]["content"])
            return [len(asked)]

        def pieces(self, prompt_ids, settings):
            yield from ["answer", " ", str(prompt_ids[0])]

    settings = GenerationSettings(max_tokens=3)
    answers = answer_all(OneByOne(), CONVERSATIONS, settings, batch_size=4)
    first = next(answers)
    assert first == (0, Completion("answer 1", "length", 3)) and len(asked) == 1  # lazily
    assert [i for i, _ in answers] == [1, 2, 3, 4]


QUESTION, ANSWER = "出差住宿费怎么报销？", "凭发票按标准报销。"


@pytest.fixture(scope="module")
def answers_and_stops(family, family_model_dir, family_tokenizer, tmp_path_factory):
    """The family's tiny model tuned to answer QUESTION with ANSWER and end its turn."""
    from lora_helpers import fine_tune_answer

    out = tmp_path_factory.mktemp("stops") / family.name
    return fine_tune_answer(
        family_model_dir, family_tokenizer, QUESTION, ANSWER, out, enable_thinking=False
    )


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_model_that_ends_its_turn_leaves_the_batch_while_the_others_go_on(
    backend, answers_and_stops, tmp_path
):
    # an adapter that moves the tuned model enough that only some answers still end
    adapter = make_peft_adapter(answers_and_stops, tmp_path / "a", seed=3, b_std=0.1)
    engine = _engine(backend, answers_and_stops, adapter, False)
    conversations = [*CONVERSATIONS, [{"role": "user", "content": QUESTION}]]
    settings = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in conversations]
    one = _one_by_one(engine, prompts, settings)
    assert one[-1] == Completion(ANSWER, "stop", one[-1].completion_tokens)
    assert {c.finish_reason for c in one} == {"stop", "length"}  # some went on to the end
    assert complete_batch(engine, prompts, settings) == one


def test_the_default_batch_fits_the_memory_estimate(monkeypatch):
    from types import SimpleNamespace

    from qwen_mlx.inference import DEFAULT_BATCH_SIZE, fitting_batch_size

    qwen_3b = {**QWEN25_3B, "architectures": ["Qwen2ForCausalLM"]}
    engine = SimpleNamespace(config=qwen_3b, value_bytes=2)
    gib = 1024**3
    monkeypatch.setattr("qwen_mlx.memory.system_memory", lambda: 64 * gib)
    assert fitting_batch_size(engine, 1280) == DEFAULT_BATCH_SIZE  # plenty of room
    monkeypatch.setattr("qwen_mlx.memory.system_memory", lambda: 8 * gib)
    assert 1 < fitting_batch_size(engine, 1280) < DEFAULT_BATCH_SIZE  # bf16 weights 5.7 GiB
    monkeypatch.setattr("qwen_mlx.memory.system_memory", lambda: 7 * gib)
    assert fitting_batch_size(engine, 1280) == 1  # never less than one
    assert fitting_batch_size(SimpleNamespace(), 1280) == DEFAULT_BATCH_SIZE  # a GGUF


def _through_decoder(engine, prompts, settings, joins_at: list[int]) -> list[Completion]:
    """The replies of a continuous batch (``engine.decoder()``) that prompt i joins at step
    ``joins_at[i]``, put together as serve puts its chunks together."""
    from qwen_mlx.inference import ReplyChunks

    decoder, replies, chunks, seqs = engine.decoder(), {}, {}, {}
    for step in range(10_000):
        for i in [i for i, at in enumerate(joins_at) if at == step]:
            seqs[decoder.join(prompts[i], settings)] = i
            replies[i], chunks[i] = ReplyChunks(settings, decoder.decode), []
        if not len(decoder) and step > max(joins_at):
            break
        for s in decoder.step():
            i = seqs[s.seq]
            if replies[i].stopped:
                continue
            chunks[i] += replies[i].token(s.token) if s.token is not None else []
            if replies[i].stopped and not s.done:
                decoder.leave(s.seq)  # a stop string: as serve drops it
            elif s.done and not replies[i].stopped:
                chunks[i] += replies[i].end()
    return [
        Completion("".join(c.text for c in chunks[i]), *_last(chunks[i]))
        for i in range(len(prompts))
    ]


def _last(chunks) -> tuple[str, int]:
    return chunks[-1].finish_reason, chunks[-1].completion_tokens


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sequences_joining_a_running_batch_get_the_one_by_one_answers(
    backend, answers_and_stops, tmp_path
):
    adapter = make_peft_adapter(answers_and_stops, tmp_path / "a", seed=3, b_std=0.1)
    engine = _engine(backend, answers_and_stops, adapter, False)
    conversations = [*CONVERSATIONS, [{"role": "user", "content": QUESTION}]]
    settings = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0)
    prompts = [engine.prompt_ids(c, MAX_TOKENS) for c in conversations]
    one = _one_by_one(engine, prompts, settings)
    assert {c.finish_reason for c in one} == {"stop", "length"}  # ends of turn, and not
    joins_at = [0, 0, 3, 5, 9, 2]  # later ones join while the first decode
    assert _through_decoder(engine, prompts, settings, joins_at) == one
    stopped = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0.0, stop=[one[1].text[3:5]])
    want = _one_by_one(engine, prompts, stopped)
    assert _through_decoder(engine, prompts, stopped, joins_at) == want
