"""Scores of a fitted head on one split, with a percentile-bootstrap confidence interval."""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(
    correct: np.ndarray, *, n_resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (accuracy), resampling test items."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # in blocks: (256, N) index arrays stay small for large N
        stop = min(start + 256, n_resamples)
        means[start:stop] = correct[rng.integers(0, len(correct), (stop - start, len(correct)))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, *, n_classes: int, seed: int = 0) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    correct = y_true == y_pred
    low, high = bootstrap_ci(correct, seed=seed)
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [low, high],
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=np.arange(n_classes), zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).tolist(),
        "n": int(len(y_true)),
    }
