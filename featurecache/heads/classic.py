"""The classic heads: standardize, then a scikit-learn classifier built from the head's own parameters.

Each head is its own estimator with plain parameters (``C``, ``n_neighbors``) rather than a ``Pipeline``:
a Pipeline fits the very estimators held in its ``steps`` parameter, which breaks scikit-learn's contract that
``fit`` never mutates parameters (``check_estimators_overwrite_params``). Here ``fit`` builds a fresh
pipeline into ``pipeline_``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurecache.devices import resolve_device

FLOATS = [np.float64, np.float32]
PRIMAL_SVM_ABOVE_N_PER_FEATURE = 6  # LinearSVC solves the primal when rows >= 6 x features (see LinearSVMHead)


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

        # Measured on digits features (standardized, C 0.1-1): the dual stalls at max_iter when N >> D (N/D >= 28:
        # primal 0.3-1.2 s, dual 5-8 s), but the primal crawls when N is a few times D (5395 x 1280, N/D 4.2: primal
        # 55-457 s, dual 10-17 s). On fmnist2 (1560 rows, the 6-point C grid) the primal won above that, with the same
        # val accuracy at every C: N/D 8.1 primal 0.15 s, dual 1.36 s; N/D 4.9 primal 0.42 s, dual 1.53 s; N/D 1.2
        # primal unfinished after 20 s, dual 1.4 s. scikit-learn's "auto" switches at N = D; we switch at N = 6 D.
        dual = n_samples < PRIMAL_SVM_ABOVE_N_PER_FEATURE * n_features
        return [LinearSVC(C=self.C, dual=dual, max_iter=self.max_iter, random_state=self.random_state)]


class KNNHead(_Proba, ScaledClassifier):
    """Standardize + cosine k-nearest neighbours, distance-weighted: the cheap baseline."""

    # Its predict_proba is the distance-weighted share of the k nearest training rows' votes, not a probability:
    # with k = 1 it is 1.0 for every image, a class never seen included. predict reports it under this name.
    confidence_name = "vote_share"

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


TORCH_PATH_MIN_FEATURES = 128


PathPoint = tuple[dict, LogisticRegressionHead, float, float]  # (params, fitted head, val accuracy, seconds)


def logreg_warm_path(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    grid: list[dict],
    *,
    seed: int,
    device: str = "auto",
) -> list[PathPoint]:
    """Sweep ``C`` of :class:`LogisticRegressionHead` as a warm-started regularization path.

    Minimizes scikit-learn's own objective, ``C * sum(log-loss) + 0.5 * ||W||^2`` with an unpenalized
    intercept (multinomial softmax; a single sigmoid for two classes), with full-batch L-BFGS in torch:
    the scaler is fitted once, C goes from small to large, each fit starts from the previous optimum, and it
    runs in float32 on the GPU when there is one. The convex problem has one optimum, so the heads are
    those of cold scikit-learn fits (benchmarks/ checks the chosen C and test accuracy against a naive loop).
    Below ``TORCH_PATH_MIN_FEATURES`` columns scikit-learn's own solver is already fast and torch's per-call
    overhead dominates, so the grid is fitted point by point as usual.
    Returns ``(params, fitted head, val accuracy, seconds)`` in the grid's order.
    """
    if np.shape(X_train)[1] < TORCH_PATH_MIN_FEATURES:
        return [_sklearn_point(X_train, y_train, X_val, y_val, params, seed=seed) for params in grid]
    t0 = time.perf_counter()
    path = _TorchLogregPath(X_train, y_train, X_val, device=device)
    shared_seconds = time.perf_counter() - t0
    results: dict[int, PathPoint] = {}
    for i in sorted(range(len(grid)), key=lambda i: grid[i]["C"]):
        t0 = time.perf_counter()
        val_pred = path.fit(float(grid[i]["C"]))  # warm: starts from the previous (smaller) C's optimum
        head = path.head(float(grid[i]["C"]), seed=seed)
        seconds = time.perf_counter() - t0 + shared_seconds / len(grid)
        results[i] = (grid[i], head, float((val_pred == y_val).mean()), seconds)
    return [results[i] for i in range(len(grid))]


def _sklearn_point(
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, params: dict, *, seed: int
) -> PathPoint:
    """One grid point fitted cold by scikit-learn (narrow layers)."""
    t0 = time.perf_counter()
    head = LogisticRegressionHead(random_state=seed, **params).fit(X_train, y_train)
    return params, head, float((head.predict(X_val) == y_val).mean()), time.perf_counter() - t0


class _TorchLogregPath:
    """The standardized problem on the device and the current optimum (W, b), carried from one C to the next."""

    def __init__(self, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, *, device: str) -> None:
        import torch
        from sklearn.preprocessing import StandardScaler

        dev = torch.device(resolve_device(device))
        self.scaler = StandardScaler().fit(np.asarray(X_train, dtype=np.float32))
        self.classes, y_idx = np.unique(y_train, return_inverse=True)
        self.X = torch.as_tensor(self.scaler.transform(np.asarray(X_train, dtype=np.float32)), device=dev)
        self.Xv = torch.as_tensor(self.scaler.transform(np.asarray(X_val, dtype=np.float32)), device=dev)
        self.binary = len(self.classes) == 2
        outputs = 1 if self.binary else len(self.classes)
        self.y = torch.as_tensor(y_idx, device=dev)
        self.W = torch.zeros(self.X.shape[1], outputs, device=dev, requires_grad=True)
        self.b = torch.zeros(outputs, device=dev, requires_grad=True)
        self.n_iter = 0

    def _loss_sum(self, logits: Any) -> Any:
        import torch.nn.functional as F

        if self.binary:
            return F.binary_cross_entropy_with_logits(logits[:, 0], self.y.float(), reduction="sum")
        return F.cross_entropy(logits, self.y, reduction="sum")

    def fit(self, C: float) -> np.ndarray:
        """Minimize the objective at ``C`` from the current optimum; returns the val predictions (class labels)."""
        import torch

        # scikit-learn stops lbfgs when the max |gradient| of the mean-scaled objective falls below tol=1e-4;
        # this objective is C * N times that one, so the same stopping rule is 1e-4 * C * N.
        opt = torch.optim.LBFGS([self.W, self.b], lr=1, max_iter=LogisticRegressionHead().max_iter, history_size=10,
                                tolerance_grad=1e-4 * C * len(self.y), tolerance_change=1e-9,
                                line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = C * self._loss_sum(self.X @ self.W + self.b) + 0.5 * (self.W * self.W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.n_iter = opt.state[opt._params[0]].get("n_iter", 0)
        with torch.no_grad():
            val_logits = self.Xv @ self.W + self.b
            val_pred = (val_logits[:, 0] > 0).long() if self.binary else val_logits.argmax(1)
        return self.classes[val_pred.cpu().numpy()]

    def head(self, C: float, *, seed: int) -> LogisticRegressionHead:
        """The current optimum as a fitted :class:`LogisticRegressionHead` (scaler + scikit-learn model)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        lr = LogisticRegression(C=C, max_iter=LogisticRegressionHead().max_iter, random_state=seed)
        lr.coef_ = self.W.detach().T.cpu().numpy().astype(np.float64).copy()
        lr.intercept_ = self.b.detach().cpu().numpy().astype(np.float64).copy()
        lr.classes_ = self.classes
        lr.n_features_in_ = self.X.shape[1]
        lr.n_iter_ = np.array([self.n_iter])
        head = LogisticRegressionHead(C=C, random_state=seed)
        head.n_features_in_, head.classes_, head.n_iter_ = self.X.shape[1], self.classes, lr.n_iter_
        head.pipeline_ = make_pipeline(self.scaler, lr)
        return head
