"""Benchmark: eval's answering in batches against one by one, same run, same questions.

Eval-style: greedy answers to N questions (the bundled test questions, then training
questions to make up N), through :func:`qwen_mlx.inference.answer_all` as ``eval`` calls it,
with ``--batch-size`` B against batch size 1 (today's one-by-one path). Prints seconds, the
ratio, whether the answers are identical, and each path's peak RSS above the process before
the model against the memory estimate eval sizes its batches by. Models: the tiny model, and
a random model of the Qwen2.5-0.5B shape (its weights random, the tiny model's tokenizer) with
``--shape 0.5b``; ``--backend gguf`` answers from the model's q8_0 GGUF through llama.cpp.

    python bench/generate.py                                  # tiny, torch and mlx, 64 questions
    python bench/generate.py --shape 0.5b --backend torch --questions 16 --max-tokens 24
    python bench/generate.py --backend gguf     # the model's q8_0 GGUF through llama.cpp
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_torch  # noqa: E402 (the bench's model shapes)


def questions(n: int) -> list[list[dict]]:
    from qwen_mlx.eval.evaluate import load_cases

    data = REPO / "data"
    cases = load_cases(data / "报销细则_test.jsonl", None)
    cases += load_cases(data / "报销细则_distilled_chunked.jsonl", None)
    return [c.prompt for c in cases[:n]]


def make_model(root: Path, shape: str) -> Path:
    """The tiny model, or a random model of ``shape`` with the tiny model's tokenizer."""
    import json

    from qwen_mlx.tensor_io import save_tensors
    from qwen_mlx.tiny import build_tiny_model, init_weights

    train = REPO / "data" / "报销细则_distilled_chunked.jsonl"
    folder = build_tiny_model(root / shape, data_file=train)
    if shape == "tiny":
        return folder
    import numpy as np

    dims = train_torch.shape_dims(shape)
    save_tensors(folder / "model.safetensors", init_weights(np.random.default_rng(0), dims), "BF16")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **dims}))
    return folder


def rss() -> int:
    """This process's resident set, bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set seen while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._done = rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def import_libraries(backend: str) -> None:
    """What loading a model imports, so the RSS before the model holds the libraries."""
    if backend == "mlx":
        import mlx_lm.generate  # noqa: F401
    elif backend == "gguf":
        import llama_cpp  # noqa: F401
    else:
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401


def timed(engine, conversations, settings, batch_size: int):
    """Seconds, replies and peak RSS of answering ``conversations`` by ``batch_size``."""
    from qwen_mlx.inference import answer_all

    with PeakRSS() as peak:
        start = time.perf_counter()
        replies = dict(answer_all(engine, conversations, settings, batch_size))
        seconds = time.perf_counter() - start
    return seconds, [replies[i] for i in range(len(conversations))], peak.peak


def memory_line(engine, conversations, settings, batch_size: int, used: int) -> str:
    """``used`` (bytes above the process before the model) against the estimate
    eval's batch size is chosen by (:func:`qwen_mlx.inference.generation_memory`)."""
    from qwen_mlx.inference import generation_memory

    longest = max(len(engine.prompt_ids(m, settings.max_tokens)) for m in conversations)
    tokens = longest + settings.max_tokens
    size = getattr(engine, "value_bytes", 2)
    estimate = generation_memory(engine.config, batch_size, tokens, size)
    return (
        f"batch {batch_size}: peak {used / 2**20:.0f} MiB above the process before the model, "
        f"estimate {estimate / 2**20:.0f} MiB ({batch_size} × {tokens} tokens): "
        f"{used / estimate:.2f}×"
    )


def open_bench_engine(backend: str, model: Path):
    """The engine eval would open: a backend's on the model folder, or llama.cpp's on its
    q8_0 GGUF (exported next to the folder, as ``qwen-mlx export`` writes it)."""
    from qwen_mlx.inference import GGUFEngine, open_engine

    if backend != "gguf":
        return open_engine(None, model=model, backend=backend)
    from qwen_mlx.export.gguf import export

    return GGUFEngine(
        export(None, model.parent / f"{model.name}.gguf", model=model, quant="q8_0").path
    )


def bench(backend: str, model: Path, args) -> None:
    from qwen_mlx.backends.base import GenerationSettings

    import_libraries(backend)
    before_model = rss()
    engine = open_bench_engine(backend, model)
    if backend == "mlx" and args.fp32:  # as the torch engine runs on a CPU
        import mlx.core as mx

        engine.model.set_dtype(mx.float32)
    conversations = questions(args.questions)
    settings = GenerationSettings(max_tokens=args.max_tokens, temperature=0.0)
    timed(engine, conversations[:2], settings, 2)  # warm-up
    one_s, one, one_peak = timed(engine, conversations, settings, 1)
    batch_s, batched, batch_peak = timed(engine, conversations, settings, args.batch_size)
    tokens = sum(r.completion_tokens for r in one)
    print(
        f"{args.shape:>5} {backend:>5}  {len(conversations)} questions × ≤{args.max_tokens} "
        f"tokens ({tokens} generated)  one by one {one_s:7.1f} s  batch {args.batch_size} "
        f"{batch_s:7.1f} s  → {one_s / batch_s:.2f}×  identical answers: {one == batched}",
        flush=True,
    )
    # RSS rarely falls back, so the batched peak also holds what one by one left behind.
    if getattr(engine, "config", None) is None:
        return  # a GGUF: llama.cpp sizes its own context; no estimate to compare
    for size, peak in ((1, one_peak), (args.batch_size, batch_peak)):
        print("  " + memory_line(engine, conversations, settings, size, peak - before_model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", *train_torch.SHAPES], default="tiny")
    parser.add_argument("--backend", choices=["torch", "mlx", "gguf", "both"], default="both")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="MLX in float32 (as torch on a CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; on a loaded machine 1 is steadier)",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {_cores()} cores, load average {load}; {args}")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp), args.shape)
        for backend in ["torch", "mlx"] if args.backend == "both" else [args.backend]:
            bench(backend, model, args)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
