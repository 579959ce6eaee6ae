"""``data distill`` from start to end: read, chunk, (plan), ask, curate, write.

Writes into OUT_DIR: ``ledger.jsonl`` (every teacher reply, as it arrives),
``chunks.jsonl``, ``train.jsonl`` and ``test.jsonl`` (the seed's instruction/input/output
plus ``kind`` and ``source``, with its cluster), ``report.json`` and ``report.md``, and the
same records for LLaMA-Factory (``dataset_info.json``) and mlx-lm (``chat/``:
:mod:`~qwen_mlx.distill.exports`). The
stages themselves are in :mod:`~qwen_mlx.distill.pipeline`. The same documents, settings and
ledger give the same chunks, train and test files, whatever the concurrency and however
often it was stopped (the report counts what this run itself sent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from qwen_mlx.config import Config
from qwen_mlx.distill import curate
from qwen_mlx.distill.chunking import Chunk, chunk_document, token_counter
from qwen_mlx.distill.dashboard import distill_progress
from qwen_mlx.distill.documents import read_documents
from qwen_mlx.distill.exports import CHAT_FILES, DATASET_INFO, chat_copies, dataset_info
from qwen_mlx.distill.generate import Candidate, user_turn
from qwen_mlx.distill.ledger import folder_lock
from qwen_mlx.distill.pipeline import CHECK_PASSAGES, Distilled, Drops, Pipeline
from qwen_mlx.distill.prompts import load_prompts
from qwen_mlx.distill.report import (
    cluster_summary,
    require_records,
    settings,
    tally,
    write_report,
)
from qwen_mlx.distill.teacher import Stopped, Teacher
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors, write_json, write_jsonl
from qwen_mlx.outputs import claim_files, holds_input, record_files, writing

COMMAND = "data distill"
OUTPUTS = ("chunks.jsonl", "train.jsonl", "test.jsonl", "report.json", "report.md")
# The same records for LLaMA-Factory and mlx-lm (an empty split's chat file is not written).
FOR_OTHERS = (DATASET_INFO, *CHAT_FILES)
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
    """What a run would send: requests and tokens, estimated (nothing is sent).

    Exact when nothing is dropped and no questions merge into clusters; follow-ups are the
    seeded share of the questions, paraphrases are asked for the training share."""
    d, chunks = cfg.distill, len(corpus.chunks)
    asked = chunks * d.questions_per_chunk
    open_ = curate.spread(chunks, d.unanswerable_ratio * d.questions_per_chunk)
    originals = asked - curate.held_out(asked, d.test_ratio) if d.paraphrases else 0
    paraphrases = originals * d.paraphrases
    # request kind -> (requests, completion tokens each); prompts are a chunk and overhead
    kinds = {
        "questions": (chunks, d.questions_per_chunk * EST_QUESTION),
        "answers": (asked, EST_ANSWER),
        "grounding": (asked, EST_VERDICT),
        "follow-ups": (3 * round(asked * d.followup_ratio), EST_QUESTION + EST_ANSWER),
        "unanswerable": (sum(n > 0 for n in open_), 2 * EST_QUESTION),
        "unanswerable checks": (sum(open_), EST_VERDICT),
        "paraphrases": (originals, d.paraphrases * EST_QUESTION),
        "paraphrase answers": (paraphrases, EST_ANSWER),
        "paraphrase grounding": (paraphrases, EST_VERDICT),
    }
    chunk_tokens = sum(c.tokens for c in corpus.chunks)
    prompt = chunk_tokens / max(chunks, 1) + EST_OVERHEAD
    shown = {"unanswerable checks": CHECK_PASSAGES + 1}  # the most similar chunks and its own
    return {
        "documents": corpus.documents,
        "unreadable": corpus.problems,
        "chunks": chunks,
        "chunk_tokens": chunk_tokens,
        "requests": sum(n for n, _ in kinds.values()),
        "requests_by_kind": {k: n for k, (n, _) in kinds.items()},
        "prompt_tokens": round(sum(n * prompt * shown.get(k, 1) for k, (n, _) in kinds.items())),
        "completion_tokens": sum(n * each for n, each in kinds.values()),
    }


def _record(c: Candidate, cluster: int) -> dict:
    source = {"file": c.chunk.source, "heading": c.chunk.heading, "chunk": c.chunk.id}
    source |= {"cluster": cluster, "origin": c.origin}
    if c.of is not None:
        source["rewords"] = c.of.question
    record = {"instruction": c.question, "input": c.context, "output": c.answer}
    if c.parent is not None:
        record["history"] = [[user_turn(c.parent), c.parent.answer]]
    return {**record, "kind": c.kind, "source": source}


def claim_output(out_dir: Path, docs: list[Path]) -> None:
    """Refuse an -o that would replace a file we did not write (or one edited since), or
    that holds the documents (the next run would read its own outputs as rules)."""
    given = holds_input(out_dir, docs)
    if given is not None:
        raise UserError(f"{out_dir} holds the document {given}; choose another -o folder")
    claim_files(out_dir, COMMAND, (*OUTPUTS, *FOR_OTHERS, LEDGER), inputs=docs)


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
        done, drops = _distil_stoppable(corpus, cfg, teacher, console)
        report = _write(out_dir, Outcome(corpus, done, drops, estimate), cfg, teacher)
    require_records(report, out_dir)
    return report


def _distil_stoppable(corpus: Corpus, cfg: Config, teacher: Teacher, console: Console):
    """What the stages kept and the drops, or Stopped (exit 130) on Ctrl-C, replies kept."""
    drops = Drops()
    try:
        with distill_progress(teacher, drops, console) as bar:
            return Pipeline(corpus.chunks, cfg, teacher, drops, bar).run(), drops
    except KeyboardInterrupt:
        teacher.close()  # the count below is the ledger's final one
        raise Stopped(
            f"stopped: the {len(teacher.ledger)} replies so far are kept in "
            f"{teacher.ledger.path}; run the same command again to go on (nothing is asked twice)"
        ) from None


def _split(done: Distilled) -> tuple[list[dict], list[dict]]:
    """Train and test records, whole clusters to one side; clusters renumbered 1, 2, … in
    record order, so the numbers read as the files do."""
    numbers: dict[int, int] = {}
    train, test = [], []
    for c in done.kept:
        cluster = numbers.setdefault(c.cluster, len(numbers) + 1)
        (test if done.in_test(c) else train).append(_record(c, cluster))
    return train, test


@dataclass
class Outcome:
    """What a run came to: the documents' chunks, the candidates kept, the drops by reason,
    and the request estimate it started from."""

    corpus: Corpus
    done: Distilled
    drops: Drops
    estimate: dict


def _write(out_dir: Path, outcome: Outcome, cfg: Config, teacher: Teacher) -> dict:
    train, test = _split(outcome.done)
    if cfg.data.system_prompt:  # the column LLaMA-Factory reads it from (qwen-mlx too)
        for record in train + test:
            record["system"] = cfg.data.system_prompt
    chats = chat_copies({"train": train, "test": test})
    with writing(out_dir, COMMAND, (*OUTPUTS, DATASET_INFO, *chats)):
        write_jsonl(out_dir / "chunks.jsonl", (asdict(c) for c in outcome.corpus.chunks))
        write_jsonl(out_dir / "train.jsonl", train)
        write_jsonl(out_dir / "test.jsonl", test)
        write_json(out_dir / DATASET_INFO, dataset_info({"train": train, "test": test}))
        for name, records in chats.items():
            write_jsonl(out_dir / name, records)
        report = _report(outcome, cfg, teacher, train, test)
        write_report(out_dir, report)
    _forget_stale(out_dir, [name for name in CHAT_FILES if name not in chats])
    return report


def _forget_stale(out_dir: Path, names: list[str]) -> None:
    """An earlier run's chat file of a split that is empty now: removed (claim_output has
    checked it is ours and unedited), so mlx-lm does not read it as this run's."""
    stale = [name for name in names if (out_dir / name).is_file()]
    for name in stale:
        (out_dir / name).unlink()
    if stale:
        record_files(out_dir, COMMAND, [], drop=stale)


def _report(outcome: Outcome, cfg: Config, teacher: Teacher, train: list, test: list) -> dict:
    corpus = outcome.corpus
    return {
        "teacher": {"url": teacher.url, "model": teacher.model},
        "documents": corpus.documents,
        "unreadable": corpus.problems,
        "chunks": len(corpus.chunks),
        "planned_requests": outcome.estimate["requests"],
        "requests": teacher.usage.as_dict(),  # this run's; the ledger holds every run's
        "ledger_replies": len(teacher.ledger),
        "records": {"train": len(train), "test": len(test)},
        "kept": len(train) + len(test),
        "dropped": sum(outcome.drops.values()),
        "by_kind": {"train": tally(train, "kind"), "test": tally(test, "kind")},
        "by_origin": {"train": tally(train, "origin"), "test": tally(test, "origin")},
        "clusters": cluster_summary(train, test),
        "drops": dict(sorted(outcome.drops.items())),
        "settings": settings(cfg.distill),
    }
