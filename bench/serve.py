"""Benchmark: `qwen-mlx serve` with continuous batching against one request at a time.

One process, one loaded model, two servers in turn: ``--max-concurrent 1`` (the path the
server had before it batched: requests take turns) and ``--max-concurrent N`` (decoded
together). For each, C concurrent clients (official openai client, 127.0.0.1) each send
``--rounds`` greedy requests (eval questions of different lengths, ``--max-tokens`` new tokens):
requests/s and p50/p95 latency; then a single client's time to first token (a streamed
one-token reply, median of ``--ttft-runs``); peak RSS while each server answers, against the
memory estimate (:func:`qwen_mlx.inference.generation_memory`), counted above what the
process held before the model loaded.

    python bench/serve.py                                        # tiny model, torch
    python bench/serve.py --shape 0.5b --max-tokens 16 --rounds 1 --threads 2
    python bench/serve.py --shape 0.5b --backend gguf   # the model's q8_0 GGUF, llama.cpp
    python bench/serve.py --gguf FILE   # also this GGUF through llama.cpp
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # the bench's models and questions
from generate import PeakRSS, import_libraries, rss


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving:
    """A server of ``engine`` with ``max_concurrent`` on a free port, while the block runs."""

    def __init__(self, engine, max_concurrent: int):
        from qwen_mlx.serve.server import Server, make_server

        self.port = _port()
        self.server = make_server(
            Server(engine, max_concurrent=max_concurrent), "127.0.0.1", self.port, "error"
        )

    def __enter__(self) -> str:
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=3600)


def load(url: str, model: str, asked: list, clients: int, max_tokens: int) -> dict:
    """``asked`` requests from ``clients`` concurrent clients: requests/s and latencies."""
    client = _client(url)

    def one(messages):
        t = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - t, reply.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, asked))
    elapsed = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in done)
    return {
        "rps": len(asked) / elapsed,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "answers": [text for _, text in done],
    }


def first_token_s(url: str, model: str, asked: list, runs: int) -> float:
    """Median seconds a single client waits for a one-token streamed reply: reading the
    prompt and deciding the first token, with HTTP (a random model's first tokens may be no
    text at all, so the reply's end marks the token). ``asked``: one conversation, asked
    ``runs`` times (a retry), or ``runs`` conversations (each a new question)."""
    client = _client(url)
    times = []
    for i in range(runs):
        messages = asked[i % len(asked)]
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=1, temperature=0, stream=True
        )
        for _chunk in stream:
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, engine, args, before_model: int) -> None:
    from qwen_mlx.inference import generation_memory

    asked_all = generate.questions(max(args.clients) * args.rounds)
    prompt = generate.questions(1)[0]
    # new questions for the time to first token: none the load above has asked
    fresh = generate.questions(max(args.clients) * args.rounds + args.ttft_runs)[-args.ttft_runs :]
    batched = [m for m in args.max_concurrent if m > 1]
    modes = [1, *batched] if callable(getattr(engine, "decoder", None)) else [1]
    print(f"\n{name}; {args.max_tokens} new tokens a request, greedy", flush=True)
    print(f"{'clients':>8} {'max-conc':>8} {'req/s':>7} {'× one':>6} {'p50 s':>7} {'p95 s':>7}")
    rows, peaks = {}, {}
    for mode in modes:
        with Serving(engine, mode) as url, PeakRSS() as rss:
            _client(url).chat.completions.create(  # warm-up: one-off setup is not measured
                model=engine.model_id, messages=prompt, max_tokens=2, temperature=0
            )
            for clients in args.clients:
                asked = asked_all[: clients * args.rounds]
                r = load(url, engine.model_id, asked, clients, args.max_tokens)
                rows[clients, mode] = r
                ratio = r["rps"] / rows[clients, 1]["rps"]
                print(
                    f"{clients:8d} {mode:8d} {r['rps']:7.3f} {ratio:6.2f} {r['p50']:7.2f} "
                    f"{r['p95']:7.2f}",
                    flush=True,
                )
            ttft = first_token_s(url, engine.model_id, fresh, args.ttft_runs)
            again = first_token_s(url, engine.model_id, [prompt], args.ttft_runs)
            rows["ttft", mode], rows["again", mode] = ttft, again
        peaks[mode] = rss.peak
        print(
            f"  --max-concurrent {mode}: single-client time to first token {ttft:.3f} s "
            f"(a new question), {again:.3f} s (the same question again)"
        )
    for mode in batched:
        same = all(rows[c, mode]["answers"] == rows[c, 1]["answers"] for c in args.clients)
        ttft = rows["ttft", mode] / rows["ttft", 1]
        again = rows["again", mode] / rows["again", 1]
        print(
            f"  max-concurrent {mode}: identical answers {same}; TTFT {ttft:.2f}× one at a "
            f"time (new questions), {again:.2f}× (the same question again)"
        )
    config = getattr(engine, "config", None)
    if config:
        longest = max(len(engine.prompt_ids(m, args.max_tokens)) for m in asked_all)
        for mode in modes:
            sequences = min(mode, max(args.clients))
            size = getattr(engine, "value_bytes", 2)
            estimate = generation_memory(config, sequences, longest + args.max_tokens, size)
            used = peaks[mode] - before_model
            print(
                f"  peak RSS at --max-concurrent {mode}: {peaks[mode] / 2**20:.0f} MiB, "
                f"{used / 2**20:.0f} MiB above the process before the model; estimate "
                f"{estimate / 2**20:.0f} MiB ({sequences} × {longest + args.max_tokens} "
                f"tokens): {used / estimate:.2f}× the estimate"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", *generate.train_torch.SHAPES], default="tiny")
    parser.add_argument("--backend", choices=["torch", "mlx", "gguf"], default="torch")
    parser.add_argument("--gguf", type=Path, help="also this GGUF through llama.cpp")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-concurrent", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-runs", type=int, default=5)
    parser.add_argument("--fp32", action="store_true", help="MLX in float32 (as torch on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from qwen_mlx.inference import GGUFEngine

    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {generate._cores()} cores, load average {load_avg}; {args}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = generate.make_model(Path(tmp), args.shape)
        import_libraries(args.backend)
        before_model = rss()
        engine = generate.open_bench_engine(args.backend, model)
        if args.backend == "mlx" and args.fp32:
            import mlx.core as mx

            engine.model.set_dtype(mx.float32)
        bench(f"{args.shape} shape, {engine.description}", engine, args, before_model)
        if args.gguf:
            bench("GGUF (llama.cpp)", GGUFEngine(args.gguf), args, rss())
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load_avg}")


if __name__ == "__main__":
    main()
