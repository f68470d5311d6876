"""Head registry: name -> HeadSpec (how to build the estimator, its default grid, whether it streams).

Every head is a scikit-learn classifier; grids are module constants so a reader sees what is swept.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurecache.registry import Registry

# The grids swept on the val split (dinov2's log_regression sweeps C on a log grid the same way).
LOGREG_C_GRID = [float(c) for c in np.logspace(-4, 2, 7)]
LINEAR_SVM_C_GRID = [float(c) for c in np.logspace(-5, 0, 6)]
RBF_SVM_C_GRID = [0.3, 1.0, 3.0, 10.0, 30.0]
KNN_NEIGHBORS_GRID = [1, 3, 7, 15]
MLP_GRID = {"hidden_units": [(512, 256)], "dropout": [0.2, 0.5]}  # trimmed from 4 points by measured wins (git log)
MULTILAYER_KEEP_FRACTION_GRID = [0.05, 0.1, 0.2, 0.4, 0.7, 1.0]


@contextlib.contextmanager
def quiet_solvers() -> Iterator[None]:
    """Fit without scikit-learn's ConvergenceWarning: a sweep scores a grid point whose solver stopped at its
    iteration budget (a large C on weak features, the random-init control's) on val like any other, and the
    warning, printed by a joblib worker into the progress bar, says nothing the sweep does not."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@dataclass(frozen=True)
class HeadSpec:
    name: str
    summary: str
    build: Callable[[int], Any]  # seed -> unfitted estimator
    grid: dict[str, list]
    streams: bool = False  # can learn from HDF5 chunks when a split does not fit in memory
    dense: bool = False  # a torch network (the fine-tune stage reloads these)
    # Optional faster sweep over the whole grid at once: (X_tr, y_tr, X_val, y_val, grid, seed=) ->
    # [(params, fitted estimator, val accuracy, seconds)] in grid order. Must give the same selections.
    sweep: Callable[..., list] | None = None
    # Reads every stage tap of the base at once (taps side by side); trained once per base, not per layer, and
    # saved under the pseudo-layer folder models/<ds>/<base>/all-stages/<head> (see featurecache.train).
    multi_tap: bool = False


_HEADS: Registry[HeadSpec] = Registry("head")


def register_head(spec: HeadSpec) -> HeadSpec:
    return _HEADS.register(spec.name, spec)


def list_heads(pattern: str = "*") -> list[str]:
    return _HEADS.names(pattern)


def get_head_spec(name: str) -> HeadSpec:
    return _HEADS.get(name)


# Saved heads beyond the registered names: "<head>+aug" is a head trained with the cached augmented views
# (train-heads --augmented), "finetuned-<head>" the fine-tune stage's model built from a head.
AUGMENTED_SUFFIX = "+aug"
FINETUNED_PREFIX = "finetuned-"


def saved_head_name(head: str, *, augmented: bool) -> str:
    """The name a head is saved and ranked under: ``logreg``, or ``logreg+aug`` when trained with the views."""
    return head + (AUGMENTED_SUFFIX if augmented else "")


# Ties in val accuracy go to the simpler head, in this order; a fixed order (not measured fit seconds) keeps
# leaderboards and reports identical from run to run and from one joblib backend to another.
# multilayer last: it is a linear head, but over several taps, each of which must be extracted and kept.
SIMPLICITY_ORDER = ("logreg", "linear_svm", "knn", "rbf_svm", "mlp", "multilayer")


def simplicity_rank(head: str) -> int:
    """Rank of ``head`` in :data:`SIMPLICITY_ORDER`, a ``+aug`` variant just after its plain head (it costs a
    K-times larger training set); heads not listed (fine-tuned models) rank last."""
    name = head.removesuffix(AUGMENTED_SUFFIX)
    rank = SIMPLICITY_ORDER.index(name) if name in SIMPLICITY_ORDER else len(SIMPLICITY_ORDER)
    return 2 * rank + (name != head)


def _logreg(seed: int) -> Any:
    from featurecache.heads.classic import LogisticRegressionHead

    return LogisticRegressionHead(random_state=seed)


def _linear_svm(seed: int) -> Any:
    from featurecache.heads.classic import LinearSVMHead

    return LinearSVMHead(random_state=seed)


def _rbf_svm(seed: int) -> Any:
    from featurecache.heads.classic import RBFSVMClassifier

    return RBFSVMClassifier(random_state=seed)


def _knn(seed: int) -> Any:
    from featurecache.heads.classic import KNNHead

    return KNNHead()


def _mlp(seed: int) -> Any:
    from featurecache.heads.dense import DenseClassifier

    return DenseClassifier(random_state=seed)


def _multilayer(seed: int) -> Any:
    from featurecache.heads.multilayer import MultiLayerHead

    return MultiLayerHead(random_state=seed)


def _multilayer_sweep(*args: Any, **kwargs: Any) -> list:
    from featurecache.heads.multilayer import multilayer_sweep

    return multilayer_sweep(*args, **kwargs)


def _logreg_path(*args: Any, **kwargs: Any) -> list:
    from featurecache.heads.classic import logreg_warm_path

    return logreg_warm_path(*args, **kwargs)


register_head(HeadSpec("logreg", "standardize + multinomial logistic regression (lbfgs, warm-started C path)",
                       _logreg, {"C": LOGREG_C_GRID}, sweep=_logreg_path))  # fmt: skip
register_head(HeadSpec("linear_svm", "standardize + LinearSVC", _linear_svm, {"C": LINEAR_SVM_C_GRID}))
register_head(HeadSpec("rbf_svm", "RBF SVM: exact SVC up to 10k rows, Nystroem + LinearSVC beyond", _rbf_svm,
                       {"C": RBF_SVM_C_GRID}))  # fmt: skip
register_head(HeadSpec("knn", "cosine k-nearest neighbours on standardized features (baseline)", _knn,
                       {"n_neighbors": KNN_NEIGHBORS_GRID}))  # fmt: skip
register_head(HeadSpec("mlp", "dense net in torch, early stopping on val, best-epoch restore", _mlp, MLP_GRID,
                       streams=True, dense=True))  # fmt: skip
register_head(HeadSpec("multilayer", "every stage tap: standardize, keep the most relevant features, logreg",
                       _multilayer, {"keep_fraction": MULTILAYER_KEEP_FRACTION_GRID}, sweep=_multilayer_sweep,
                       multi_tap=True))  # fmt: skip


# The head classes, importable from here (``from featurecache.heads import DenseClassifier``). They load on first
# use (PEP 562 module __getattr__), so importing the registry stays cheap: no scikit-learn estimators until then.
_HEAD_CLASSES = {
    "LogisticRegressionHead": "featurecache.heads.classic",
    "LinearSVMHead": "featurecache.heads.classic",
    "RBFSVMClassifier": "featurecache.heads.classic",
    "KNNHead": "featurecache.heads.classic",
    "DenseClassifier": "featurecache.heads.dense",
    "MultiLayerHead": "featurecache.heads.multilayer",
}


def __getattr__(name: str) -> Any:
    if name in _HEAD_CLASSES:
        import importlib

        return getattr(importlib.import_module(_HEAD_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HEAD_CLASSES])
