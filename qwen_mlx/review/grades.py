"""People grade the answers of an eval report, and their grades become training data.

The answers are those of ``RUN/eval/answers.jsonl`` (``eval`` writes it; ``RUN/eval-gguf``
for a GGUF's). Each answer of each model (tuned, and base when compared) gets ``correct``,
``partly`` or ``wrong`` (the judge's grades) and optionally the answer it should have been,
as a line of ``RUN/eval/grades.jsonl`` (:mod:`~qwen_mlx.review.ledger`: append-only, fsynced).
A line holds the question, the answer graded and the correction, so it stays meaningful
after ``eval`` runs again; an answer is known by a hash of (question, reference, model,
answer), and a grade of an answer that is no longer in the report is kept but not counted.

:func:`grade_records` turns the grades into
- SFT records: the question and its corrected answer (the latest correction per question);
- preference pairs, in TRL's conversational format: ``{"prompt": [messages], "chosen":
  [assistant turn], "rejected": [assistant turn]}``, for every answer graded wrong or partly
  right on a question with a right answer (its correction, else an answer a person graded
  correct): right = chosen, the model's answer = rejected.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from qwen_mlx.errors import UserError
from qwen_mlx.eval.judge import GRADES
from qwen_mlx.eval.judge import summary as grade_summary
from qwen_mlx.review.ledger import Ledger, latest, read_entries
from qwen_mlx.review.records import MAX_FIELD_CHARS

GRADES_FILE = "grades.jsonl"
ANSWERS = "answers.jsonl"
WRONG = ("wrong", "partly")  # answers a right one is preferred to


def eval_dir(target: Path) -> Path | None:
    """The eval report folder ``target`` names (the folder itself, or a run's ``eval/``)."""
    target = Path(target)
    for folder in (target, target / "eval"):
        if (folder / ANSWERS).is_file():
            return folder
    return None


def _labels(row: dict) -> list[str]:
    """The models a row answers for (``base`` first, as the report shows them)."""
    found = [k[: -len("_rouge_l")] for k in row if k.endswith("_rouge_l")]
    return sorted(found, key=lambda label: (label != "base", label))


def _prompt(row: dict) -> list[dict]:
    """The conversation the model was asked: the row's own when it has one, else the
    question as a single user turn."""
    prompt = row.get("prompt")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return prompt
    return [{"role": "user", "content": row["question"]}]


def answer_id(question: str, reference: str, label: str, answer: str) -> str:
    blob = json.dumps([question, reference, label, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


class Grading:
    """An eval report's answers, the ledger of grades on them, and the counts."""

    def __init__(self, folder: Path):
        """``folder``: the eval report folder, or the run that holds it in ``eval/``."""
        self.dir = eval_dir(folder) or Path(folder)
        self.summary = _read_json(self.dir / "summary.json")
        self.rows = _read_rows(self.dir / ANSWERS)
        self.labels = _labels(self.rows[0])
        self.answers: dict[str, dict] = {}
        for index, row in enumerate(self.rows):
            for label in self.labels:
                key = answer_id(row["question"], row["reference"], label, row[label])
                self.answers.setdefault(key, {"row": index, "label": label})
        self.ledger = Ledger(self.dir / GRADES_FILE)
        self.lock = threading.Lock()

    def row_json(self, index: int) -> dict:
        row = self.rows[index]
        answers = {}
        for label in self.labels:
            key = answer_id(row["question"], row["reference"], label, row[label])
            answers[label] = {
                "id": key,
                "text": row[label],
                "judge": row.get(f"{label}_judge"),
                "judge_reason": row.get(f"{label}_judge_reason"),
                "rouge_l": row.get(f"{label}_rouge_l"),
            }
        return {"index": index, "question": row["question"], "reference": row["reference"],
                "answers": answers}  # fmt: skip

    def state(self, key: str) -> dict:
        entry = self.ledger.latest.get(key) or {}
        return {
            "id": key,
            "grade": entry.get("grade"),
            "corrected": entry.get("corrected"),
            "version": entry.get("version", 0),
            "reviewer": entry.get("reviewer"),
            "time": entry.get("time"),
        }

    def states(self, since: int = 0) -> list[dict]:
        keys = dict.fromkeys(e["id"] for e in self.ledger.since(since) if e["id"] in self.answers)
        return [self.state(key) for key in keys]

    def grade(self, key: str, grade: str, corrected: Any, base_version: int, reviewer: str) -> dict:
        """Record a grade; KeyError: no such answer; ValueError: a bad grade or correction."""
        where = self.answers[key]
        if grade not in GRADES:
            raise ValueError(f"grade: expected one of {', '.join(GRADES)}")
        corrected = _correction(corrected)
        row = self.rows[where["row"]]
        label = where["label"]
        with self.lock:
            self.ledger.add(
                key,
                base_version,
                reviewer,
                grade=grade,
                corrected=corrected,
                label=label,
                question=row["question"],
                reference=row["reference"],
                answer=row[label],
                prompt=_prompt(row),
            )
        return self.state(key)

    def stats(self) -> dict:
        """Per model: the people's grades and accuracy, the judge's, and how often they agree."""
        out = {}
        for label in self.labels:
            keys = [k for k, a in self.answers.items() if a["label"] == label]
            people = {k: self.ledger.latest[k]["grade"] for k in keys if k in self.ledger.latest}
            judge = {k: self.rows[self.answers[k]["row"]].get(f"{label}_judge") for k in keys}
            both = [k for k in people if judge.get(k) in GRADES]
            agree = sum(people[k] == judge[k] for k in both)
            judged = [g for g in judge.values() if g is not None]
            out[label] = {
                "answers": len(keys),
                "human": {**grade_summary(list(people.values())), "graded": len(people)},
                "judge": {**grade_summary(judged), "graded": len(judged)} if judged else None,
                "agreement": {"rate": 100 * agree / len(both) if both else None, "both": len(both)},
            }
        return out


def _correction(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError("corrected: expected text")
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"corrected: longer than {MAX_FIELD_CHARS} characters")
    return value


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and {"question", "reference"} <= row.keys()):
            raise UserError(f"{path}:{number}: not an eval answer row; run `qwen-mlx eval` again")
        rows.append(row)
    if not rows or not _labels(rows[0]):
        raise UserError(f"{path}: no answers to grade; run `qwen-mlx eval` first")
    return rows


# ------------------------------------------------------------------ grades → training data


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _question_key(entry: dict) -> str:
    return json.dumps(entry.get("prompt") or entry["question"], ensure_ascii=False)


def _right_answers(grades: list[dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """Per question: the latest correction's entry, and the right answer (that correction,
    else the latest answer a person graded correct)."""
    corrected: dict[str, dict] = {}
    right: dict[str, str] = {}
    for entry in grades:  # in ledger order: a later decision wins
        key = _question_key(entry)
        if entry.get("corrected"):
            corrected[key] = entry
        elif entry.get("grade") == "correct" and key not in corrected:
            right[key] = entry["answer"]
    right.update({key: entry["corrected"] for key, entry in corrected.items()})
    return corrected, right


def _source(entry: dict, folder: Path) -> dict:
    return {"origin": "grade", "eval": str(folder), "model": entry.get("label"),
            "reviewer": entry.get("reviewer")}  # fmt: skip


def grade_records(folder: Path) -> tuple[list[dict], list[dict]]:
    """(SFT records, preference pairs) from the grades of the eval report in ``folder``."""
    entries = read_entries(Path(folder) / GRADES_FILE)
    grades = sorted(latest(entries).values(), key=lambda e: e["seq"])
    corrected, right = _right_answers(grades)
    sft = [
        {
            "messages": _prompt(e) + _assistant(e["corrected"]),
            "source": _source(e, folder),
        }
        for e in corrected.values()
    ]
    pairs = []
    for entry in grades:
        chosen = right.get(_question_key(entry))
        if entry.get("grade") in WRONG and chosen and chosen != entry["answer"]:
            pairs.append(
                {
                    "prompt": _prompt(entry),
                    "chosen": _assistant(chosen),
                    "rejected": _assistant(entry["answer"]),
                    "reason": f"graded_{entry['grade']}",
                    "source": _source(entry, folder),
                }
            )
    return sft, pairs


def grades_folder(run: Path) -> Path:
    """The eval folder of ``--from-grades RUN`` that holds grades, or a one-line error."""
    folder = eval_dir(run)
    if folder is None:
        raise UserError(f"--from-grades {run}: no eval report there; run `qwen-mlx eval {run}`")
    if not (folder / GRADES_FILE).is_file():
        raise UserError(
            f"--from-grades {run}: no {GRADES_FILE} yet; grade the answers in the browser with "
            f"`qwen-mlx review {run}`"
        )
    return folder


FROM_GRADES = "from_grades.jsonl"
PAIRS = "pairs.jsonl"


def write_from_grades(runs: list[Path], out_dir: Path, command: str) -> tuple[Path, dict]:
    """Write the SFT records (``from_grades.jsonl``, an input of ``data prepare``) and the
    preference pairs (``pairs.jsonl``) of the grades of ``runs`` into ``out_dir``; return
    the SFT file and the counts. No correction at all is a one-line error."""
    from qwen_mlx.fsutil import write_jsonl
    from qwen_mlx.outputs import claim_files, writing

    sft, pairs = [], []
    for run in runs:
        records, found = grade_records(grades_folder(run))
        sft += records
        pairs += found
    if not sft:
        where = ", ".join(str(r) for r in runs)
        raise UserError(
            f"--from-grades {where}: no corrected answer among the grades; write the right "
            "answer under an answer graded wrong or partly right, then run this again"
        )
    names = [FROM_GRADES, PAIRS]
    claim_files(out_dir, command, names)
    with writing(out_dir, command, names):
        write_jsonl(out_dir / FROM_GRADES, sft)
        write_jsonl(out_dir / PAIRS, pairs)
    return out_dir / FROM_GRADES, {"sft": len(sft), "pairs": len(pairs)}
