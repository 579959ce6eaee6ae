"""``data distill`` from start to end: read, chunk, (plan), ask, curate, write.

Writes into OUT_DIR: ``ledger.jsonl`` (every teacher reply, as it arrives),
``chunks.jsonl``, ``train.jsonl`` and ``test.jsonl`` (the seed's instruction/input/output
plus ``source``), ``report.json`` and ``report.md``. The same documents, settings and
ledger give the same chunks, train and test files, whatever the concurrency and however
often it was stopped (the report counts what this run itself sent).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from qwen_mlx.config import Config
from qwen_mlx.distill import curate, generate
from qwen_mlx.distill.chunking import Chunk, chunk_document, token_counter
from qwen_mlx.distill.documents import read_documents
from qwen_mlx.distill.ledger import folder_lock
from qwen_mlx.distill.progress import distill_progress
from qwen_mlx.distill.prompts import load_prompts
from qwen_mlx.distill.report import require_records, settings, write_report
from qwen_mlx.distill.teacher import Stopped, Teacher
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors, write_jsonl
from qwen_mlx.outputs import claim_files, holds_input, record_files, writing

COMMAND = "data distill"
OUTPUTS = ("chunks.jsonl", "train.jsonl", "test.jsonl", "report.json", "report.md")
LEDGER = "ledger.jsonl"  # appended to while the teacher answers: never "edited"
# Rough completion sizes for --plan: a list of questions, an answer, a verdict (tokens).
EST_QUESTION, EST_ANSWER, EST_VERDICT, EST_OVERHEAD = 40, 150, 30, 150


@dataclass
class Corpus:
    documents: list[dict]
    chunks: list[Chunk]
    problems: list[str]


def read_corpus(docs: list[Path], cfg: Config, console: Console) -> Corpus:
    """Every readable document cut into chunks; unreadable ones listed, not fatal."""
    documents, problems = read_documents(docs)
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    count, note = token_counter(cfg.model.path)
    if note:
        console.print(note, highlight=False)
    chunks, rows = [], []
    for doc in documents:
        found = chunk_document(doc.text, str(doc.path), cfg.distill.chunk_tokens, count)
        rows.append({"file": str(doc.path), "characters": len(doc.text), "chunks": len(found)})
        chunks += found
    return Corpus(rows, chunks, problems)


def plan(corpus: Corpus, cfg: Config) -> dict:
    """What a run would send: requests and tokens, estimated (nothing is sent)."""
    n = cfg.distill.questions_per_chunk
    followups = round(len(corpus.chunks) * n * cfg.distill.followup_ratio)
    per_chunk = 1 + 2 * n  # questions, then an answer and a verdict for each
    chunk_tokens = sum(c.tokens for c in corpus.chunks)
    mean_chunk = chunk_tokens / max(len(corpus.chunks), 1)
    return {
        "documents": corpus.documents,
        "unreadable": corpus.problems,
        "chunks": len(corpus.chunks),
        "chunk_tokens": chunk_tokens,
        # each follow-up: its question, answer and verdict
        "requests": len(corpus.chunks) * per_chunk + 3 * followups,
        "prompt_tokens": round(
            (chunk_tokens + EST_OVERHEAD) * per_chunk + 3 * followups * (mean_chunk + EST_OVERHEAD)
        ),
        "completion_tokens": (len(corpus.chunks) * n + followups)
        * (EST_QUESTION + EST_ANSWER + EST_VERDICT),
    }


def _record(c: generate.Candidate) -> dict:
    source = {"file": c.chunk.source, "heading": c.chunk.heading, "chunk": c.chunk.id}
    record = {"instruction": c.question, "input": c.context, "output": c.answer}
    if c.parent is not None:
        record["history"] = [[generate.user_turn(c.parent), c.parent.answer]]
    return {**record, "source": source}


class Drops(Counter):
    """Drops by reason, counted from the worker threads."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self[reason] += n


def _survivors(cands: list, drops: Drops) -> list:
    for c in cands:
        if c.drop:
            drops.add(c.drop)
    return [c for c in cands if not c.drop]


def _dedupe(cands: list, drops: Drops) -> list:
    gone = set(curate.near_duplicates([c.question for c in cands]))
    if gone:
        drops.add("near_duplicate", len(gone))
    return [c for i, c in enumerate(cands) if i not in gone]


def _distil(corpus: Corpus, cfg: Config, teacher: Teacher, drops: Drops, bar) -> list:
    d = cfg.distill
    asker = generate.Asker(teacher, load_prompts(d.prompts), d.concurrency)
    bar.stage("questions", len(corpus.chunks))
    cands = generate.ask_questions(asker, corpus.chunks, d.questions_per_chunk, drops.add)
    cands = _dedupe(cands, drops)  # before answering: a duplicate costs no more requests
    kept = _answered(asker, cands, drops, bar, "")
    parents = [c for c in kept if curate.chosen(c.question, d.followup_ratio, cfg.training.seed)]
    bar.stage("follow-ups", len(parents))
    followups = generate.ask_followups(asker, parents, drops.add)
    followups = _dedupe(kept + followups, drops)[len(kept) :]  # kept ones are distinct already
    return kept + _answered(asker, followups, drops, bar, " (follow-ups)")


def _answered(asker, cands: list, drops: Drops, bar, label: str) -> list:
    """Answer and check each candidate; the ones that pass."""
    bar.stage(f"answers{label}", len(cands))
    generate.ask_answers(asker, cands, curate.answer_problem)
    cands = _survivors(cands, drops)
    bar.stage(f"grounding{label}", len(cands))
    generate.ask_verdicts(asker, cands)
    return _survivors(cands, drops)


def claim_output(out_dir: Path, docs: list[Path]) -> None:
    """Refuse an -o that would replace a file we did not write (or one edited since), or
    that holds the documents (the next run would read its own outputs as rules)."""
    given = holds_input(out_dir, docs)
    if given is not None:
        raise UserError(f"{out_dir} holds the document {given}; choose another -o folder")
    claim_files(out_dir, COMMAND, (*OUTPUTS, LEDGER), inputs=docs)


def open_teacher(cfg: Config, out_dir: Path, docs: list[Path]) -> Teacher:
    """The teacher, checked (URL, key, model, output folder, prompts) before any work."""
    d = cfg.distill
    if not (d.teacher_url and d.teacher_model):
        raise UserError(
            "name the teacher: --teacher-url URL --teacher-model NAME "
            "(or distill.teacher_url / teacher_model in config.yaml)"
        )
    claim_output(out_dir, docs)
    load_prompts(d.prompts)
    teacher = Teacher(
        d.teacher_url,
        d.teacher_model,
        d.api_key_env,
        out_dir / LEDGER,
        timeout=d.timeout,
        max_requests=d.max_requests,
    )
    teacher.probe()
    return teacher


def distill(docs: list[Path], out_dir: Path, cfg: Config, console: Console, dry_run: bool):
    """Run (or with ``dry_run`` only plan) a distillation; return the report dict."""
    teacher = None if dry_run else open_teacher(cfg, out_dir, docs)
    corpus = read_corpus(docs, cfg, console)
    estimate = plan(corpus, cfg)
    if dry_run:
        return estimate
    with disk_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        record_files(out_dir, COMMAND, [], grows=[LEDGER])
    with folder_lock(out_dir, COMMAND):  # before the ledger is read: one run per folder
        kept, drops = _distil_stoppable(corpus, cfg, teacher, console)
        report = _write(out_dir, Outcome(corpus, kept, drops, estimate), cfg, teacher)
    require_records(report, out_dir)
    return report


def _distil_stoppable(corpus: Corpus, cfg: Config, teacher: Teacher, console: Console):
    """The records' candidates and drops, or Stopped (exit 130) on Ctrl-C, replies kept."""
    drops = Drops()
    try:
        with distill_progress(teacher, drops, console) as bar:
            return _distil(corpus, cfg, teacher, drops, bar), drops
    except KeyboardInterrupt:
        teacher.close()  # the count below is the ledger's final one
        raise Stopped(
            f"stopped: the {len(teacher.ledger)} replies so far are kept in "
            f"{teacher.ledger.path}; run the same command again to go on (nothing is asked twice)"
        ) from None


def _split(kept: list, cfg: Config) -> tuple[list[dict], list[dict]]:
    """Train and test records; a follow-up goes where its first turn went."""
    firsts = [c for c in kept if c.parent is None]
    picked = curate.split(len(firsts), cfg.distill.test_ratio, cfg.training.seed)
    in_test = {id(c) for i, c in enumerate(firsts) if i in picked}
    train, test = [], []
    for c in kept:
        (test if id(c.parent or c) in in_test else train).append(_record(c))
    return train, test


@dataclass
class Outcome:
    """What a run came to: the documents' chunks, the candidates kept, the drops by reason,
    and the request estimate it started from."""

    corpus: Corpus
    kept: list
    drops: Drops
    estimate: dict


def _write(out_dir: Path, outcome: Outcome, cfg: Config, teacher: Teacher) -> dict:
    train, test = _split(outcome.kept, cfg)
    with writing(out_dir, COMMAND, OUTPUTS):
        write_jsonl(out_dir / "chunks.jsonl", (asdict(c) for c in outcome.corpus.chunks))
        write_jsonl(out_dir / "train.jsonl", train)
        write_jsonl(out_dir / "test.jsonl", test)
        report = _report(outcome, cfg, teacher, {"train": len(train), "test": len(test)})
        write_report(out_dir, report)
    return report


def _report(outcome: Outcome, cfg: Config, teacher: Teacher, records: dict[str, int]) -> dict:
    corpus = outcome.corpus
    return {
        "teacher": {"url": teacher.url, "model": teacher.model},
        "documents": corpus.documents,
        "unreadable": corpus.problems,
        "chunks": len(corpus.chunks),
        "planned_requests": outcome.estimate["requests"],
        "requests": teacher.usage.as_dict(),  # this run's; the ledger holds every run's
        "ledger_replies": len(teacher.ledger),
        "records": records,
        "drops": dict(sorted(outcome.drops.items())),
        "settings": settings(cfg.distill),
    }
