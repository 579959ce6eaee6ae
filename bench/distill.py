"""Benchmark: `qwen-mlx data distill` — teacher throughput and chunking speed.

1. Requests/s against a local stub teacher (tests/teacher_stub.py) that takes a fixed
   200 ms per reply, at concurrency 1 and 8, on a generated rules document: the ratio is
   what the thread pool buys when the teacher is the bottleneck (target ≥ 6×).
2. Chunking a generated 1,000-page rule document (chapters, articles, items, tables),
   counting tokens with the character estimate and with a real tokenizer (the tiny
   model's byte-level BPE, or --model DIR), target < 10 s.

    python bench/distill.py
    python bench/distill.py --model models/Qwen/Qwen2.5-3B --chunks 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.teacher_stub

from rich.console import Console

from qwen_mlx.config import Config
from qwen_mlx.distill.chunking import chunk_document, estimate_tokens, token_counter
from qwen_mlx.distill.run import distill
from tests.teacher_stub import TeacherStub, default_reply

CN = "零一二三四五六七八九"


def _cn(n: int) -> str:
    """1..999 in Chinese numerals (enough for chapter and article numbers)."""
    hundreds, rest = divmod(n, 100)
    tens, ones = divmod(rest, 10)
    text = (CN[hundreds] + "百") if hundreds else ""
    if tens:
        text += ("" if tens == 1 and not hundreds else CN[tens]) + "十"
    elif hundreds and ones:
        text += "零"
    return text + (CN[ones] if ones else "")


def rules_document(pages: int, chars_per_page: int = 900) -> str:
    """A regulation of about ``pages`` pages: chapters of articles with items and tables."""
    lines, article, size = [], 0, 0
    for chapter in range(1, 10_000):
        lines.append(f"第{_cn(chapter % 999 or 999)}章 第{chapter}类费用的报销")
        for _ in range(8):
            article += 1
            lines.append(
                f"第{_cn(article % 999 or 999)}条 第{article}项费用按下列标准报销，"
                f"每人每天不超过{100 + article % 400}元，超出部分由个人承担："
            )
            lines += [
                f"（{_cn(i)}）出差人员第{i}种情形须提供发票与审批单，经负责人签字；"
                for i in range(1, 4)
            ]
            if article % 5 == 0:
                lines += ["| 职级 | 一类城市 | 二类城市 |", f"| 讲师 | {article % 700} | 450 |"]
        size = sum(len(x) for x in lines)
        if size >= pages * chars_per_page:
            return "\n".join(lines)
    return "\n".join(lines)


def _distinct_questions(body: dict) -> str:
    """The stub's replies, with questions no de-duplication merges (hashes of the request)."""
    if "出题" not in body["messages"][0]["content"]:
        return default_reply(body)
    seed = hashlib.sha256(body["messages"][1]["content"].encode()).hexdigest()
    questions = [{"question": f"{seed[i * 12 : i * 12 + 12]} 怎么办？"} for i in range(5)]
    return json.dumps({"questions": questions}, ensure_ascii=False)


def throughput(chunks: int, concurrency: int, latency: float) -> tuple[int, float]:
    """(requests sent, seconds) for one distill run against the stub teacher."""
    doc_text = rules_document(pages=1)
    with tempfile.TemporaryDirectory() as tmp, TeacherStub(latency=latency) as stub:
        stub.reply = _distinct_questions
        doc = Path(tmp) / "rules.md"
        doc.write_text(doc_text[: chunks * 260], encoding="utf-8")
        cfg = Config()
        cfg.model.path = str(Path(tmp) / "no-model")
        cfg.distill.teacher_url, cfg.distill.teacher_model = stub.url, "teacher"
        cfg.distill.chunk_tokens, cfg.distill.concurrency = 160, concurrency
        quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
        start = time.perf_counter()
        report = distill([doc], Path(tmp) / "out", cfg, quiet, dry_run=False)
        return report["requests"]["sent"], time.perf_counter() - start


def chunking(pages: int, model: str | None) -> list[tuple[str, int, int, float]]:
    """(counter, characters, chunks, seconds) for each token counter."""
    text = rules_document(pages)
    counters = [("estimate", estimate_tokens)]
    if model:
        counters.append((f"tokenizer {model}", token_counter(model)[0]))
    out = []
    for name, count in counters:
        start = time.perf_counter()
        chunks = chunk_document(text, "rules.md", 512, count)
        out.append((name, len(text), len(chunks), time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16, help="chunks in the throughput doc")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--model", help="model folder whose tokenizer counts (default: tiny)")
    args = parser.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    rates = {}
    for concurrency in (1, 8):
        sent, seconds = throughput(args.chunks, concurrency, args.latency)
        rates[concurrency] = sent / seconds
        print(
            f"concurrency {concurrency}: {sent} requests in {seconds:.2f} s = "
            f"{rates[concurrency]:.2f} requests/s"
        )
    print(f"speed-up 8 vs 1: {rates[8] / rates[1]:.2f}× (target ≥ 6×)")
    model = args.model
    if model is None:
        from qwen_mlx.tiny import build_tiny_model

        model = str(Path(tempfile.mkdtemp()) / "tiny")
        build_tiny_model(Path(model))
    for name, chars, n, seconds in chunking(args.pages, model):
        print(
            f"chunking {args.pages} pages ({chars} characters) with {name}: {n} chunks in "
            f"{seconds:.2f} s (target < 10 s)"
        )


if __name__ == "__main__":
    main()
