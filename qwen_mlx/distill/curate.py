"""Keep what is worth training on: answer checks, near-duplicate questions, the split.

Near-duplicates: two questions whose character-bigram sets (after NFKC, lower case, and
removing punctuation and spaces) have a Jaccard similarity of at least ``NEAR_DUPLICATE``
(0.6) count as one question asked twice, and the later one is dropped. On short Chinese
questions that catches rewordings such as 出差住宿每晚能报多少钱 / 出差住宿每晚最多能报多少钱
(0.69); it also merges some questions that differ in one name (北京… / 上海…, 0.67). We
err on that side on purpose: a lost training question costs little, a test question
that paraphrases a training one inflates every score. De-duplication runs over the whole
set before the split, so no test question has a near-duplicate in training.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import defaultdict

NEAR_DUPLICATE = 0.6
NGRAM = 2
# Answers that talk about the passage instead of answering from it.
_META = re.compile(
    r"根据(上文|上述|以上|前文|所给|提供的|给出的|本段)|(上文|材料中|文中)(提到|所述|没有)|"
    r"according to the (passage|text|context|document)|the passage (says|states)|as an ai",
    re.IGNORECASE,
)


def answer_problem(reply: dict) -> str | None:
    """Why an answer is unusable (``empty``/``truncated``/``meta``), or None."""
    text = reply.get("content", "").strip()
    if not text:
        return "empty"
    if reply.get("finish_reason") == "length":
        return "truncated"
    if _META.search(text):
        return "meta"
    return None


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def shingles(text: str) -> frozenset[str]:
    norm = normalise(text)
    if len(norm) <= NGRAM:
        return frozenset([norm])
    return frozenset(norm[i : i + NGRAM] for i in range(len(norm) - NGRAM + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(texts: list[str], threshold: float = NEAR_DUPLICATE) -> list[int]:
    """Indexes of texts that nearly repeat an earlier kept one (first occurrence wins)."""
    index: dict[str, list[int]] = defaultdict(list)  # shingle -> kept texts having it
    kept: dict[int, frozenset] = {}
    dropped = []
    for i, text in enumerate(texts):
        grams = shingles(text)
        shared: dict[int, int] = defaultdict(int)
        for gram in grams:
            for j in index[gram]:
                shared[j] += 1
        if any(n / (len(grams) + len(kept[j]) - n) >= threshold for j, n in shared.items()):
            dropped.append(i)
            continue
        kept[i] = grams
        for gram in grams:
            index[gram].append(i)
    return dropped


def split(n: int, test_ratio: float, seed: int) -> set[int]:
    """The indexes (of ``n`` de-duplicated records) that go to the test set."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(n * test_ratio)
    if test_ratio > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return set(order[:n_test])


def chosen(text: str, ratio: float, seed: int) -> bool:
    """Whether ``text`` falls in a seeded ``ratio`` share (the same whatever else is kept)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2**64
