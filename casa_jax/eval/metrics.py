"""Report metrics: rates with Wilson 95 % intervals, AUROC and ROC curves.

Every rate a report prints carries its n and an interval: ``rate_ci`` returns them together.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def rate(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for ``k`` successes in ``n`` trials (None when n = 0); unlike the normal
    approximation it stays inside [0, 1] and is not degenerate at 0 or n successes."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_ci(flags: Sequence[bool]) -> dict:
    """``{"rate", "k", "n", "ci"}``: the share of true flags, their count, n and the Wilson 95 % interval
    (``rate`` and ``ci`` are None when there are no flags)."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci": wilson_interval(k, n)}


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 positive), ties counted half; None if one class."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds) with a point per distinct score, from (0, 0)
    to (1, 1); a score >= threshold counts as positive."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    n_pos, n_neg = max(1, int((labels == 1).sum())), max(1, int((labels == 0).sum()))
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    tpr = np.array([((scores >= t) & (labels == 1)).sum() / n_pos for t in thresholds])
    fpr = np.array([((scores >= t) & (labels == 0)).sum() / n_neg for t in thresholds])
    return fpr, tpr, thresholds


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens: how much of ``reference`` survives, in order, in ``candidate``
    (1.0: the same words in the same order; used to check that training kept the base model's answers)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)  # longest-common-subsequence table, one row at a time
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def word_error_rate(hypothesis: str, reference: str) -> float:
    """Word-level edit distance / reference words, on lower-cased words without punctuation."""
    def words(text):
        return ["".join(c for c in w if c.isalnum()) for w in text.lower().split() if any(c.isalnum() for c in w)]
    hyp, ref = words(hypothesis), words(reference)
    if not ref:
        return float(bool(hyp))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / len(ref)


def mean_ci(values: Sequence[float], z: float = Z_95) -> dict:
    """``{"mean", "n", "ci"}``: the mean with a normal-approximation 95 % interval (None when empty)."""
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"mean": None, "n": 0, "ci": None}
    half = z * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "n": int(len(v)), "ci": (float(v.mean()) - half, float(v.mean()) + half)}
