"""The ``multilayer`` head: a linear classifier on features selected from every stage tap of one base.

In the spirit of Head2Toe (Evci et al., ICML 2022): concatenate the cached taps, standardize each tap's
features with that tap's own statistics, score every feature by its relevance (the row norm, over classes,
of a ridge regression from all the features to the one-hot labels: a cheap closed-form stand-in for a
group-lasso fit), keep the most relevant fraction, and fit a logistic regression on what is kept. The kept
fraction is swept on the val split like any other head parameter (the registry's
``MULTILAYER_KEEP_FRACTION_GRID``), with the
relevance fitted once for the whole sweep (:func:`multilayer_sweep`).

Input ``X`` is the taps side by side in a fixed order; ``group_sizes`` says how many columns each tap has
(``train-heads`` sets it; without it the whole input is one group). With ``selection="group"`` whole taps are
kept, most relevant first (mean relevance of their features), until the kept fraction of columns is reached.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

SELECTIONS = ("feature", "group")


class MultiLayerHead(ClassifierMixin, BaseEstimator):
    """Standardize, select the most relevant features across taps, then multinomial logistic regression.

    Args:
        group_sizes: columns per tap, in input order (None: one group, the whole input).
        keep_fraction: fraction of the columns kept (at least one); swept on val by train-heads.
        selection: ``"feature"`` (the most relevant columns) or ``"group"`` (whole taps).
        ridge_alpha: strength of the ridge fit that scores relevance, relative to the number of rows.
        C: inverse regularization of the final logistic regression.
    """

    def __init__(
        self,
        group_sizes: tuple[int, ...] | None = None,
        keep_fraction: float = 1.0,
        selection: str = "feature",
        ridge_alpha: float = 1.0,
        C: float = 1.0,
        max_iter: int = 2000,
        random_state: int | None = 0,
    ) -> None:
        self.group_sizes = group_sizes
        self.keep_fraction = keep_fraction
        self.selection = selection
        self.ridge_alpha = ridge_alpha
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> MultiLayerHead:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        return self._fit_selected(X, y, *self._relevance(X, y))

    # -- steps (shared with multilayer_sweep, which fits the relevance once for the whole grid)

    def _groups(self, n_features: int) -> np.ndarray:
        """Group index of every column."""
        sizes = list(self.group_sizes) if self.group_sizes else [n_features]
        if sum(sizes) != n_features or min(sizes) < 1:
            raise ValueError(f"group_sizes {sizes} do not add up to the {n_features} input columns")
        return np.repeat(np.arange(len(sizes)), sizes)

    def _relevance(self, X: np.ndarray, y: np.ndarray) -> tuple[Any, np.ndarray]:
        """A scaler fitted on X, and every column's relevance (ridge weight norm over the one-hot classes)."""
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        Z = scaler.transform(X).astype(np.float64)
        classes, codes = np.unique(y, return_inverse=True)
        target = np.eye(len(classes))[codes]
        target -= target.mean(axis=0)
        lam = self.ridge_alpha * len(Z)
        if Z.shape[0] < Z.shape[1]:  # the N x N (dual) system is the smaller one
            weights = Z.T @ np.linalg.solve(Z @ Z.T + lam * np.eye(len(Z)), target)
        else:
            weights = np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ target)
        return scaler, np.linalg.norm(weights, axis=1)

    def _fit_selected(self, X: np.ndarray, y: np.ndarray, scaler: Any, relevance: np.ndarray) -> MultiLayerHead:
        from sklearn.linear_model import LogisticRegression

        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        groups = self._groups(X.shape[1])
        n_keep = max(1, math.ceil(self.keep_fraction * X.shape[1]))
        if self.selection == "feature":
            order = np.argsort(-relevance, kind="stable")  # ties: the earlier (shallower) column
        else:
            group_score = np.bincount(groups, weights=relevance) / np.bincount(groups)
            ranked = np.argsort(-group_score, kind="stable")
            order = np.concatenate([np.flatnonzero(groups == g) for g in ranked])
            n_keep = int(np.searchsorted(np.cumsum(np.bincount(groups)[ranked]), n_keep) + 1)
            n_keep = int(np.bincount(groups)[ranked][:n_keep].sum())
        self.scaler_ = scaler
        self.feature_relevance_ = relevance
        self.group_relevance_ = np.bincount(groups, weights=relevance) / np.bincount(groups)
        self.selected_ = np.sort(order[:n_keep])
        self.selected_per_group_ = np.bincount(groups[self.selected_], minlength=groups.max() + 1)
        self.classes_ = np.unique(y)
        Z = scaler.transform(X)[:, self.selected_]
        self.classifier_ = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        self.classifier_.fit(Z, y)
        self.n_iter_ = self.classifier_.n_iter_
        return self

    def _selected(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classifier_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.scaler_.transform(X)[:, self.selected_]

    def predict(self, X: Any) -> np.ndarray:
        Z = self._selected(X)  # first: raises NotFittedError before classifier_ is touched
        return self.classifier_.predict(Z)

    def predict_proba(self, X: Any) -> np.ndarray:
        Z = self._selected(X)  # first: raises NotFittedError before classifier_ is touched
        return self.classifier_.predict_proba(Z)

    def decision_function(self, X: Any) -> np.ndarray:
        Z = self._selected(X)  # first: raises NotFittedError before classifier_ is touched
        return self.classifier_.decision_function(Z)


def multilayer_sweep(
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, grid: list[dict], *, seed: int
) -> list[tuple[dict, MultiLayerHead, float, float]]:
    """Fit one :class:`MultiLayerHead` per grid point, scoring relevance once per distinct ridge setting.

    Gives the heads that fitting each point on its own would (the relevance depends only on the data and
    ``ridge_alpha``). Returns ``(params, fitted head, val accuracy, seconds)`` in grid order.
    """
    out = []
    shared: dict[tuple, tuple[Any, np.ndarray, float]] = {}
    for params in grid:
        head = clone(MultiLayerHead(random_state=seed)).set_params(**params)
        t0 = time.perf_counter()
        X, y = validate_data(head, X_train, y_train, dtype=[np.float64, np.float32])
        key = (head.ridge_alpha,)
        if key not in shared:
            scaler, relevance = head._relevance(X, y)
            shared[key] = (scaler, relevance, time.perf_counter() - t0)
            t0 = time.perf_counter()
        scaler, relevance, relevance_seconds = shared[key]
        head._fit_selected(X, y, scaler, relevance)
        seconds = time.perf_counter() - t0 + relevance_seconds / len(grid)  # the shared fit, spread evenly
        out.append((params, head, float((head.predict(X_val) == y_val).mean()), seconds))
    return out
