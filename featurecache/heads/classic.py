"""The classic heads: standardize, then a scikit-learn classifier built from the head's own parameters.

Each head is its own estimator with plain parameters (``C``, ``n_neighbors``) rather than a ``Pipeline``:
a Pipeline fits the very estimators held in its ``steps`` parameter, which breaks scikit-learn's contract that
``fit`` never mutates parameters (``check_estimators_overwrite_params``). Here ``fit`` builds a fresh
pipeline into ``pipeline_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

FLOATS = [np.float64, np.float32]


class ScaledClassifier(ClassifierMixin, BaseEstimator):
    """Base class: ``StandardScaler`` followed by the steps ``_steps`` returns for the training set's size."""

    def _steps(self, n_samples: int, n_features: int) -> list[Any]:
        raise NotImplementedError

    def fit(self, X: Any, y: Any) -> ScaledClassifier:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = validate_data(self, X, y, dtype=FLOATS)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        self.pipeline_ = make_pipeline(StandardScaler(), *self._steps(*X.shape)).fit(X, y)
        if hasattr(self.pipeline_[-1], "n_iter_"):  # iterative solvers report their iteration count
            self.n_iter_ = self.pipeline_[-1].n_iter_
        return self

    def _checked(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return validate_data(self, X, dtype=FLOATS, reset=False)

    def predict(self, X: Any) -> np.ndarray:
        X = self._checked(X)  # first: raises NotFittedError before pipeline_ is touched
        return self.pipeline_.predict(X)


class _Decision:
    def decision_function(self: Any, X: Any) -> np.ndarray:
        X = self._checked(X)  # first: raises NotFittedError before pipeline_ is touched
        return self.pipeline_.decision_function(X)


class _Proba:
    def predict_proba(self: Any, X: Any) -> np.ndarray:
        X = self._checked(X)  # first: raises NotFittedError before pipeline_ is touched
        return self.pipeline_.predict_proba(X)


class LogisticRegressionHead(_Decision, _Proba, ScaledClassifier):
    """Standardize + multinomial logistic regression (lbfgs)."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000, random_state: int | None = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _steps(self, n_samples: int, n_features: int) -> list[Any]:
        from sklearn.linear_model import LogisticRegression

        return [LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)]


class LinearSVMHead(_Decision, ScaledClassifier):
    """Standardize + linear SVM (liblinear, one-vs-rest)."""

    def __init__(self, C: float = 1.0, max_iter: int = 5000, random_state: int | None = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _steps(self, n_samples: int, n_features: int) -> list[Any]:
        from sklearn.svm import LinearSVC

        # dual="auto" picks the primal for N > D, which converges where the dual stalls on many samples.
        return [LinearSVC(C=self.C, dual="auto", max_iter=self.max_iter, random_state=self.random_state)]


class KNNHead(_Proba, ScaledClassifier):
    """Standardize + cosine k-nearest neighbours, distance-weighted: the cheap baseline."""

    def __init__(self, n_neighbors: int = 5) -> None:
        self.n_neighbors = n_neighbors

    def _steps(self, n_samples: int, n_features: int) -> list[Any]:
        from sklearn.neighbors import KNeighborsClassifier

        return [KNeighborsClassifier(n_neighbors=min(self.n_neighbors, n_samples), metric="cosine", weights="distance")]


class RBFSVMClassifier(_Decision, ScaledClassifier):
    """Standardize + RBF SVM: exact ``SVC`` up to ``exact_max_samples`` rows, else Nystroem features with a
    ``LinearSVC``. Kernel SVC costs O(N^2) memory and O(N^2..N^3) time, so beyond ~10k rows the approximation
    is what finishes.

    Args:
        C: margin softness.
        gamma: kernel width; ``"scale"`` is 1 / n_features on standardized inputs, as in SVC.
        exact_max_samples: largest training set fitted with the exact kernel.
        n_components: Nystroem landmarks for the approximate route.
        random_state: seeds the Nystroem landmarks.
    """

    def __init__(
        self,
        C: float = 1.0,
        gamma: float | str = "scale",
        exact_max_samples: int = 10_000,
        n_components: int = 1000,
        random_state: int | None = 0,
    ) -> None:
        self.C = C
        self.gamma = gamma
        self.exact_max_samples = exact_max_samples
        self.n_components = n_components
        self.random_state = random_state

    def _steps(self, n_samples: int, n_features: int) -> list[Any]:
        from sklearn.kernel_approximation import Nystroem
        from sklearn.svm import SVC, LinearSVC

        gamma = 1.0 / n_features if self.gamma == "scale" else float(self.gamma)
        if n_samples <= self.exact_max_samples:
            self.route_ = "exact"
            return [SVC(C=self.C, gamma=gamma)]
        self.route_ = "nystroem"
        landmarks = min(self.n_components, n_samples)
        return [
            Nystroem(gamma=gamma, n_components=landmarks, random_state=self.random_state),
            LinearSVC(C=self.C, random_state=self.random_state),
        ]
