"""Ask the teacher: questions for each chunk, an answer to each, a grounding verdict;
follow-ups, paraphrases of training questions, and questions the documents leave open
(each checked against the passages of all documents most similar to it).

Each stage is a list of independent requests run ``concurrency`` at a time; results come
back in input order, so the output never depends on which reply arrived first. A reply
that should be JSON and is not is asked again once (with a note saying so), then counted
as a drop; so is a request that still fails after the retries, and a reply the teacher
module refuses to record (``bad_reply``, ``oversized``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qwen_mlx.distill import workers
from qwen_mlx.distill.chunking import Chunk
from qwen_mlx.distill.prompts import FOLLOWUP_FRAME, language, messages
from qwen_mlx.distill.teacher import Teacher

# Sampling per task: varied questions, sober answers, a deterministic verdict.
PARAMS = {
    "questions": {"temperature": 0.8, "max_tokens": 1500},
    "answer": {"temperature": 0.2, "max_tokens": 800},
    "verify": {"temperature": 0.0, "max_tokens": 200},
    "followup": {"temperature": 0.8, "max_tokens": 300},
    "paraphrase": {"temperature": 0.9, "max_tokens": 800},
    "unanswerable": {"temperature": 0.8, "max_tokens": 1000},
    "check": {"temperature": 0.0, "max_tokens": 200},
    "judge": {"temperature": 0.0, "max_tokens": 200},  # eval --judge-url
}
JSON_NUDGE = {
    "zh": "上面的回复不是有效的 JSON。请只输出要求的 JSON，不要其他文字。",
    "en": "That reply was not valid JSON. Output only the requested JSON, nothing else.",
}
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class Candidate:
    """One question on its way to becoming a record (``drop`` says why it did not)."""

    chunk: Chunk
    question: str
    context: str = ""
    answer: str = ""
    drop: str | None = None
    parent: Candidate | None = None  # a follow-up's first turn
    origin: str = "question"  # question | followup | paraphrase | unanswerable
    of: Candidate | None = None  # the question a paraphrase rewords
    topic: str = ""  # an unanswerable question's topic phrase
    cluster: int = -1  # its cluster of near-duplicates (curate.clusters)

    @property
    def kind(self) -> str:
        return "unanswerable" if self.origin == "unanswerable" else "answerable"


def parse_json(text: str) -> Any:
    """The JSON value in a reply (code fences and chatter around it tolerated), or None."""
    text = _FENCE.sub("", text.strip())
    for start, end in (("{", "}"), ("[", "]")):
        i, j = text.find(start), text.rfind(end)
        if 0 <= i < j:
            try:
                return json.loads(text[i : j + 1])
            except ValueError:
                continue
    return None


class Asker:
    """Builds each task's messages and runs a stage of requests in parallel, in order."""

    def __init__(self, teacher: Teacher, prompts: dict, concurrency: int):
        self.teacher, self.prompts, self.concurrency = teacher, prompts, concurrency

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        try:
            return workers.run_ordered(fn, items, self.concurrency, self.teacher.stopping)
        except KeyboardInterrupt:
            # The replies that landed in time are in the ledger; close it so the count the
            # stop message gives is the count on disk.
            self.teacher.close()
            raise

    def _messages(self, chunk: Chunk, task: str, fields: dict) -> tuple[list[dict], str]:
        lang = language(chunk.text)
        msgs = messages(
            self.prompts,
            lang,
            task,
            source=chunk.source,
            heading=chunk.heading,
            text=chunk.text,
            **fields,
        )
        return msgs, lang

    def text(self, chunk: Chunk, task: str, **fields: Any) -> tuple[dict | None, str | None]:
        """``(reply, None)`` or ``(None, drop reason)``."""
        msgs, _ = self._messages(chunk, task, fields)
        return self.teacher.request(msgs, PARAMS[task])

    def json(self, chunk: Chunk, task: str, **fields: Any) -> tuple[Any, str | None]:
        msgs, _ = self._messages(chunk, task, fields)
        return self.ask_json(msgs, task)

    def ask_json(self, msgs: list[dict], task: str) -> tuple[Any, str | None]:
        """(value, None), or (None, drop reason)."""
        reply, why = self.teacher.request(msgs, PARAMS[task])
        if reply is None:
            return None, why
        value = parse_json(reply["content"])
        if value is None:
            nudge = [
                {"role": "assistant", "content": reply["content"]},
                {"role": "user", "content": JSON_NUDGE[language(msgs[-1]["content"])]},
            ]
            again, why = self.teacher.request(msgs + nudge, PARAMS[task])
            if again is None:
                return None, why
            value = parse_json(again["content"])
        return (value, None) if value is not None else (None, "unparseable")


def _question_items(value: Any, n: int, second: str = "input") -> list[tuple[str, str]]:
    """``[(question, input)]`` from ``{"questions": [...]}`` or a bare list (``second``:
    the other field kept, ``topic`` for unanswerable questions)."""
    items = value.get("questions", []) if isinstance(value, dict) else value
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            item = {"question": item}
        if isinstance(item, dict) and str(item.get("question") or "").strip():
            out.append((str(item["question"]).strip(), str(item.get(second) or "").strip()))
    return out[:n]


def ask_questions(asker: Asker, chunks: list[Chunk], n: int, drops: Callable[[str], None]):
    """Candidates for every chunk, in chunk order."""

    def one(chunk: Chunk) -> list[Candidate]:
        value, reason = asker.json(chunk, "questions", n=n)
        items = _question_items(value, n) if reason is None else []
        if reason is None and not items:
            reason = "no_questions"
        if reason:
            drops(reason)
        return [Candidate(chunk, q, ctx) for q, ctx in items]

    return [c for batch in asker.run(one, chunks) for c in batch]


def user_turn(c: Candidate) -> str:
    """What the reader says: the question, with its context when it has one."""
    return f"{c.question}\n{c.context}" if c.context else c.question


def _full_question(c: Candidate) -> str:
    """The question as the answer and verify prompts see it (a follow-up with its turn)."""
    if c.parent is None:
        return user_turn(c)
    frame = FOLLOWUP_FRAME[language(c.chunk.text)]
    return frame.format(question=user_turn(c.parent), answer=c.parent.answer, followup=c.question)


def ask_answers(asker: Asker, candidates: list[Candidate], check: Callable[[dict], str | None]):
    """Fill in each answer, or its drop reason (``check`` judges a reply's text)."""

    def one(c: Candidate) -> None:
        reply, why = asker.text(c.chunk, "answer", question=_full_question(c))
        c.drop = why if reply is None else check(reply)
        c.answer = reply["content"].strip() if reply else ""

    asker.run(one, candidates)


def ask_verdicts(asker: Asker, candidates: list[Candidate]) -> None:
    """Drop each answer the teacher says its passage does not support."""

    def one(c: Candidate) -> None:
        reply = asker.json(c.chunk, "verify", question=_full_question(c), answer=c.answer)
        c.drop = _verdict(*reply, "supported", ("true", "yes"), "unsupported")

    asker.run(one, candidates)


def ask_followups(asker: Asker, parents: list[Candidate], drops: Callable[[str], None]):
    """One follow-up question for each parent (a kept question and its answer)."""

    def one(parent: Candidate) -> Candidate | None:
        value, reason = asker.json(
            parent.chunk, "followup", question=user_turn(parent), answer=parent.answer
        )
        question = str(value.get("question") or "").strip() if isinstance(value, dict) else ""
        if reason or not question:
            drops(reason or "no_questions")
            return None
        return Candidate(parent.chunk, question, parent=parent, origin="followup")

    return [c for c in asker.run(one, parents) if c is not None]


def ask_paraphrases(asker: Asker, originals: list[Candidate], n: int, drops):
    """Up to ``n`` rewordings of each training question, in order (unanswered yet)."""

    def one(c: Candidate) -> list[Candidate]:
        value, reason = asker.json(c.chunk, "paraphrase", question=user_turn(c), n=n)
        items = value.get("paraphrases", []) if isinstance(value, dict) else value
        texts = [str(t).strip() for t in items if str(t).strip()] if isinstance(items, list) else []
        if reason or not texts:
            drops(reason or "no_questions")
        return [Candidate(c.chunk, t, origin="paraphrase", of=c) for t in texts[:n]]

    return [p for batch in asker.run(one, originals) for p in batch]


def ask_unanswerables(asker: Asker, quotas: list[tuple[Chunk, int]], drops):
    """Questions the documents leave open, ``n`` for each ``(chunk, n)``, with topics."""

    def one(item: tuple[Chunk, int]) -> list[Candidate]:
        chunk, n = item
        value, reason = asker.json(chunk, "unanswerable", n=n)
        items = _question_items(value, n, "topic") if reason is None else []
        if reason or not items:
            drops(reason or "no_questions")
        return [Candidate(chunk, q, origin="unanswerable", topic=t) for q, t in items]

    return [c for batch in asker.run(one, quotas) for c in batch]


def ask_checks(asker: Asker, candidates: list[Candidate], passages: Callable[[Candidate], str]):
    """Drop each unanswerable question that one of the passages shown answers after all."""

    def one(c: Candidate) -> None:
        reply = asker.json(c.chunk, "check", question=c.question, passages=passages(c))
        c.drop = _verdict(*reply, "answered", ("false", "no"), "answered_in_documents")

    asker.run(one, candidates)


def _verdict(value, reason: str | None, key: str, keeps: tuple, drop: str) -> str | None:
    """The drop reason of a yes/no verdict reply (None: kept): the asker's own reason, an
    unparseable reply, or ``drop`` when ``value[key]`` is not one of ``keeps``."""
    if reason is not None:
        return reason
    if not isinstance(value, dict):
        return "unparseable"
    return None if str(value.get(key)).lower() in keeps else drop
