"""``qwen-mlx eval``: how well does the trained model answer held-out questions?

For the tuned model (and, with ``--compare-base``, the base model): test loss and
perplexity on the assistant tokens, and a greedy answer to every test question scored
against the reference with character-level ROUGE-L and BLEU-4 (:mod:`text_metrics`).
``--gguf FILE`` answers with an exported GGUF instead, to confirm it behaves like the run.
Beside them, the "answers that hold" figures (:mod:`holds`, :mod:`drift`): in-domain scores
on answerable and on unseen-wording questions, the refusal rate on questions the rules do not
answer, and the tuned model's general drift from its base. Everything lands in
``<run>/eval/`` (``<run>/eval-gguf/`` for a GGUF): ``answers.jsonl`` (every answer and its
scores, so the numbers can be recomputed), ``summary.json``, ``report.md`` and a
self-contained ``report.html`` (:mod:`pages`: loss curve + side-by-side table).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import track
from rich.table import Table

from qwen_mlx.backends.base import GenerationSettings
from qwen_mlx.data import load_records
from qwen_mlx.errors import UserError
from qwen_mlx.eval import holds
from qwen_mlx.eval.drift import HIGH_DRIFT, HIGH_DRIFT_FIX, Drift, general_drift
from qwen_mlx.eval.judge import JudgeSettings, grade, open_judge, passages, stopped
from qwen_mlx.eval.judge import summary as judge_summary
from qwen_mlx.eval.pages import holds_table, summary_table, write_reports
from qwen_mlx.eval.preference import (
    Preference,
    pair_samples,
    preference_accuracy,
    reference_adapter,
    reference_log_probs,
)
from qwen_mlx.eval.text_metrics import bleu4, rouge_l, score_answers
from qwen_mlx.fsutil import write_json, write_jsonl
from qwen_mlx.inference import Engine, GGUFEngine, answer_all, open_engine
from qwen_mlx.reasoning import split_reply


@dataclass
class Case:
    prompt: list[dict[str, str]]  # the conversation up to the last answer
    reference: str
    record: dict
    where: str = ""  # file:line, to find a distilled record's source passage


@dataclass
class ModelResult:
    label: str
    description: str
    answers: list[str] = field(default_factory=list)
    verdicts: list[tuple[str, str]] = field(default_factory=list)  # judge: (grade, reason)
    test_loss: float | None = None
    seconds: float = 0.0
    drift: Drift | None = None  # the tuned model's general drift from its base
    preference: Preference | None = None  # the tuned model's, on held-out pairs

    def summary(self, cases: list[Case], trained: set[str] | None) -> dict[str, Any]:
        pairs = list(zip(self.answers, (c.reference for c in cases), strict=True))
        judged = {"judge": judge_summary([g for g, _ in self.verdicts])} if self.verdicts else {}
        drift = {"general_drift": self.drift.as_dict()} if self.drift else {}
        if self.preference:
            drift["preference"] = self.preference.as_dict()
        return {
            "model": self.description,
            "test_loss": self.test_loss,
            "perplexity": math.exp(min(self.test_loss, 50)) if self.test_loss is not None else None,
            **score_answers(pairs),
            "answers": len(pairs),
            "seconds": round(self.seconds, 2),
            **judged,
            **holds.summary(cases, self.answers, self.verdicts, trained),
            **drift,
        }


def load_cases(path: Path, limit: int | None, system_prompt: str | None = None) -> list[Case]:
    """The question/answer records of ``path`` (``system_prompt`` added where one has none,
    as training adds ``data.system_prompt``), the first ``limit`` of them; a preference
    pair's question with its chosen answer as the reference."""
    records, report = load_records([path], system_prompt=system_prompt, from_preferences=True)
    cases = [
        Case(r.data["messages"][:-1], r.data["messages"][-1]["content"], r.data, r.source)
        for r in records
        if "messages" in r.data
    ]
    if not cases:
        raise UserError(f"{path}: no question/answer records to evaluate ({report.summary()})")
    return cases[:limit] if limit else cases


def _holds_pairs(path: Path) -> bool:
    """Whether a test file holds preference pairs (then eval measures preference accuracy
    on them too)."""
    from qwen_mlx.data import read_raw
    from qwen_mlx.data_prefs import preference_kind

    return any(preference_kind(obj) == "pair" for _, obj in read_raw(path))


def test_data(source, run_dir: Path | None, data: Path | None) -> Path:
    """--data, else the test split the run recorded, else the config's test/valid files."""
    candidates = [data] if data else []
    if run_dir is not None:
        candidates += [run_dir / "data" / "test.jsonl"]
    if source.run_config is not None and source.run_config.data.test_file:
        candidates.append(Path(source.run_config.data.test_file))
    if run_dir is not None:
        candidates.append(run_dir / "data" / "valid.jsonl")
    for path in candidates:
        if path and Path(path).is_file() and Path(path).stat().st_size > 0:
            return Path(path)
    if data:
        raise UserError(f"test data not found: {data}")
    raise UserError("no test data: pass --data FILE (e.g. data/报销细则_test.jsonl)")


def _score(engine: Engine, cases: list[Case], max_seq_length: int) -> float | None:
    from qwen_mlx.tokens import encode_records

    if engine.tokenizer is None:  # a GGUF: scored on its answers only
        return None
    samples, _ = encode_records(engine.tokenizer, [c.record for c in cases], max_seq_length)
    total, count = engine.score(samples)
    return total / max(count, 1)


def run_model(
    engine: Engine,
    label: str,
    cases: list[Case],
    max_tokens: int,
    max_len: int,
    batch_size: int | None = None,
):
    """Test loss and a greedy answer to every case, ``batch_size`` questions answered together
    (None: as many as fit, :func:`qwen_mlx.inference.fitting_batch_size`)."""
    result = ModelResult(label, engine.description)
    start = time.perf_counter()
    result.test_loss = _score(engine, cases, max_len)
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    replies = answer_all(engine, [c.prompt for c in cases], settings, batch_size)
    answers = [""] * len(cases)
    for i, reply in track(
        replies, total=len(cases), description=f"answering ({label})", transient=True
    ):
        answers[i] = split_reply(reply.text, engine.family.think_tags)[1].strip()  # no think
    result.answers = answers
    result.seconds = time.perf_counter() - start
    return result


def evaluate(
    run_or_adapter: Path,
    data: Path | None = None,
    *,
    compare_base: bool = False,
    gguf: Path | None = None,
    backend: str = "auto",
    max_tokens: int = 256,
    limit: int | None = None,
    judge: JudgeSettings | None = None,
    general: Path | None = None,
    general_prompts: int = 40,
    batch_size: int | None = None,
    pairs: Path | None = None,
    console: Console,
) -> Path:
    """Evaluate and write the report; return the report folder. ``pairs``: held-out
    preference pairs to measure preference accuracy on (else the test file's own pairs)."""
    from qwen_mlx.adapters import resolve_source

    source = resolve_source(run_or_adapter, None)
    run_dir = _run_dir(Path(run_or_adapter), source)
    # A GGUF report goes beside the run's own, so the two can be compared.
    out_dir = run_dir / ("eval-gguf" if gguf else "eval")
    if pairs is not None and gguf is not None:
        raise UserError(
            "--pairs needs the run's adapter (the reference is the base): not with --gguf"
        )
    judge_teacher = open_judge(judge, out_dir) if judge else None  # fail before answering
    data = test_data(source, run_dir, data)
    cases = load_cases(data, limit, source.system_prompt)  # as training asked (data.system_prompt)
    pairs = pairs or (data if _holds_pairs(data) and gguf is None else None)
    max_len = source.run_config.training.max_seq_length if source.run_config else 2048
    console.print(f"evaluating on {len(cases)} questions", highlight=False)
    reference = _dpo_reference(pairs, max_len, source.run_config, backend, console)
    tuned_engine = GGUFEngine(gguf) if gguf else open_engine(run_or_adapter, backend=backend)
    tuned_engine.thinking = source.thinking  # a GGUF is prompted as the run was trained too
    results = [run_model(tuned_engine, "tuned", cases, max_tokens, max_len, batch_size)]
    results[0].drift = general_drift(
        tuned_engine, general, general_prompts, max_tokens, max_len, batch_size
    )
    _warn_drift(results[0].drift, console)
    if pairs is not None:
        results[0].preference = preference_accuracy(
            tuned_engine, pairs, max_len, source.run_config, reference
        )
    del tuned_engine
    gc.collect()
    if compare_base:
        base = open_engine(None, model=source.model_dir, backend=backend)
        base.thinking = source.thinking  # asked the same way as the tuned model
        results.insert(0, run_model(base, "base", cases, max_tokens, max_len, batch_size))
    if judge_teacher is not None:
        try:
            _judge(judge_teacher, judge.concurrency, data, cases, results)
        except KeyboardInterrupt:
            raise stopped(judge_teacher) from None  # exit 130 in one line, verdicts kept
    train_file = source.run_config.data.train_file if source.run_config else None
    summary = _write(out_dir, cases, results, run_dir, holds.trained_questions(train_file))
    print_summary(summary, console)
    console.print(f"[green]✓[/] report: {out_dir / 'report.html'}", highlight=False)
    return out_dir


def _dpo_reference(pairs: Path | None, max_len: int, run_config, backend: str, console: Console):
    """π_ref's log-probs of the pairs when the run is DPO from an adapter (its reference in
    training was that adapter, not the base), from an engine loaded and freed before the
    tuned one, so two models are never in memory at once; None: the reference is the base."""
    folder = reference_adapter(run_config) if pairs is not None else None
    if folder is None:
        return None
    if not folder.is_dir():
        console.print(
            f"[yellow]⚠[/] {folder} (the adapter DPO started from, its reference) is gone; "
            "preference accuracy is measured against the base instead",
            highlight=False,
        )
        return None
    engine = open_engine(folder, backend=backend)
    samples, _ = pair_samples(engine.tokenizer, pairs, max_len, run_config)
    logps = reference_log_probs(engine, samples)
    del engine
    gc.collect()
    return logps


def _judge(teacher, concurrency: int, data: Path, cases: list[Case], results) -> None:
    """The judge's (grade, reason) for every answer of every model."""
    sources = passages(data, [c.where for c in cases])
    for result in results:
        items = [
            (c.prompt[-1]["content"], c.reference, p, a)
            for c, p, a in zip(cases, sources, result.answers, strict=True)
        ]
        result.verdicts = grade(teacher, items, concurrency)


def _run_dir(path: Path, source) -> Path:
    if (path / "adapter").is_dir():
        return path
    return source.adapter.path.parent if source.adapter else path


def _warn_drift(drift: Drift | None, console: Console) -> None:
    if drift is not None and drift.kl_per_token > HIGH_DRIFT:
        console.print(
            f"[yellow]⚠[/] general drift {drift.kl_per_token:.3f} nats/token from the base "
            f"(over {HIGH_DRIFT}): the model is forgetting general ability; {HIGH_DRIFT_FIX}",
            highlight=False,
        )


def _write(
    out_dir: Path,
    cases: list[Case],
    results: list[ModelResult],
    run_dir: Path,
    trained: set[str] | None,
) -> dict:
    rows = []
    for i, case in enumerate(cases):
        row = {"question": case.prompt[-1]["content"], "reference": case.reference}
        # the whole conversation asked (system turn, earlier turns), so a grader's correction
        # becomes a training record of the same conversation (review's --from-grades)
        row["prompt"] = case.prompt
        for result in results:
            answer = result.answers[i]
            row[result.label] = answer
            row[f"{result.label}_rouge_l"] = rouge_l(answer, case.reference)
            row[f"{result.label}_bleu4"] = bleu4(answer, case.reference)
            if result.verdicts:
                row[f"{result.label}_judge"], row[f"{result.label}_judge_reason"] = result.verdicts[
                    i
                ]
        rows.append(row)
    summary = {r.label: r.summary(cases, trained) for r in results}
    write_jsonl(out_dir / "answers.jsonl", rows)
    write_json(out_dir / "summary.json", summary)
    write_reports(out_dir, summary, rows, [r.label for r in results], run_dir / "metrics.jsonl")
    return summary


def print_summary(summary: dict, console: Console) -> None:
    head, rows = summary_table(summary)
    table = Table(title="evaluation")
    for i, column in enumerate(head[:-1]):  # the engine is in the report
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row[:-1])
    console.print(table)
    head, rows = holds_table(summary)
    table = Table(title="answers that hold")
    for i, column in enumerate(head):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for label, scores in summary.items():
        if scores.get("preference"):
            console.print(preference_line(label, scores["preference"]), highlight=False)


def preference_line(label: str, preference: dict) -> str:
    """The preference figures of one model, in one line."""
    skipped = preference["skipped"]
    left_out = f"; {skipped} longer than max_seq_length left out" if skipped else ""
    return (
        f"preference accuracy ({label}): {preference['accuracy']:.1f}% of "
        f"{preference['pairs']} held-out pairs, reward margin {preference['reward_margin']:.4f} "
        f"(β={preference['beta']:g}; log-ratio margin {preference['margin']:.4f} nats; "
        f"reference: {preference.get('reference', 'base')}){left_out}"
    )
