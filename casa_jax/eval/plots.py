"""Figures for reports, drawn with matplotlib (Agg, no screen): ASR per attack and method with Wilson
intervals, ROC curves of p_unsafe and v_s with the decision threshold marked, v_s histograms."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from casa_jax.eval.metrics import roc_curve

HARMFUL_COLOR, BENIGN_COLOR = "#c0392b", "#2e5fa8"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    """PNG at ``path``, local or in a bucket (written whole, through ``casa_jax.storage``)."""
    import io

    from etils import epath
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _pyplot().close(fig)
    epath.Path(path).write_bytes(buffer.getvalue())


def rate_bars(values: dict[str, dict[str, dict]], path: str, ylabel: str = "attack success rate (%)",
              title: str = "") -> None:
    """Grouped bars: ``values[row][method] = {"rate", "ci", "n"}``; one group per row (attack), one bar
    per method, Wilson 95 % interval as error bars, n under each group."""
    plt = _pyplot()
    rows = list(values)
    methods = list(dict.fromkeys(m for row in values.values() for m in row))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(methods)) ** 0.5 + 2), 4.0))
    x = np.arange(len(rows))
    for j, method in enumerate(methods):
        cells = [values[r].get(method) for r in rows]
        rates = np.array([100 * c["rate"] if c and c["rate"] is not None else np.nan for c in cells])
        # clipped at 0: at k = 0 or k = n the Wilson bound equals the rate up to rounding
        low = np.array([max(0.0, 100 * (c["rate"] - c["ci"][0])) if c and c["ci"] else 0 for c in cells])
        high = np.array([max(0.0, 100 * (c["ci"][1] - c["rate"])) if c and c["ci"] else 0 for c in cells])
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, rates, width, yerr=[low, high], capsize=3, label=method)
    ns = [max((c["n"] for c in values[r].values() if c), default=0) for r in rows]
    ax.set_xticks(x, [f"{r}\nn={n}" for r, n in zip(rows, ns)], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "bars: rate; whiskers: Wilson 95 % interval", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def roc_plot(rows: Sequence[dict], path: str, threshold: float | None) -> None:
    """ROC of p_unsafe and of v_s (harmful = positive) over ``rows`` (one per model input), with the
    operating point of the decision threshold (p_unsafe >= threshold; argmax = 0.5) marked."""
    from casa_jax.eval.metrics import auroc
    plt = _pyplot()
    labels = [int(r["harmful"]) for r in rows]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for key, style in (("p_unsafe", "-"), ("v_s", "--")):
        scores = [r[key] for r in rows]
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, style, label=f"{key} (AUROC {auroc(scores, labels):.3f})")
    tau = 0.5 if threshold is None else threshold
    p = np.array([r["p_unsafe"] for r in rows])
    y = np.array(labels)
    fp = ((p >= tau) & (y == 0)).sum() / max(1, (y == 0).sum())
    tp = ((p >= tau) & (y == 1)).sum() / max(1, (y == 1).sum())
    ax.plot([fp], [tp], "ko", label=f"threshold p_unsafe >= {tau:.3f}" + (" (argmax)" if threshold is None else ""))
    ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=0.8)
    ax.set_xlabel("false-positive rate (benign flagged unsafe)")
    ax.set_ylabel("true-positive rate (harmful flagged unsafe)")
    ax.set_title(f"ROC, {int(y.sum())} harmful / {int((y == 0).sum())} benign prompts", fontsize=9)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def vs_histogram(rows: Sequence[dict], path: str, bins: int = 20) -> None:
    """Counts of v_s per bin over [0, 1], harmful and benign prompts side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    edges = np.linspace(0, 1, bins + 1)
    for harmful, color, label in ((True, HARMFUL_COLOR, "harmful"), (False, BENIGN_COLOR, "benign")):
        values = [r["v_s"] for r in rows if r["harmful"] == harmful]
        ax.hist(values, bins=edges, alpha=0.6, color=color, label=f"{label} (n={len(values)})")
    ax.set_xlabel("v_s (safety-attention weight)")
    ax.set_ylabel("prompts")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
