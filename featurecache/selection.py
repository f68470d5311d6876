"""The one rule that decides "best", used everywhere a single head is named.

The leaderboard's order and ``best.json``, the comparison's recommendation and its plot star, and fine-tuning's
starting head all call :func:`pick_best` / :func:`ranked` on the same :class:`Candidate` fields, so they can
never disagree.

The rule: the highest **val** accuracy (test never decides anything). Exact ties go, in this order, to

1. the simpler head (:data:`featurecache.heads.SIMPLICITY_ORDER`: logreg < linear_svm < knn < rbf_svm < mlp <
   multilayer; a ``+aug`` variant just after its plain head, fine-tuned models last): cheaper to train and to trust;
2. the shallower layer: a shallower tap is cheaper to extract (the graph is cut after the deepest tap), and
   with equal val accuracy nothing favours the deeper one;
3. base, layer and head names, so the order is total and the same on every machine and backend.

Within one head's grid (:func:`best_grid_point`) the rule is the same highest val accuracy; exact ties go to the
lowest val log loss, then to the earlier grid point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from featurecache.heads import simplicity_rank
from featurecache.metrics import log_loss
from featurecache.records import HeadRecord

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """What the selection rule looks at: nothing else about a head can change which one is best."""

    base: str
    layer: str
    head: str
    relative_depth: float
    val_accuracy: float


def selection_key(candidate: Candidate) -> tuple:
    """Sort key of the rule (smaller is better); see the module docstring."""
    return (
        -candidate.val_accuracy,
        simplicity_rank(candidate.head),
        candidate.relative_depth,
        candidate.base,
        candidate.layer,
        candidate.head,
    )


def candidate_of_sidecar(sidecar: Mapping[str, Any]) -> Candidate:
    """The selection fields of a saved head's sidecar."""
    return Candidate(
        base=sidecar.get("base_tag", sidecar.get("base", "")),
        layer=sidecar["layer"],
        head=sidecar["head"],
        relative_depth=float(sidecar["tap"]["relative_depth"]),
        val_accuracy=float(sidecar["selection_val_accuracy"]),
    )


def candidate_of_record(record: HeadRecord) -> Candidate:
    """The selection fields of a :class:`~featurecache.records.HeadRecord`."""
    return Candidate(base=record.base_tag, layer=record.layer, head=record.head,
                     relative_depth=float(record.tap["relative_depth"]),
                     val_accuracy=float(record.selection_val_accuracy))  # fmt: skip


def ranked(items: Iterable[T], candidate: Callable[[T], Candidate] = candidate_of_sidecar) -> list[T]:
    """``items`` best first under the rule."""
    return sorted(items, key=lambda item: selection_key(candidate(item)))


def pick_best(items: Iterable[T], candidate: Callable[[T], Candidate] = candidate_of_sidecar) -> T:
    """The best of ``items`` under the rule; ``ValueError`` when there are none."""
    best = min(items, key=lambda item: selection_key(candidate(item)), default=None)
    if best is None:
        raise ValueError("pick_best() of no candidates")
    return best


# One fitted grid point, as a head's sweep returns it: (params, fitted estimator, val accuracy, fit seconds).
FittedPoint = tuple[dict[str, Any], Any, float, float]


def sweep_record(fitted: Sequence[FittedPoint], X_val: np.ndarray, y_val: np.ndarray) -> list[dict[str, Any]]:
    """A sweep as its head's record keeps it, in grid order: each point's params, val accuracy, fit seconds and,
    for heads that give probabilities, val log loss (what :func:`best_grid_point` breaks ties with)."""
    entries = []
    for params, estimator, accuracy, seconds in fitted:
        entry = {"params": params, "val_accuracy": accuracy, "fit_seconds": round(seconds, 4)}
        loss = log_loss(estimator, X_val, y_val)
        if loss is not None:
            entry["val_log_loss"] = round(loss, 6)
        entries.append(entry)
    return entries


def best_grid_point(sweep: Sequence[Mapping[str, Any]]) -> int:
    """Index of the grid point a head keeps: the highest val accuracy; exact ties go to the lowest val log loss
    (heads without probabilities have none), then to the earlier grid point.

    Why the log loss: on an easy split every C of logreg reaches 100% val, and keeping the first (C = 1e-4, the
    strongest regularization) gave probabilities near 1/K to images it classified right, so ``predict`` printed
    p = 0.26 for a 5-class head that never erred. Among points val cannot tell apart by accuracy, the log loss
    (a proper scoring rule) prefers the one whose probabilities fit val best.
    """

    def loss(i: int) -> float:  # a NaN loss (a diverged fit) never wins a tie
        value = sweep[i].get("val_log_loss", 0.0)
        return math.inf if math.isnan(value) else value

    return min(range(len(sweep)), key=lambda i: (-sweep[i]["val_accuracy"], loss(i), i))
