"""ROUGE-1/2/L F-measures, as Google's `rouge_score` computes them without stemming.

The tokenisation is `rouge_score`'s (lower case, runs of letters and digits), written out here:
40 lines instead of a dependency.
"""

from __future__ import annotations

import re
from collections import Counter


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    def grams(tokens):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    p, r = grams(rouge_tokens(prediction)), grams(rouge_tokens(reference))
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    return _f1(lcs_length(p, r), len(p), len(r))


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures over pairs."""
    n = max(len(predictions), 1)
    return {
        "rouge1": sum(rouge_n(p, r, 1) for p, r in zip(predictions, references)) / n,
        "rouge2": sum(rouge_n(p, r, 2) for p, r in zip(predictions, references)) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
    }
