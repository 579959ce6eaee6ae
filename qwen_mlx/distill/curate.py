"""Keep what is worth training on: answer checks, duplicates, clusters and the split.

Exact duplicates (the same question after NFKC, lower case, and removing punctuation and
spaces) are dropped: the first one asked stays. Near-duplicates are kept, and grouped:
two questions whose character-bigram sets have a Jaccard similarity of at least
``NEAR_DUPLICATE`` (0.6) are linked, and the linked questions (transitively) form a
*cluster*. On short Chinese questions that links rewordings such as 出差住宿每晚能报多少钱 /
出差住宿每晚最多能报多少钱 (0.69), and also two questions that differ in one name (北京… /
上海…, 0.67): both are kept, as two questions, in one cluster. A whole cluster goes to
train or to test (:func:`split_clusters`), so no test question has a near-duplicate in
training, and the paraphrases the teacher writes for a training question join its
cluster; one that comes near a test question is dropped instead (``near_test``).

Clusters are connected components (single linkage) and not "close to the cluster's first
question": only that way does every pair across the split stay under the threshold.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable

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


class NearIndex:
    """Shingle sets with an inverted index: which stored texts a new one nearly repeats."""

    def __init__(self, threshold: float = NEAR_DUPLICATE):
        self.threshold = threshold
        self.grams: list[frozenset] = []
        self.index: dict[str, list[int]] = defaultdict(list)

    def near(self, text: str) -> list[int]:
        """Positions of the stored texts within the threshold of ``text``."""
        grams = shingles(text)
        shared: dict[int, int] = defaultdict(int)
        for gram in grams:
            for j in self.index[gram]:
                shared[j] += 1
        size = len(grams)
        return [
            j for j, n in shared.items() if n / (size + len(self.grams[j]) - n) >= self.threshold
        ]

    def add(self, text: str) -> int:
        grams = shingles(text)
        self.grams.append(grams)
        for gram in grams:
            self.index[gram].append(len(self.grams) - 1)
        return len(self.grams) - 1


def exact_duplicates(texts: Iterable[str], seen: set[str]) -> list[int]:
    """Indexes of texts equal (after :func:`normalise`) to one in ``seen`` or an earlier one;
    ``seen`` gains the others."""
    dropped = []
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            dropped.append(i)
        seen.add(key)
    return dropped


def clusters(texts: list[str], links: Iterable[tuple[int, int]] = (), threshold=NEAR_DUPLICATE):
    """A cluster number for each text (numbered in order of first member): near-duplicates
    (transitively) and the given ``links`` (e.g. a follow-up and its first turn) share one."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    index = NearIndex(threshold)
    for i, text in enumerate(texts):
        for j in index.near(text):
            union(i, j)
        index.add(text)
    for a, b in links:
        union(a, b)
    numbers: dict[int, int] = {}
    return [numbers.setdefault(root(i), len(numbers)) for i in range(len(texts))]


def held_out(n: int, test_ratio: float) -> int:
    """How many of ``n`` items (clusters) the test set gets."""
    n_test = int(n * test_ratio + 0.5)
    if test_ratio > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return n_test


def split(n: int, test_ratio: float, seed: int) -> set[int]:
    """The indexes (of ``n`` items) that go to the test set, seeded."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: held_out(n, test_ratio)])


def split_clusters(kinds: list[str], test_ratio: float, seed: int) -> set[int]:
    """The clusters (numbered 0..len(kinds)-1, each of the given kind) that go to test:
    ``test_ratio`` of each kind, so both sets get their share of every kind."""
    picked = set()
    for kind in sorted(set(kinds)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        picked |= {members[j] for j in split(len(members), test_ratio, seed)}
    return picked


def spread(n_items: int, share: float) -> list[int]:
    """``round(n_items * share)`` spread evenly over ``n_items`` slots (0 or more each)."""
    total = [int(i * share + 0.5) for i in range(n_items + 1)]
    return [b - a for a, b in itertools.pairwise(total)]


def chosen(text: str, ratio: float, seed: int) -> bool:
    """Whether ``text`` falls in a seeded ``ratio`` share (the same whatever else is kept)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2**64
