"""``eval --judge-url/--judge-model``: a teacher model grades each answer.

For every test question the judge sees the reference answer, the passage the question was
distilled from (when the test file came from ``data distill``: its ``source.chunk`` is
looked up in ``chunks.jsonl`` beside it) and the model's answer, and replies
correct / partly / wrong with a one-line reason. It goes through the distill teacher
(same retries, key handling and ledger: ``<eval dir>/judge_ledger.jsonl``, so a rerun
grades nothing twice). Accuracy is the share graded correct, 0–100, of those graded.
A reason is cut to :data:`REASON_CHARS` before it reaches answers.jsonl and the reports:
it is one line by contract, and a judge's reply is not ours to size. Ctrl-C while the
judge grades (or hangs) stops at once: :func:`stopped` is the one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_mlx.distill.generate import Asker
from qwen_mlx.distill.prompts import language
from qwen_mlx.distill.teacher import Stopped, Teacher
from qwen_mlx.errors import UserError

GRADES = ("correct", "partly", "wrong")
REASON_CHARS = 300  # a sentence, with room; the reports show one per answer
PROMPTS = {
    "zh": (
        "你是严格的阅卷老师。只输出 JSON。",
        "问题：{question}\n参考答案：{reference}\n{passage}待评回答：{answer}\n\n"
        "对照参考答案{basis}评判待评回答：correct（要点都对）、partly（部分对或有遗漏）、"
        'wrong（错误或答非所问）。输出 {{"grade": "correct|partly|wrong", "reason": "一句话理由"}}',
    ),
    "en": (
        "You are a strict grader. Output JSON only.",
        "Question: {question}\nReference answer: {reference}\n{passage}Answer to grade: {answer}"
        "\n\nGrade it against the reference{basis}: correct (all key points right), partly "
        "(partly right or incomplete), wrong (wrong or off the point). Output "
        '{{"grade": "correct|partly|wrong", "reason": "one sentence"}}',
    ),
}
PASSAGE = {"zh": ("材料：{text}\n", "和材料"), "en": ("Passage: {text}\n", " and the passage")}


@dataclass
class JudgeSettings:
    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout: float = 120.0  # seconds per HTTP attempt (the teacher retries)


LEDGER = "judge_ledger.jsonl"


def open_judge(settings: JudgeSettings, out_dir: Path, ledger: str = LEDGER) -> Teacher:
    """The judge, checked (URL, key, model) before any answer is generated; its verdicts are
    kept in ``out_dir / ledger``."""
    teacher = Teacher(
        settings.url,
        settings.model,
        settings.key_env,
        out_dir / ledger,
        timeout=settings.timeout,
        role="judge",
    )
    teacher.probe()
    return teacher


def passages(data: Path, wheres: list[str]) -> list[str | None]:
    """The source passage of each record (``file:line``) of a distilled test file (JSONL,
    with the ``chunks.jsonl`` of ``data distill`` beside it)."""
    chunks_file = data.parent / "chunks.jsonl"
    if data.suffix.lower() != ".jsonl" or not chunks_file.is_file():
        return [None] * len(wheres)
    lines = chunks_file.read_text(encoding="utf-8").splitlines()
    chunks = {c["id"]: c["text"] for c in map(json.loads, lines)}
    rows = data.read_text(encoding="utf-8").splitlines()
    out = []
    for where in wheres:
        lineno = int(where.rsplit(":", 1)[1])
        source = json.loads(rows[lineno - 1]).get("source") or {}
        out.append(chunks.get(source.get("chunk")) if isinstance(source, dict) else None)
    return out


def _messages(question: str, reference: str, passage: str | None, answer: str) -> list[dict]:
    lang = language(question + reference)
    system, user = PROMPTS[lang]
    shown, basis = PASSAGE[lang] if passage else ("", "")
    text = user.format(
        question=question,
        reference=reference,
        answer=answer,
        basis=basis,
        passage=shown.format(text=passage) if passage else "",
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def grade(
    teacher: Teacher,
    items: list[tuple[str, str, str | None, str]],
    concurrency: int,
    graded: Callable[[], None] = lambda: None,
):
    """``(grade, reason)`` for each (question, reference, passage, answer); grade
    ``failed`` when the judge gave no usable verdict. ``graded`` is called after each
    (a progress bar)."""
    asker = Asker(teacher, {}, concurrency)

    def one(item) -> tuple[str, str]:
        try:
            value, reason = asker.ask_json(_messages(*item), "judge")
        finally:
            graded()
        if reason is None and isinstance(value, dict) and value.get("grade") in GRADES:
            return value["grade"], _one_line(value.get("reason", ""))
        return "failed", reason or "no grade in the reply"

    return asker.run(one, items)


def _one_line(reason: object) -> str:
    text = " ".join(str(reason).split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def stopped(teacher: Teacher) -> Stopped:
    """Ctrl-C while grading: the verdicts kept so far, and how to go on."""
    teacher.close()  # the count below is the ledger's final one
    return Stopped(
        f"stopped: the {len(teacher.ledger)} verdicts so far are kept in {teacher.ledger.path}; "
        "run the same command again to go on (nothing is graded twice)"
    )


def summary(grades: list[str]) -> dict:
    """Counts per grade and accuracy (correct, 0–100, of the answers graded)."""
    counts = {g: grades.count(g) for g in (*GRADES, "failed")}
    graded = len(grades) - counts["failed"]
    counts["accuracy"] = 100 * counts["correct"] / graded if graded else None
    return counts


def judge_settings(url: str | None, model: str | None, key_env: str) -> JudgeSettings | None:
    """The judge the eval options name, or None; one of URL/model alone is an error."""
    if not url and not model:
        return None
    if not (url and model):
        raise UserError("a judge needs both --judge-url URL and --judge-model NAME")
    return JudgeSettings(url, model, key_env)
