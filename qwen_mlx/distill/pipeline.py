"""The stages of one distillation, in order, from chunks to the records of train and test.

1. questions for each chunk, answered and checked against it;
2. follow-ups for a seeded share of the kept questions (multi-turn records);
3. questions the documents leave open (``unanswerable``), a share of the questions asked:
   each is shown to the teacher with the chunks of all documents most similar to it
   (:mod:`~qwen_mlx.distill.retrieval`), dropped when any of them answers it, and
   otherwise answered with the refusal template;
4. clusters of near-duplicates (:func:`~qwen_mlx.distill.curate.clusters`; a follow-up is
   in its first turn's), split whole, seeded, each kind apart so both sets get a share;
5. paraphrases of the training questions, answered and checked like any question, in
   their original's cluster; one that comes near a test question is dropped.

Only exact repeats (of anything asked before) are dropped as duplicates. Every stage is a
deterministic function of the chunks, the settings and the teacher's replies, so a rerun
through the ledger asks nothing twice and writes the same files.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from qwen_mlx.config import Config
from qwen_mlx.distill import curate, generate
from qwen_mlx.distill.chunking import Chunk
from qwen_mlx.distill.generate import Candidate, user_turn
from qwen_mlx.distill.prompts import PASSAGE, REFUSAL, language, load_prompts
from qwen_mlx.distill.retrieval import BM25
from qwen_mlx.eval.refusals import is_refusal

CHECK_PASSAGES = 4  # the most similar chunks an unanswerable question is checked against
TOPIC_CHARS = 40  # a longer "topic" is a sentence, not a topic phrase
_TOPIC_TRIM = " \t\n。.，,；;：:！!？?“”\"'《》「」"


class Drops(Counter):
    """Drops by reason, counted from the worker threads."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self[reason] += n


@dataclass
class Distilled:
    """What the stages kept: the candidates (paraphrases after their originals) and the
    clusters that went to test."""

    kept: list[Candidate]
    test_clusters: set[int] = field(default_factory=set)

    def in_test(self, c: Candidate) -> bool:
        return c.cluster in self.test_clusters


def refusal(template: str | None, chunk: Chunk, topic: str) -> str:
    """The answer to an unanswerable question about ``topic``."""
    return (template or REFUSAL[language(chunk.text)]).replace("{topic}", topic)


def cluster_text(c: Candidate) -> str:
    """What near-duplicates are judged on: the question (a follow-up with its first turn)."""
    return c.question if c.parent is None else f"{user_turn(c.parent)}\n{c.question}"


def _asked_text(c: Candidate) -> str:
    """What exact repeats are judged on: the whole user turn (with the turn before)."""
    return user_turn(c) if c.parent is None else f"{user_turn(c.parent)}\n{user_turn(c)}"


class Pipeline:
    """One run's stages over one teacher (see the module docstring)."""

    def __init__(self, chunks: list[Chunk], cfg: Config, teacher, drops: Drops, bar):
        self.d, self.seed = cfg.distill, cfg.training.seed
        self.asker = generate.Asker(teacher, load_prompts(self.d.prompts), self.d.concurrency)
        self.chunks, self.drops, self.bar = chunks, drops, bar
        self.seen: set[str] = set()  # every question asked so far, normalised
        self._bm25: BM25 | None = None

    def run(self) -> Distilled:
        kept = self.questions()
        kept += self.followups(kept)
        kept += self.unanswerables()
        done = Distilled(kept, self.split(kept))
        paraphrases = self.paraphrases(done)
        by_original: dict[int, list[Candidate]] = {}
        for p in paraphrases:
            by_original.setdefault(id(p.of), []).append(p)
        done.kept = [x for c in kept for x in (c, *by_original.get(id(c), []))]
        return done

    def _fresh(self, cands: list[Candidate]) -> list[Candidate]:
        """The candidates that repeat nothing asked before (exact repeats counted)."""
        gone = set(curate.exact_duplicates(map(_asked_text, cands), self.seen))
        if gone:
            self.drops.add("duplicate", len(gone))
        return [c for i, c in enumerate(cands) if i not in gone]

    def _survivors(self, cands: list[Candidate]) -> list[Candidate]:
        for c in cands:
            if c.drop:
                self.drops.add(c.drop)
        return [c for c in cands if not c.drop]

    def _answered(self, cands: list[Candidate], label: str) -> list[Candidate]:
        """Answer and check each candidate; the ones that pass."""
        self.bar.stage(f"answers{label}", len(cands))
        generate.ask_answers(self.asker, cands, curate.answer_problem)
        cands = self._survivors(cands)
        self.bar.stage(f"grounding{label}", len(cands))
        generate.ask_verdicts(self.asker, cands)
        return self._survivors(cands)

    def questions(self) -> list[Candidate]:
        self.bar.stage("questions", len(self.chunks))
        n = self.d.questions_per_chunk
        cands = generate.ask_questions(self.asker, self.chunks, n, self.drops.add)
        return self._answered(self._fresh(cands), "")

    def followups(self, kept: list[Candidate]) -> list[Candidate]:
        ratio = self.d.followup_ratio
        parents = [c for c in kept if curate.chosen(c.question, ratio, self.seed)]
        self.bar.stage("follow-ups", len(parents))
        cands = generate.ask_followups(self.asker, parents, self.drops.add)
        return self._answered(self._fresh(cands), " (follow-ups)")

    def unanswerables(self) -> list[Candidate]:
        share = self.d.unanswerable_ratio * self.d.questions_per_chunk
        quotas = curate.spread(len(self.chunks), share)
        asked = [(c, n) for c, n in zip(self.chunks, quotas, strict=True) if n]
        if not asked:
            return []
        self.bar.stage("unanswerable", len(asked))
        cands = self._fresh(generate.ask_unanswerables(self.asker, asked, self.drops.add))
        for c in cands:
            topic = c.topic.strip(_TOPIC_TRIM)
            c.answer = refusal(self.d.refusal, c.chunk, topic)
            if not topic or len(topic) > TOPIC_CHARS or not is_refusal(c.answer):
                c.drop = "bad_topic"
        cands = self._survivors(cands)
        self.bar.stage("unanswerable checks", len(cands))
        generate.ask_checks(self.asker, cands, self.passages)
        return self._survivors(cands)

    def passages(self, c: Candidate) -> str:
        """The chunks most similar to ``c``'s question (its own chunk among them), numbered."""
        if self._bm25 is None:
            self._bm25 = BM25([f"{x.heading}\n{x.text}" for x in self.chunks])
        shown = self._bm25.top(c.question, CHECK_PASSAGES)
        own = next(i for i, x in enumerate(self.chunks) if x is c.chunk)
        shown += [own] if own not in shown else []
        frame = PASSAGE[language(c.chunk.text)]
        return "\n\n".join(
            frame.format(n=n, source=x.source, heading=x.heading, text=x.text)
            for n, x in enumerate((self.chunks[i] for i in shown), 1)
        )

    def split(self, kept: list[Candidate]) -> set[int]:
        """Number each candidate's cluster; the clusters that go to test."""
        where = {id(c): i for i, c in enumerate(kept)}
        links = [(i, where[id(c.parent)]) for i, c in enumerate(kept) if c.parent is not None]
        numbers = curate.clusters([cluster_text(c) for c in kept], links)
        kinds: dict[int, str] = {}
        for c, k in zip(kept, numbers, strict=True):
            c.cluster = k
            kinds.setdefault(k, c.kind)
        order = [kinds[k] for k in range(len(kinds))]
        return curate.split_clusters(order, self.d.test_ratio, self.seed)

    def paraphrases(self, done: Distilled) -> list[Candidate]:
        """Rewordings of the training questions, answered and checked."""
        originals = [c for c in done.kept if c.origin == "question" and not done.in_test(c)]
        if not self.d.paraphrases or not originals:
            return []
        self.bar.stage("paraphrases", len(originals))
        cands = generate.ask_paraphrases(self.asker, originals, self.d.paraphrases, self.drops.add)
        cands = self._fresh(cands)
        tested = curate.NearIndex()
        for c in done.kept:
            if done.in_test(c):
                tested.add(cluster_text(c))
        for p in cands:
            p.cluster = p.of.cluster
            if tested.near(p.question):
                p.drop = "near_test"
        return self._answered(self._survivors(cands), " (paraphrases)")
