"""Eval's "answers that hold" figures, per model: the three things a rules assistant fails at.

- **in-domain**: the answerable test questions (``kind`` other than ``unanswerable``):
  ROUGE-L / BLEU-4 (and the judge's accuracy when one graded), and the same again for the
  questions whose wording does not appear in the run's training data (knowledge, not recall
  of a phrasing);
- **refusals**: on ``kind: unanswerable`` questions, the share answered with "the rules do
  not cover this" (the judge's ``correct`` against the refusal reference, or
  :func:`qwen_mlx.eval.refusals.is_refusal` without a judge): 1 − the invention rate;
- **general drift** (:mod:`qwen_mlx.eval.drift`), the tuned model's only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_mlx.data import load_records
from qwen_mlx.errors import UserError
from qwen_mlx.eval.judge import summary as judge_summary
from qwen_mlx.eval.refusals import is_refusal
from qwen_mlx.eval.text_metrics import score_answers

UNANSWERABLE = "unanswerable"


def question(messages: list[dict]) -> str:
    """The last question of a conversation, as compared across files."""
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return " ".join(str(users[-1]).split()) if users else ""


def trained_questions(train_file: str | None) -> set[str] | None:
    """The questions of the run's training file (None when it cannot be read any more)."""
    if not train_file or not Path(train_file).is_file():
        return None
    try:
        records, _ = load_records([train_file])
    except UserError:
        return None
    return {question(r.data.get("messages", [])) for r in records}


def _answered(indices: list[int], answers, references, verdicts) -> dict[str, Any]:
    pairs = [(answers[i], references[i]) for i in indices]
    out: dict[str, Any] = {"questions": len(indices), **score_answers(pairs)}
    if verdicts:
        out["judge"] = judge_summary([verdicts[i][0] for i in indices])
    return out


def summary(cases: list, answers: list[str], verdicts: list, trained: set[str] | None) -> dict:
    """The in-domain and refusal figures of one model's ``answers`` to ``cases``."""
    references = [c.reference for c in cases]
    kinds = [c.record.get("kind") for c in cases]
    answerable = [i for i, kind in enumerate(kinds) if kind != UNANSWERABLE]
    out: dict[str, Any] = {"in_domain": _answered(answerable, answers, references, verdicts)}
    if trained is not None:
        unseen = [i for i in answerable if question(cases[i].prompt) not in trained]
        out["unseen_wording"] = _answered(unseen, answers, references, verdicts)
    unanswerable = [i for i, kind in enumerate(kinds) if kind == UNANSWERABLE]
    if unanswerable:
        if verdicts:
            refused = sum(verdicts[i][0] == "correct" for i in unanswerable)
        else:
            refused = sum(is_refusal(answers[i]) for i in unanswerable)
        out["refusals"] = {
            "questions": len(unanswerable),
            "refused": refused,
            "rate": 100 * refused / len(unanswerable),
            "by": "judge" if verdicts else "pattern",
        }
    return out
