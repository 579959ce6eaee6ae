"""Benchmark: `qwen-mlx serve` throughput and latency, against calling the engine directly.

For each engine (the torch backend on a model folder; llama.cpp on a GGUF when given):
requests/s and p50/p95 latency with 1, 4 and 16 concurrent clients (official openai client,
127.0.0.1), and tokens/s of a single stream. The baseline is the same generation called
in-process with no HTTP, so the ratio is what the server costs.

    python bench/serve.py                          # builds the tiny model
    python bench/serve.py --model DIR --gguf FILE  # your own model and its export
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTION = [{"role": "user", "content": "差旅费报销需要哪些材料？"}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(engine):
    from qwen_mlx.serve.server import Server, make_server

    port = _port()
    server = make_server(Server(engine), "127.0.0.1", port, log_level="error")
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def direct(engine, max_tokens: int, n: int) -> float:
    """Requests/s of in-process generation (the baseline)."""
    from qwen_mlx.backends.base import GenerationSettings
    from qwen_mlx.inference import complete

    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    complete(engine, QUESTION, settings)  # warm-up: the first call pays one-off setup
    start = time.perf_counter()
    for _ in range(n):
        complete(engine, QUESTION, settings)
    return n / (time.perf_counter() - start)


def concurrent(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one(_):
        t = time.perf_counter()
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - start
    return {
        "rps": requests / elapsed,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def stream_tokens_per_s(url: str, model: str, max_tokens: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    start = time.perf_counter()
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            stream=True,
            max_tokens=max_tokens,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    return chunks[-1].usage.completion_tokens / (time.perf_counter() - start)


def bench(name: str, engine, args) -> None:
    server, url = _start(engine)
    try:
        base = direct(engine, args.max_tokens, args.requests)
        print(f"\n{name}: direct (no HTTP) {base:.2f} req/s")
        print(f"{'clients':>8} {'req/s':>8} {'× direct':>9} {'p50 s':>7} {'p95 s':>7}")
        for clients in (1, 4, 16):
            r = concurrent(
                url, engine.model_id, clients, max(args.requests, clients), args.max_tokens
            )
            print(
                f"{clients:8d} {r['rps']:8.2f} {r['rps'] / base:9.2f} {r['p50']:7.3f} "
                f"{r['p95']:7.3f}"
            )
        tps = stream_tokens_per_s(url, engine.model_id, args.stream_tokens)
        print(f"single stream: {tps:.1f} tokens/s")
    finally:
        server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    parser.add_argument("--gguf", type=Path, help="also benchmark this GGUF through llama.cpp")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=128)
    args = parser.parse_args()
    from qwen_mlx.inference import GGUFEngine, open_engine

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from qwen_mlx.tiny import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny")
        bench("torch backend", open_engine(None, model=model, backend="torch"), args)
        if args.gguf:
            bench("GGUF (llama.cpp)", GGUFEngine(args.gguf), args)


if __name__ == "__main__":
    main()
