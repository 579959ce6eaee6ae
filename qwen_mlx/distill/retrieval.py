"""BM25 over the chunks: which passages of the whole document set a question is about.

An unanswerable question is checked against the chunks most similar to it, not only the
one it was written from. Okapi BM25 (k1 1.5, b 0.75, Lucene's always-positive idf
``ln(1 + (N - n + 0.5) / (n + 0.5))``) over terms that suit both languages: Chinese text
has no spaces, so a run of CJK characters gives its character bigrams (and a lone
character itself), and a run of Latin letters or digits gives the lower-cased word.

Written here (some 40 lines) rather than taken from a package: ``rank-bm25`` has had no
release since 2022, and ``bm25s`` needs SciPy, a large install for ranking a few hundred
chunks once per question.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

K1, B = 1.5, 0.75
_RUNS = re.compile(r"[\u3400-\u9fff]+|[^\W_]+")


def terms(text: str) -> list[str]:
    """The BM25 terms of ``text``: CJK character bigrams and other words, lower-cased."""
    out = []
    for run in _RUNS.findall(unicodedata.normalize("NFKC", text).lower()):
        if "\u3400" <= run[0] <= "\u9fff":
            out += [run[i : i + 2] for i in range(len(run) - 1)] if len(run) > 1 else [run]
        else:
            out.append(run)
    return out


class BM25:
    """An index of documents (texts) that ranks them for a query."""

    def __init__(self, texts: list[str]):
        self.docs = [Counter(terms(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.mean = sum(self.lengths) / max(len(self.docs), 1) or 1.0
        seen = Counter(term for d in self.docs for term in d)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - k + 0.5) / (k + 0.5)) for t, k in seen.items()}

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query``."""
        asked = [t for t in set(terms(query)) if t in self.idf]
        out = []
        for doc, length in zip(self.docs, self.lengths, strict=True):
            norm = K1 * (1 - B + B * length / self.mean)
            out.append(
                sum(self.idf[t] * doc[t] * (K1 + 1) / (doc[t] + norm) for t in asked if t in doc)
            )
        return out

    def top(self, query: str, k: int) -> list[int]:
        """The ``k`` best documents' indexes, best first (ties: the earlier document)."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [i for i in order[:k] if scores[i] > 0]
