"""Evaluation: attack suites, judges, metrics and reports (attack success rate, over-refusal, AUROC)."""
