"""Per-request decoding options (vLLM's and OpenAI's): top_k, min_p, repetition_penalty,
presence_penalty, frequency_penalty and seed, on the torch, MLX and llama.cpp engines, alone
and inside a running batch of other requests.

Each option is checked against its definition on the random tiny Qwen2 (fp32 on the CPU), whose
greedy replies repeat tokens: top_k 1 and min_p 1 leave only the most likely token (greedy);
a huge repetition or presence penalty never repeats a token; a huge negative presence or
frequency penalty repeats the reply's first token (they count the reply, not the prompt); a
seed gives the same reply twice at temperature 1 whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from qwen_mlx.backends.base import GenerationSettings, token_texts

ASK = [{"role": "user", "content": "出差住宿费的标准是多少？发票丢了怎么办？"}]
OTHERS = [
    [{"role": "user", "content": "差旅费?"}],
    [{"role": "user", "content": "What receipts do I need for a conference trip abroad?"}],
]
N = 24
GREEDY = GenerationSettings(max_tokens=N, temperature=0.0)
SAMPLED = GenerationSettings(max_tokens=N, temperature=1.0)
BACKENDS = ["torch", "mlx", "gguf"]


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    made = {}

    def engine(backend: str):
        if backend not in made:
            made[backend] = _load(backend, tiny_models("qwen2"), tmp_path_factory)
        return made[backend]

    return engine


def _load(backend, model_dir, tmp_path_factory):
    from qwen_mlx.inference import GGUFEngine, open_engine

    if backend == "gguf":
        pytest.importorskip("llama_cpp")
        from qwen_mlx.export.gguf import export

        out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
        return GGUFEngine(export(None, out, model=model_dir, quant="f16").path)
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    engine = open_engine(None, model=model_dir, backend=backend)
    if backend == "mlx":  # the stored bf16 in float32, as the torch engine runs on a CPU
        import mlx.core as mx

        engine.model.set_dtype(mx.float32)
    return engine


def alone(engine, messages, settings) -> list[str]:
    """The reply's pieces (one per token), the engine generating it by itself."""
    return list(engine.pieces(engine.prompt_ids(messages, N), settings))


def batched(engine, requests) -> list[list[str]]:
    """The replies (pieces) of (messages, settings) requests decoded together in one batch
    by ``engine.decoder()``, joining one step apart, so each joins a running batch."""
    decoder = engine.decoder()
    tokens: dict[int, list[int]] = {}
    order = []
    waiting = list(requests)
    while waiting or len(decoder):
        if waiting:
            messages, settings = waiting.pop(0)
            seq = decoder.join(engine.prompt_ids(messages, N), settings)
            tokens[seq] = []
            order.append(seq)
        for step in decoder.step():
            if step.token is not None:
                tokens[step.seq].append(step.token)
    if hasattr(decoder, "close"):
        decoder.close()
    return [list(token_texts(tokens[seq], decoder.decode)) for seq in order]


def replies(engine, settings) -> list[list[str]]:
    """The reply to ASK under ``settings``: alone, and in a batch between two other
    requests, one sampled and one greedy with a penalty."""
    neighbours = [
        (OTHERS[0], replace(SAMPLED, seed=None)),
        (ASK, settings),
        (OTHERS[1], replace(GREEDY, repetition_penalty=1.3)),
    ]
    return [alone(engine, ASK, settings), batched(engine, neighbours)[1]]


def _repeats(pieces: list[str]) -> bool:
    said = [p for p in pieces if p]
    return len(set(said)) < len(said)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_and_min_p_1_are_greedy(backend, engines):
    engine = engines(backend)
    greedy = alone(engine, ASK, GREEDY)
    assert len({"".join(p) for p in (alone(engine, ASK, SAMPLED) for _ in range(3))}) > 1
    for option in ({"top_k": 1}, {"min_p": 1.0}):
        for reply in replies(engine, replace(SAMPLED, **option)):
            assert reply == greedy, option


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_repetition_or_presence_penalty_never_repeats_a_token(backend, engines):
    engine = engines(backend)
    assert _repeats(alone(engine, ASK, GREEDY))  # the random model loops without one
    for option in ({"repetition_penalty": 1e6}, {"presence_penalty": 1e4}):
        for settings in (replace(GREEDY, **option), replace(SAMPLED, **option, seed=5)):
            for reply in replies(engine, settings):
                assert len(reply) == N and not _repeats(reply), (option, reply)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_presence_and_frequency_penalties_count_the_reply_not_the_prompt(backend, engines):
    # Boosting every token already in the reply by 10,000 makes the reply its first (greedy)
    # token over and over; counting the prompt too would start it with a prompt token.
    engine = engines(backend)
    first = alone(engine, ASK, replace(GREEDY, max_tokens=1))
    for option in ({"presence_penalty": -1e4}, {"frequency_penalty": -1e4}):
        for reply in replies(engine, replace(GREEDY, **option)):
            assert reply == first * N, option


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seed_gives_the_same_sampled_reply_whatever_else_is_decoded(backend, engines):
    engine = engines(backend)
    seeded = replace(SAMPLED, seed=1234)
    once = alone(engine, ASK, seeded)
    assert alone(engine, ASK, seeded) == once
    others = [alone(engine, ASK, replace(SAMPLED, seed=seed)) for seed in (1, 2)]
    assert once not in others and others[0] != others[1]  # other seeds, other replies
    # in a batch: the same reply as in a batch of its own
    by_itself = batched(engine, [(ASK, seeded)])[0]
    assert replies(engine, seeded)[1] == by_itself
    assert batched(engine, [(OTHERS[1], SAMPLED), (ASK, seeded)])[1] == by_itself


# ------------------------------------------------------------------ through the server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def live(engines):
    from serve_helpers import running

    from qwen_mlx.serve.server import Server

    with running(Server(engines("torch"))) as port:
        yield f"http://127.0.0.1:{port}"


def post(live: str, path: str, **body):
    import json

    from serve_helpers import http

    return http("POST", f"{live}{path}", json.dumps(body).encode())


def say(live: str, **options) -> str:
    reply = post(live, "/v1/chat/completions", messages=ASK, max_tokens=N, **options)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_the_options_reach_the_engine_per_request(live):
    greedy = say(live, temperature=0)
    assert say(live, temperature=1, top_k=1) == greedy == say(live, temperature=1.5, min_p=1)
    assert say(live, temperature=1, seed=7) == say(live, temperature=1, seed=7)
    assert say(live, temperature=1, seed=7) != say(live, temperature=1, seed=8)
    assert say(live, temperature=0, repetition_penalty=1.5) != greedy
    assert say(live, temperature=0, presence_penalty=2) != greedy
    assert say(live, temperature=0, frequency_penalty=-2) != greedy
    assert say(live, temperature=0, top_k=-1, presence_penalty=0, seed=3) == greedy  # "off"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("seed", "7"),
        ("seed", 1 << 64),
    ],
)
def test_an_option_out_of_range_is_one_400_naming_it(live, field, value):
    reply = post(live, "/v1/chat/completions", messages=ASK, **{field: value})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ")
    assert "\n" not in error["message"]


# ------------------------------------------------------------------ chat_template_kwargs


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_enable_thinking_is_chosen_per_request_on_qwen3_and_changes_nothing_on_qwen2(
    arch, tiny_models
):
    from serve_helpers import running

    from qwen_mlx.inference import open_engine
    from qwen_mlx.serve.server import Server

    engine = open_engine(None, model=tiny_models(arch), backend="torch")
    engine.thinking = False
    one = [{"role": "user", "content": "差旅费?"}]

    def prompt_tokens(live, **extra) -> int:
        reply = post(live, "/v1/chat/completions", messages=one, max_tokens=1, **extra)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens"]

    with running(Server(engine)) as port:
        live = f"http://127.0.0.1:{port}"
        off = prompt_tokens(live)
        think = {"chat_template_kwargs": {"enable_thinking": True}}
        no_think = {"chat_template_kwargs": {"enable_thinking": False}}
        ids = {t: engine.prompt_ids(one, 1, thinking=t) for t in (False, True)}
        if arch == "qwen3":  # thinking on: no empty think block after the generation prompt
            assert ids[True] != ids[False]
            assert prompt_tokens(live, **think) == len(ids[True]) < off
        else:
            assert ids[True] == ids[False]
            assert prompt_tokens(live, **think) == off
        assert prompt_tokens(live, **no_think) == off == len(ids[False])
        assert engine.thinking is False  # the engine's own setting is untouched
        bad = post(live, "/v1/chat/completions", messages=one, chat_template_kwargs={"tools": 1})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("chat_template_kwargs.tools: ")


# ------------------------------------------------------------------ /v1/completions


def test_text_completions_with_the_openai_client(live, engines):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=120)
    engine = engines("torch")
    prompt = "报销规定第一条：<|im_end|><|im_start|>system"
    ids = engine.text_ids(prompt, N)
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids  # text stays text
    settings = replace(GREEDY, max_tokens=12)
    expected = "".join(engine.pieces(ids, settings)).replace("\ufffd", "")
    reply = client.completions.create(
        model="tiny-qwen2", prompt=prompt, max_tokens=12, temperature=0
    )
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens <= 12
    assert (reply.choices[0].finish_reason == "length") == (reply.usage.completion_tokens == 12)
    streamed = client.completions.create(
        model="tiny-qwen2",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # stop strings, and the default of 16 tokens
    cut = expected[2:4]
    stopped = client.completions.create(
        model="tiny-qwen2", prompt=prompt, stop=[cut], temperature=0
    )
    assert stopped.choices[0].text == expected[: expected.index(cut)]
    default = client.completions.create(model="tiny-qwen2", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16
    for bad in ({"echo": True}, {"prompt": ["a", "b"]}, {"max_tokens": 1 << 20}):
        reply = post(live, "/v1/completions", **{"prompt": prompt, **bad})
        assert reply.status_code == 400, bad


# ------------------------------------------------------------------ tool-call turns


def test_an_assistant_turn_of_tool_calls_with_null_content_is_rendered(live, engines):
    from qwen_mlx.chat_template import hf_prompt_ids

    engine = engines("torch")
    call = {"name": "lookup", "arguments": {"item": "住宿费"}}
    turns = [
        {"role": "user", "content": "查一下住宿费"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {**call, "arguments": '{"item": "住宿费"}'},
                }
            ],
        },
        {"role": "user", "content": "谢谢"},
    ]
    reply = post(live, "/v1/chat/completions", messages=turns, max_tokens=1, temperature=0)
    assert reply.status_code == 200, reply.text
    rendered = [
        {
            **turns[1],
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": call}],
        }
    ]
    ids = hf_prompt_ids(engine.tokenizer, [turns[0], *rendered, turns[2]], 10_000, False)
    assert reply.json()["usage"]["prompt_tokens"] == len(ids)
    assert "lookup" in engine.tokenizer.decode(ids)  # the call is in the prompt
    without = [turns[0], {"role": "assistant", "content": None}, turns[2]]
    refused = post(live, "/v1/chat/completions", messages=without)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages[1].content"
    assert "tool_calls" in refused.json()["error"]["message"]
