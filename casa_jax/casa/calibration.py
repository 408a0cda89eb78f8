"""Choose the safety-token decision threshold on held-out (validation) prompts after training.

Argmax decides ``unsafe`` when p_unsafe > 0.5; a model trained on an imbalanced mixture (1.6 benign per
harmful) or for few steps can rank prompts well (high AUROC) yet sit on the wrong side of 0.5. The
threshold that maximises balanced accuracy on the validation split fixes that without touching the test
split; among equally good thresholds the middle (in log-odds) of the widest gap is taken.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)


def balanced_threshold(p_harmful: Sequence[float], p_benign: Sequence[float]) -> float:
    """The p_unsafe threshold (``unsafe`` iff p >= t) that maximises (TPR + TNR) / 2 on these scores."""
    if not len(p_harmful) or not len(p_benign):
        raise ValueError("calibration needs held-out harmful and benign prompts")
    h, b = _logit(p_harmful), _logit(p_benign)
    points = np.unique(np.concatenate([h, b]))
    cuts = np.concatenate([[points[0] - 1.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1.0]])
    gaps = np.concatenate([[np.inf], np.diff(points), [np.inf]])
    score = np.array([(h >= c).mean() + (b < c).mean() for c in cuts])
    best = np.flatnonzero(score >= score.max() - 1e-12)
    chosen = best[np.argmax(gaps[best])] if len(best) > 1 else best[0]
    return float(np.clip(1.0 / (1.0 + np.exp(-cuts[chosen])), 1e-6, 1 - 1e-6))  # CasaConfig needs (0, 1)
