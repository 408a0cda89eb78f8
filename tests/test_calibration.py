"""The post-training threshold: balanced accuracy on held-out scores, middle of the widest optimal gap."""

import math

import pytest

from casa_jax.casa.calibration import balanced_threshold


def _logit(p):
    return math.log(p / (1 - p))


def test_separable_scores_get_the_log_odds_midpoint_of_the_gap():
    t = balanced_threshold([0.2, 0.6, 0.9], [0.001, 0.01, 0.05])
    assert 0.05 < t < 0.2
    assert _logit(t) == pytest.approx((_logit(0.05) + _logit(0.2)) / 2)


def test_overlapping_scores_maximise_balanced_accuracy():
    harmful, benign = [0.3, 0.7, 0.8, 0.9], [0.1, 0.2, 0.4, 0.35]
    t = balanced_threshold(harmful, benign)
    balanced = (sum(h >= t for h in harmful) / 4 + sum(b < t for b in benign) / 4) / 2
    assert balanced == 0.875 and 0.4 < t < 0.7  # one benign or one harmful error is unavoidable


def test_threshold_stays_inside_the_open_interval_and_needs_both_classes():
    assert 0 < balanced_threshold([1.0], [0.0]) < 1
    with pytest.raises(ValueError, match="held-out harmful and benign"):
        balanced_threshold([], [0.1])
