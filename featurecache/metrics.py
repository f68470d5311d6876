"""Scores of a fitted head on one split and the statistics that say how sure they are.

* one accuracy: a Wilson score interval, which (unlike a bootstrap of the 0/1 vector) does not collapse to a point
  at 0% or 100%: 3 of 3 correct gives [44%, 100%], not [100%, 100%];
* two heads on the same images: an exact McNemar test on the discordant pairs, and Newcombe's hybrid score
  interval of the difference in accuracy, which does not collapse where they rarely disagree either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

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


def wilson_interval(correct: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (NaN for n = 0)."""
    from scipy.stats import norm

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def mcnemar_p(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided exact McNemar p-value that ``a`` and ``b`` are equally accurate on the same items.

    Only the discordant items count: ``n_a`` where ``a`` alone is right, ``n_b`` where ``b`` alone is. Under "equally
    accurate" ``n_a ~ Binomial(n_a + n_b, 1/2)``; the p-value is twice the smaller tail, at most 1 (two-sided at
    the level of the 95% intervals beside it: a one-sided test each way at 0.05 is a 10% test, and called a head
    "significantly better" whose paired interval still held 0).
    """
    from scipy.stats import binom

    a_correct, b_correct = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    n_a, n_b = int((a_correct & ~b_correct).sum()), int((~a_correct & b_correct).sum())
    if n_a + n_b == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(n_a, n_b), n_a + n_b, 0.5)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: reject where the adjusted p is below alpha, and the
    chance of any false rejection among the family stays at most alpha (Holm 1979). Without it, ~20 heads each
    tested at 0.05 against the recommendation named a "significantly better" head in a quarter of answers where
    every head was equally accurate."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


class PairedGain(NamedTuple):
    """Accuracy of one model minus another's on the same test items (fractions), with a paired 95% interval.

    Every "did it pay?" in featurecache (pretraining against its controls, fine-tuning, augmented views, the
    multilayer head) is judged by :attr:`verdict`, so the report, the terminal and the fine-tuning record agree."""

    difference: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``helps`` when the whole interval is above 0, ``hurts`` when it is below, else ``no measurable gain``."""
        return "helps" if self.low > 0 else "hurts" if self.high < 0 else "no measurable gain"

    def points(self) -> str:
        """In points: ``+1.2 [-0.5, +3.0]``."""
        return f"{100 * self.difference:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def pts(fraction: float) -> str:
    """A fraction as percentage points with one decimal, as every report prints accuracies: ``0.953`` -> ``95.3``."""
    return f"{100 * fraction:.1f}"


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray, *, level: float = 0.95) -> PairedGain:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same items, with Newcombe's hybrid score interval for paired
    proportions (Newcombe 1998, method 10: each accuracy's Wilson interval, combined with the pairs' correlation).

    Not a paired bootstrap, which collapses where the two models rarely disagree: 12 images both right on gave
    +0.0 [+0.0, +0.0], and at 15 images its 95% interval covered the true difference 67% of the time (600 simulated
    test sets, accuracies 0.95/0.90, correlation 0.5; this interval: 99.7%; ``benchmarks/paired_interval.py``).
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    n = len(a)
    if n == 0:
        return PairedGain(float("nan"), float("nan"), float("nan"))
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, level=level)
    l2, u2 = wilson_interval(both + only_b, n, level=level)
    margins = (both + only_a) * (neither + only_b) * (both + only_b) * (neither + only_a)
    # The pairs' correlation, shrunk by n/2 when positive (Newcombe's adjustment, as in Altman et al., Statistics with
    # Confidence): unadjusted, two models that never disagree correlate fully and the interval collapses to [0, 0].
    cross = both * neither - only_a * only_b
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return PairedGain(difference, max(-1.0, difference - below), min(1.0, difference + above))


def log_loss(estimator: Any, X: np.ndarray, y: np.ndarray) -> float | None:
    """Mean negative log probability ``estimator`` gives the true labels of ``X`` (natural log; a probability is
    floored at 1e-15, as scikit-learn's ``log_loss`` clips, so one confident mistake costs 34.5, not infinity);
    None for a head without ``predict_proba`` (the SVMs) or whose ``predict_proba`` is no probability (k-NN's vote
    share, :attr:`confidence_name`: with k = 1 it is 0 or 1, and its "loss" would always prefer k = 1). A label the
    head never saw in training counts as that floor."""
    if not hasattr(estimator, "predict_proba") or len(y) == 0:
        return None
    if getattr(estimator, "confidence_name", "probability") != "probability":
        return None
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    column = {label: i for i, label in enumerate(np.asarray(estimator.classes_).tolist())}
    rows = [proba[i, column[label]] if label in column else 0.0 for i, label in enumerate(np.asarray(y).tolist())]
    return float(-np.log(np.clip(rows, 1e-15, 1.0)).mean()) + 0.0  # + 0.0: a perfect head's -0.0 reads as 0.0


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, *, n_classes: int) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    correct = y_true == y_pred
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [low, high],
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        # Over the classes present (in the labels or the predictions): a class with no test image and never
        # predicted has no F1 to average, and counting it as 0 made perfect predictions score 0.67.
        "macro_f1": float(
            f1_score(y_true, y_pred, average="macro", labels=np.union1d(y_true, y_pred), zero_division=0)
        ),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).tolist(),
        "n": int(len(y_true)),
    }
