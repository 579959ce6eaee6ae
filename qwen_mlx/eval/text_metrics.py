"""Answer-quality metrics that suit Chinese: character-level ROUGE-L F1 and BLEU-4.

Chinese has no spaces, so both work on characters (whitespace dropped), the way
LLaMA-Factory reports BLEU-4 for Chinese; ROUGE-L is the F1 of the longest common
subsequence. BLEU-4 uses NIST geometric smoothing (an n-gram order with no match counts as
1/2^k of a match, k = 1, 2, … for each such order), so short answers do not all score 0;
it equals nltk's sentence_bleu with SmoothingFunction().method3 on character lists, which
is what LLaMA-Factory reports. Scores are in [0, 100].
"""

from __future__ import annotations

import math
from collections import Counter


def characters(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over characters, 0–100."""
    pred, ref = characters(prediction), characters(reference)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 over characters with NIST smoothing, 0–100."""
    pred, ref = characters(prediction), characters(reference)
    if not pred or not ref:
        return 0.0
    log_sum, misses = 0.0, 0
    for n in range(1, 5):
        produced, available = _ngrams(pred, n), _ngrams(ref, n)
        total = sum(produced.values())
        if total == 0:  # prediction shorter than n
            misses += 1
            log_sum += math.log(1 / (2**misses))
            continue
        matched = sum(min(count, available[gram]) for gram, count in produced.items())
        if matched == 0 and n == 1:  # nothing in common at all (nltk also gives 0 here)
            return 0.0
        if matched == 0:
            misses += 1
            log_sum += math.log(1 / (2**misses * total))
        else:
            log_sum += math.log(matched / total)
    brevity = 1.0 if len(pred) >= len(ref) else math.exp(1 - len(ref) / len(pred))
    return 100.0 * brevity * math.exp(log_sum / 4)


def score_answers(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean ROUGE-L and BLEU-4 over (prediction, reference) pairs."""
    if not pairs:
        return {"rouge_l": 0.0, "bleu4": 0.0}
    return {
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
        "bleu4": sum(bleu4(p, r) for p, r in pairs) / len(pairs),
    }
