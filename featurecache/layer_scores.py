"""Which layer, before training anything: training-free scores per cached layer, and how well they rank.

- :func:`score_layers`: every training-free score (:mod:`featurecache.transferability`) of every cached layer
  of a dataset x base, on the train split only, with the seconds each score took.
- :func:`layer_tau_table`: those scores against what trained heads reached on the same layers: per layer the
  test accuracy of its val-selected head, and per score Kendall's tau, weighted tau and whether the layer a
  full run selects, or one with the same val accuracy, is in the score's top 3. :func:`cross_dataset_summary`
  averages tables over datasets.
- :func:`shortlist_layers`: the K best layers by one score (``train-heads --shortlist K``).
- :func:`multilayer_vs_best_single`: the ``multilayer`` head against the best single-layer head chosen on val,
  as a paired difference on the same test images with its 95% interval.

Returned records are dataclasses of plain values; the report renders them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurecache import store
from featurecache.answer import Scope, head_results, is_frozen_plain, multilayer_comparisons
from featurecache.commands import extract_command
from featurecache.config import Paths, default_paths
from featurecache.errors import FeaturecacheError, first_time
from featurecache.freshness import current_heads
from featurecache.records import HeadRecord
from featurecache.selection import Candidate, candidate_of_record, pick_best
from featurecache.transferability import knn_loo_accuracy, logme, ncti, ncti_components, sfda

log = logging.getLogger(__name__)

# name -> (features, labels) -> score, for the scores that judge one layer on its own. NCTI is relative to the
# layers ranked together (min-max normalized over them), so it is computed over the set in score_layers.
PER_LAYER_SCORES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "logme": logme,
    "sfda": sfda,
    "knn": knn_loo_accuracy,
}
SCORES = ("logme", "sfda", "ncti", "knn")
DEFAULT_SHORTLIST_SCORE = "logme"  # mean Kendall tau within 0.02 of NCTI's on the six built-in datasets, 40x cheaper
TOP_K_HIT = 3
# BLAS threads while scoring. The problems are small dense ones (Gram matrices of at most ~2k x 2k): with two
# OpenBLAS threads on the shared 2-core VM a 360 x 360 eigh took 1.8-2.5 s wall against 0.16 s on one thread.
SCORING_THREADS = 1


@dataclass(frozen=True)
class LayerScores:
    """Training-free scores of the cached layers of one dataset x base (train split)."""

    dataset: str
    base_tag: str
    layers: list[str]  # in cache order (shallow to deep)
    relative_depth: dict[str, float]
    n_train: int
    scores: dict[str, dict[str, float]]  # score -> layer -> value (higher is better)
    seconds: dict[str, float]  # score -> seconds for all layers
    load_seconds: float  # reading the train split of every layer


def check_scores(names: Sequence[str]) -> list[str]:
    """``names`` if every one is a known score, else an error naming the choices."""
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise FeaturecacheError(f"unknown score(s) {', '.join(unknown)}; choose from: {', '.join(SCORES)}")
    return list(names)


def score_layers(
    dataset: str,
    base_tag: str,
    paths: Paths | None = None,
    *,
    scores: Sequence[str] = SCORES,
    layers: Sequence[str] | None = None,
) -> LayerScores:
    """Score every cached layer (or ``layers``) of ``dataset`` x ``base_tag`` on its train split.

    The base's own ImageNet logits (``store.is_imagenet_logits``) are left out unless named in ``layers``.
    """
    from threadpoolctl import threadpool_limits

    paths = paths or default_paths()
    scores = check_scores(scores)
    train = paths.feature_file(dataset, base_tag, "train")
    if not train.is_file():
        raise FeaturecacheError(
            f"no train cache for {dataset} x {base_tag} at {train}; run "
            f"`{extract_command(dataset, base_tag, '--layers', 'all-stages', paths=paths)}` first"
        )
    meta = store.read_metadata(train)
    taps = meta["taps"]
    missing = [k for k in layers or () if k not in taps]
    if missing:
        raise FeaturecacheError(f"layer(s) {', '.join(missing)} not cached in {train}; cached: {', '.join(taps)}")
    chosen = [k for k, t in taps.items() if (k in layers if layers else not store.is_imagenet_logits(t))]
    t0 = time.perf_counter()
    features, y = {}, None
    for layer in chosen:
        X, y, _ = store.load_features(train, layer)
        features[layer] = X.astype(np.float64)
    load_seconds = time.perf_counter() - t0
    values: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    with threadpool_limits(limits=SCORING_THREADS):
        for name in scores:
            t0 = time.perf_counter()
            values[name] = _scored(name, features, y, chosen)
            seconds[name] = round(time.perf_counter() - t0, 3)
    return LayerScores(dataset, base_tag, chosen, {k: taps[k]["relative_depth"] for k in chosen},
                       int(len(y)), values, seconds, round(load_seconds, 3))  # fmt: skip


def _scored(name: str, features: dict[str, np.ndarray], y: np.ndarray, chosen: list[str]) -> dict[str, float]:
    """One score for every chosen layer; NaN for all of them (logged once) where the score is undefined: SFDA's and
    NCTI's discriminant analyses need a class with two train images to measure spread within classes."""
    import warnings

    if name in UNDEFINED_WITHOUT_SPREAD and np.bincount(np.unique(y, return_inverse=True)[1]).max(initial=0) < 2:
        if first_time("undefined score", name):  # compare-layers scores each base
            log.warning("%s is undefined here: it needs a class with at least two train images (shown as n/a)", name)
        return {k: float("nan") for k in chosen}
    with warnings.catch_warnings():  # scikit-learn's per-class covariance of a one-image class: said above, not here
        warnings.filterwarnings("ignore", message="Only one sample available", category=UserWarning)
        if name == "ncti":
            return dict(zip(chosen, ncti([ncti_components(features[k], y) for k in chosen]), strict=True))
        return {k: float(PER_LAYER_SCORES[name](features[k], y)) for k in chosen}


UNDEFINED_WITHOUT_SPREAD = ("sfda", "ncti")


def shortlist_layers(
    dataset: str,
    base_tag: str,
    k: int,
    score: str = DEFAULT_SHORTLIST_SCORE,
    paths: Paths | None = None,
    *,
    layers: Sequence[str] | None = None,
) -> list[str]:
    """The ``k`` layers (of ``layers``, default every cached one) ranked best by ``score`` (ties to the shallower
    layer), best first."""
    if k < 1:
        raise FeaturecacheError(f"--shortlist must be at least 1 (got {k})")
    result = score_layers(dataset, base_tag, paths, scores=[score], layers=layers)
    if not _defined(result.scores[score]) and score != DEFAULT_SHORTLIST_SCORE:
        log.warning("--shortlist-score %s is undefined on %s; shortlisting by %s instead", score, dataset,
                    DEFAULT_SHORTLIST_SCORE)  # fmt: skip
        return shortlist_layers(dataset, base_tag, k, DEFAULT_SHORTLIST_SCORE, paths, layers=layers)
    return rank_layers(result.scores[score], result.relative_depth)[:k]


def rank_layers(values: dict[str, float], depth: dict[str, float]) -> list[str]:
    """Layers best first by score; NaN scores last; ties to the shallower (cheaper) layer."""
    return sorted(values, key=lambda k: (math.isnan(values[k]), -np.nan_to_num(values[k], nan=0.0), depth[k], k))


# ------------------------------------------------------------------------------------------- trained heads


@dataclass(frozen=True)
class SelectedHead:
    """The head a full run selects for one layer: best val accuracy, ties to the simpler head."""

    layer: str
    head: str
    relative_depth: float
    val_accuracy: float
    test_accuracy: float
    seconds: float  # training time of every head of this layer (the cost of training the layer)
    model_dir: str


def selected_heads(
    dataset: str, base_tag: str, paths: Paths | None = None, *, scope: Scope | None = None
) -> dict[str, SelectedHead]:
    """Layer -> its val-selected head, from the saved sidecars (those in ``scope``: the heads an answer ranks).
    Multi-tap heads (not a layer) and fine-tuned models (not heads on the cached features) are left out."""
    paths = paths or default_paths()
    by_layer: dict[str, list[tuple[Path, HeadRecord]]] = {}
    for directory, r in current_heads(paths.head_dirs(dataset, base_tag), paths):
        if scope is not None and not scope.admits(r.base_tag, r.head, r.layer):
            continue
        if not r.tap.get("multi_tap") and is_frozen_plain(r.head):
            by_layer.setdefault(r.layer, []).append((directory, r))
    out = {}
    for layer, heads in by_layer.items():
        directory, best = pick_best(heads, lambda head: candidate_of_record(head[1]))  # the one selection rule
        seconds = round(sum((r.timings or {}).get("total_seconds", 0.0) for _, r in heads), 3)
        out[layer] = SelectedHead(layer, best.head, best.tap["relative_depth"], best.selection_val_accuracy,
                                  best.test["accuracy"], seconds, str(directory))  # fmt: skip
    return out


def best_layer(heads: dict[str, SelectedHead]) -> str:
    """The layer a full run selects (as the leaderboard ranks: val accuracy, simpler head, shallower layer)."""
    return pick_best(heads.values(), lambda h: Candidate("", h.layer, h.head, h.relative_depth, h.val_accuracy)).layer


# ------------------------------------------------------------------------------------------------ tau table


@dataclass(frozen=True)
class ScoreAgreement:
    """How one score's ranking of the layers agrees with the trained heads' test accuracy."""

    score: str
    kendall_tau: float
    weighted_tau: float  # scipy's hyperbolic weighting: disagreements among the top layers count most
    top: list[str]  # the score's top 3 layers, best first
    best_in_top: bool  # a layer of the best val accuracy (the selected one or one tied with it) is among them


@dataclass(frozen=True)
class LayerTauTable:
    """For one dataset x base: every score per layer beside its trained accuracy, and their agreement."""

    dataset: str
    base_tag: str
    layers: list[str]
    relative_depth: dict[str, float]
    test_accuracy: dict[str, float]  # of the val-selected head of each layer
    selected_head: dict[str, str]
    best_layer: str  # selected on val, as a full run would
    scores: dict[str, dict[str, float]]
    agreement: dict[str, ScoreAgreement]
    scoring_seconds: dict[str, float]
    training_seconds: float  # every saved head of these layers, from their sidecars
    n_train: int
    tied_with_best: list[str] = field(default_factory=list)  # other layers of the same best val accuracy


def best_val_layers(heads: dict[str, SelectedHead]) -> list[str]:
    """The layers whose val-selected head has the best val accuracy: the one a full run selects and any tied with
    it (the rule's tie-break, the shallower layer, picks among them; val cannot)."""
    best = max(h.val_accuracy for h in heads.values())
    return [k for k, h in heads.items() if h.val_accuracy == best]


def agreement(score: str, values: dict[str, float], heads: dict[str, SelectedHead]) -> ScoreAgreement:
    """Kendall tau and weighted tau of ``values`` against the heads' test accuracy, and the top-3 hit."""
    from scipy.stats import kendalltau, weightedtau

    layers = [k for k in heads if k in values and not math.isnan(values[k])]
    s = np.array([values[k] for k in layers])
    acc = np.array([heads[k].test_accuracy for k in layers])
    tau = float(kendalltau(s, acc).statistic) if len(layers) > 1 else float("nan")
    wtau = float(weightedtau(s, acc).statistic) if len(layers) > 1 else float("nan")
    top = rank_layers({k: values[k] for k in layers}, {k: heads[k].relative_depth for k in layers})[:TOP_K_HIT]
    # A hit is any layer tied on val with the selected one: where six layers reach 100% val, the rule's tie-break
    # (the shallower layer) picks one, and a score ranking three of the other five first has not missed.
    return ScoreAgreement(score, tau, wtau, top, bool(set(top) & set(best_val_layers(heads))))


def layer_tau_table(
    dataset: str,
    base_tag: str,
    paths: Paths | None = None,
    *,
    scores: Sequence[str] = SCORES,
    scope: Scope | None = None,
) -> LayerTauTable:
    """Score the layers that have trained heads (in ``scope``) and compare each score's ranking with their
    accuracy."""
    paths = paths or default_paths()
    heads = selected_heads(dataset, base_tag, paths, scope=scope)
    if not heads:
        raise FeaturecacheError(
            f"no trained heads under {paths.models / dataset / base_tag}; run `featurecache train-heads "
            f"--dataset {dataset} --bases {base_tag}` first"
        )
    result = score_layers(dataset, base_tag, paths, scores=scores, layers=list(heads))
    return LayerTauTable(
        dataset, base_tag, result.layers, result.relative_depth,
        {k: heads[k].test_accuracy for k in result.layers}, {k: heads[k].head for k in result.layers},
        best_layer(heads), result.scores, {s: agreement(s, result.scores[s], heads) for s in result.scores},
        result.seconds, round(sum(h.seconds for h in heads.values()), 3), result.n_train,
        [k for k in best_val_layers(heads) if k != best_layer(heads)],
    )  # fmt: skip


@dataclass(frozen=True)
class ScoreSummary:
    """One score over several datasets."""

    score: str
    mean_kendall_tau: float
    mean_weighted_tau: float
    top_hits: int  # datasets whose selected layer, or one with the same val accuracy, is in the score's top 3
    n_datasets: int
    per_dataset_tau: dict[str, float] = field(default_factory=dict)


def _defined(values: dict[str, float]) -> bool:
    """A score computed for some layer (all NaN: undefined on that dataset, see :func:`_scored`)."""
    return any(not math.isnan(v) for v in values.values())


def cross_dataset_summary(tables: Sequence[LayerTauTable]) -> dict[str, ScoreSummary]:
    """Average every score's agreement over the tables (NaN taus, e.g. constant scores, are skipped)."""
    out = {}
    names = [s for s in SCORES if any(s in t.agreement and _defined(t.scores[s]) for t in tables)]
    for name in names:
        rows = [(t.dataset, t.agreement[name]) for t in tables if name in t.agreement and _defined(t.scores[name])]
        taus = [a.kendall_tau for _, a in rows if not math.isnan(a.kendall_tau)]
        wtaus = [a.weighted_tau for _, a in rows if not math.isnan(a.weighted_tau)]
        out[name] = ScoreSummary(name, float(np.mean(taus)) if taus else float("nan"),
                                 float(np.mean(wtaus)) if wtaus else float("nan"),
                                 sum(a.best_in_top for _, a in rows), len(rows),
                                 {d: a.kendall_tau for d, a in rows})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ multilayer vs single


@dataclass(frozen=True)
class PairedDifference:
    """The multilayer head minus the best single-layer head, on the same test images."""

    dataset: str
    base_tag: str
    multilayer_accuracy: float
    single_layer: str
    single_head: str
    single_accuracy: float
    difference: float
    ci95: tuple[float, float]  # Newcombe's paired interval over the test images
    n_test: int


def multilayer_vs_best_single(
    dataset: str, base_tag: str, paths: Paths | None = None, *, head: str = "multilayer"
) -> PairedDifference:
    """Test accuracy of ``head`` (saved under the all-stages folder) minus that of the best single-layer head
    chosen on val, with the 95% interval of the paired per-image difference (computed by
    :func:`featurecache.answer.multilayer_comparisons`, which the report uses too)."""
    paths = paths or default_paths()
    results = head_results(dataset, base_tag, paths)
    found = [c for c in multilayer_comparisons({base_tag: results}, [base_tag]) if c.result.head == head]
    if not found:
        raise FeaturecacheError(
            f"no {head} head and single-layer heads for {dataset} x {base_tag}; train them with `featurecache "
            f"train-heads --dataset {dataset} --bases {base_tag}`"
        )
    multi, single, (diff, low, high) = found[0].result, found[0].reference, found[0].gain
    return PairedDifference(dataset, base_tag, multi.test_accuracy, single.layer, single.head, single.test_accuracy,
                            diff, (low, high), len(multi.test_correct))  # fmt: skip
