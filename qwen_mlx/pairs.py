"""``qwen-mlx data pairs``: preference pairs from the tuned model's own wrong answers.

DPO on pairs whose preferred answer is the grounded one and whose rejected answer is the
model's own wrong one cuts invented facts well beyond SFT alone ("Fine-tuning Language Models
for Factuality", Tian et al., 2023). The tuned model of a run answers every question of a data
file (greedy, in batches, as ``eval`` answers; each answer kept as it arrives by
:mod:`qwen_mlx.answer_log`, so Ctrl-C or a crash loses at most the batch under way), then each
answer is sorted (:func:`classify`):

- with a judge (eval's, :mod:`qwen_mlx.eval.judge`: the same client, retries, ledger and
  Ctrl-C): an answer graded wrong, or partly right, makes a pair (reference = chosen, the
  model's answer = rejected: the reference has every key point, the answer misses some);
  graded correct, no pair; no usable verdict, no pair (a request that failed is asked again
  on a rerun);
- without one: an answer whose character ROUGE-L F1 against the reference is below
  ``threshold`` (default :data:`DEFAULT_THRESHOLD`) makes a pair;
- a question the rules do not answer (``kind: unanswerable``): an answer that is not a refusal
  (the judge's ``correct`` against the refusal reference, else
  :func:`qwen_mlx.eval.refusals.is_refusal`, as eval counts refusals) makes a pair: the
  reference refusal = chosen, the invented answer = rejected.

Each pair is a line of TRL's conversational preference format, ``{"prompt": [messages, the
system turn included], "chosen": [assistant turn], "rejected": [assistant turn]}``, with
``kind``, ``reason`` and ``source`` beside it. The file is written whole (temp name, then
rename) once every answer is sorted; a rerun reuses the answers and the judge's verdicts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress

from qwen_mlx.answer_log import (
    answer_key,
    answer_logged,
    progress_path,
    publish,
    read_progress,
)
from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.outputs import claim_files, record_files

if TYPE_CHECKING:  # the command line reads the default threshold without loading eval
    from qwen_mlx.eval.judge import JudgeSettings

COMMAND = "data pairs"
# Character ROUGE-L F1 (as a fraction) below which an answer counts as wrong without a judge.
# Under 0.4, less than ~40% of the reference's characters come back in order: a different
# answer rather than the same one reworded (a correct paraphrase of a short Chinese rule
# answer keeps most of its amounts, terms and characters). A judge tells meaning apart far
# better; the threshold is the fallback.
DEFAULT_THRESHOLD = 0.4

# Why an answer did or did not make a pair.
JUDGED_WRONG = "judged_wrong"
JUDGED_PARTLY = "judged_partly"
LOW_ROUGE_L = "low_rouge_l"
INVENTED = "invented_answer"
CORRECT = "correct"
REFUSED = "refused"
NO_VERDICT = "no_verdict"
EMPTY = "empty_answer"
PAIRED = (JUDGED_WRONG, JUDGED_PARTLY, LOW_ROUGE_L, INVENTED)
REASONS = {
    JUDGED_WRONG: "wrong per the judge",
    JUDGED_PARTLY: "partly right per the judge",
    LOW_ROUGE_L: "ROUGE-L below the threshold",
    INVENTED: "invented answer to an unanswerable question",
    CORRECT: "kept as correct (no pair)",
    REFUSED: "refused an unanswerable question, as it should (no pair)",
    NO_VERDICT: "no verdict from the judge (no pair)",
    EMPTY: "empty answer (no pair)",
}
_BY_GRADE = {"correct": CORRECT, "partly": JUDGED_PARTLY, "wrong": JUDGED_WRONG}


@dataclass
class PairsResult:
    out: Path
    counts: Counter  # answers by reason (REASONS)
    questions: int
    reused: int  # answers found in the progress file of an earlier, interrupted run
    notes: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(self.counts[reason] for reason in PAIRED)


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def classify(
    kind: str | None, reference: str, answer: str, grade: str | None, threshold: float
) -> str:
    """Why ``answer`` makes a pair with ``reference`` or not (a key of :data:`REASONS`);
    ``grade``: the judge's (None without a judge)."""
    from qwen_mlx.eval.holds import UNANSWERABLE
    from qwen_mlx.eval.refusals import is_refusal
    from qwen_mlx.eval.text_metrics import rouge_l

    unanswerable = kind == UNANSWERABLE
    if not answer.strip():
        return EMPTY  # nothing to reject (and an empty turn is not a valid record)
    if _same(answer, reference):  # chosen and rejected would be the same
        return REFUSED if unanswerable else CORRECT
    if grade == "failed":
        return NO_VERDICT
    if unanswerable:
        refused = grade == "correct" if grade is not None else is_refusal(answer)
        return REFUSED if refused else INVENTED
    if grade is not None:
        return _BY_GRADE[grade]
    return CORRECT if rouge_l(answer, reference) / 100 >= threshold else LOW_ROUGE_L


def _pair(case, answer: dict, reason: str, model: str, extra: dict[str, Any]) -> dict:
    """One line of TRL's conversational preference format, with where it came from
    (``answer``: the progress entry of the model's answer)."""
    source = {"record": case.where, "model": model, "cut_off": answer["cut_off"], **extra}
    if case.record.get("source") is not None:
        source["record_source"] = case.record["source"]
    return {
        "prompt": case.prompt,
        "chosen": [{"role": "assistant", "content": case.reference}],
        "rejected": [{"role": "assistant", "content": answer["answer"]}],
        "kind": case.record.get("kind") or "answerable",
        "reason": reason,
        "source": source,
    }


def _fingerprint(run: Path, source) -> list:
    """What the tuned model is: the run and its adapter files' sizes and times (a retrained
    adapter answers anew)."""
    files = (
        sorted(p for p in source.adapter.path.iterdir() if p.is_file()) if source.adapter else []
    )
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return [str(Path(run).resolve()), str(source.model_dir.resolve()), stats]


def judge_ledger_name(out: Path) -> str:
    """The judge's ledger beside ``out`` (one per output, so two outputs never share one)."""
    return f"{out.stem}.judge_ledger.jsonl"


def make_pairs(
    run: Path,
    data: Path,
    out: Path,
    *,
    judge: JudgeSettings | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    settings: GenerationSettings | None = None,
    backend: str = "auto",
    batch_size: int | None = None,
    console: Console,
) -> PairsResult:
    """The tuned model of ``run`` answers the questions of ``data``; its wrong answers become
    preference pairs written to ``out``."""
    from qwen_mlx.adapters import resolve_source
    from qwen_mlx.eval.evaluate import load_cases
    from qwen_mlx.eval.judge import open_judge

    settings = settings or GenerationSettings(max_tokens=512, temperature=0.0)
    source = resolve_source(run, None)
    cases = load_cases(data, None, source.system_prompt)
    progress = progress_path(out)
    ledger = judge_ledger_name(out) if judge else None
    names = [out.name, progress.name, *([ledger] if ledger else [])]
    claim_files(out.parent, COMMAND, names, [run, data])
    teacher = None
    if judge is not None:
        record_files(out.parent, COMMAND, [], grows=[ledger])
        teacher = open_judge(judge, out.parent, ledger)  # fail before answering
    fingerprint = _fingerprint(run, source)
    what = (settings.max_tokens, settings.temperature)
    keys = [answer_key(fingerprint, *what, c.prompt) for c in cases]
    done = read_progress(progress)
    todo = list({k: c.prompt for k, c in zip(keys, cases, strict=True) if k not in done}.items())
    reused = len({*keys}) - len(todo)
    if todo:
        _answer(run, backend, todo, (settings, batch_size), progress, console)
        done = read_progress(progress)
    entries = [done[k] for k in keys]
    answers = [e["answer"] for e in entries]
    grades = _grades(teacher, judge, data, cases, answers, console) if teacher else None
    records, counts = _sort(cases, entries, grades, threshold, Path(run).name)
    publish(out, COMMAND, records, progress)
    cut_off = sum(r["source"]["cut_off"] for r in records)
    return PairsResult(out, counts, len(cases), reused, _notes(cut_off, counts, settings))


def _sort(cases, entries: list[dict], grades, threshold: float, model: str):
    """The pairs the answers (progress ``entries``) make, and the answers by reason."""
    from qwen_mlx.eval.text_metrics import rouge_l

    records, counts = [], Counter()
    for i, (case, entry) in enumerate(zip(cases, entries, strict=True)):
        grade, why = grades[i] if grades else (None, None)
        answer = entry["answer"]
        reason = classify(case.record.get("kind"), case.reference, answer, grade, threshold)
        counts[reason] += 1
        if reason in PAIRED:
            extra = {"judge": grade, "judge_reason": why} if grades else {}
            if not grades and reason == LOW_ROUGE_L:
                extra = {"rouge_l": round(rouge_l(answer, case.reference) / 100, 4)}
            records.append(_pair(case, entry, reason, model, extra))
    return records, counts


def _answer(run: Path, backend: str, todo, how, progress: Path, console: Console) -> None:
    """The tuned model's answer to each ``(key, prompt)`` of ``todo``, into ``progress``."""
    from qwen_mlx.inference import open_engine
    from qwen_mlx.reasoning import split_reply

    engine = open_engine(run, backend=backend)

    def entry(_: int, reply) -> dict:
        answer = split_reply(reply.text, engine.family.think_tags)[1].strip()  # no think block
        return {"answer": answer, "cut_off": reply.finish_reason == "length"}

    answer_logged(engine, todo, how, progress, entry, console, COMMAND)


def _grades(teacher, judge: JudgeSettings, data: Path, cases, answers, console) -> list:
    """The judge's ``(grade, reason)`` of every answer (an empty one is not asked about)."""
    from qwen_mlx.eval.judge import grade, passages, stopped

    sources = passages(data, [c.where for c in cases])
    asked = [i for i, a in enumerate(answers) if a.strip()]
    items = [
        (cases[i].prompt[-1]["content"], cases[i].reference, sources[i], answers[i]) for i in asked
    ]
    out: list = [(None, None)] * len(cases)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("judging", total=len(items))
            verdicts = grade(teacher, items, judge.concurrency, lambda: bar.advance(task))
    except KeyboardInterrupt:
        raise stopped(teacher) from None  # exit 130 in one line, verdicts kept
    for i, verdict in zip(asked, verdicts, strict=True):
        out[i] = verdict
    return out


def _notes(cut_off: int, counts: Counter, settings: GenerationSettings) -> list[str]:
    notes = []
    if cut_off:
        notes.append(
            f"{cut_off} rejected answers reached --max-tokens {settings.max_tokens} and are kept "
            "cut off (still wrong); raise --max-tokens to reject whole answers"
        )
    if counts[NO_VERDICT]:
        notes.append(
            f"{counts[NO_VERDICT]} answers got no verdict from the judge; run the same command "
            "again to ask again where the request failed (a reply without a grade is kept in "
            "the judge's ledger)"
        )
    return notes
