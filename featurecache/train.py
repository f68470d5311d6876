"""Stage 2: sweep light heads on cached features, select on val, score on test once, save, rank.

For every layer x head: each grid point is fitted on train and scored on the val split (a predefined split,
never cross-validation, and test is not opened); the best is refitted on train (or train+val); only then is
the test split read, once, for accuracy with a Wilson 95% interval, balanced accuracy, macro-F1 and the
confusion matrix. Grid points are plain ``ParameterGrid`` fits rather than ``GridSearchCV`` because the refit
must be on train alone and the dense head early-stops on the val split.

This module makes the jobs and runs each in phases (:func:`run_job`: reuse check, load, sweep and refit, test
and record). Where the jobs run is :mod:`featurecache.backends`; how training rows are held in memory or
streamed from the cache is :mod:`featurecache.trainrows`; the ranking of saved heads is
:mod:`featurecache.leaderboard`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import persist, store
from featurecache.backends import check_backend, joblib_backend
from featurecache.bases import base_and_variant
from featurecache.commands import extract_command, views_flags
from featurecache.config import Paths, check_path_name, default_paths
from featurecache.data import AUGMENTED_TRAIN, SPLITS, Decoding
from featurecache.errors import FeaturecacheError, check_seed, close_names
from featurecache.freshness import feature_fingerprint
from featurecache.heads import HeadSpec, get_head_spec, list_heads, quiet_solvers, saved_head_name
from featurecache.metrics import classification_scores
from featurecache.progress import progress_bar
from featurecache.records import HEAD_KIND, HeadRecord, SidecarVersionError, library_versions
from featurecache.selection import best_grid_point, sweep_record
from featurecache.trainrows import TrainRows, fit_head, load_tap_rows, load_train_rows
from featurecache.weights import WeightsRef

log = logging.getLogger(__name__)

REFIT_MODES = ("train", "train+val")


@dataclass(frozen=True)
class TrainOptions:
    refit: str = "train"  # refit the selected head on train, or on train+val
    n_jobs: int = 1
    backend: str = "loky"  # where the jobs run (featurecache.backends.BACKENDS); never changes the results
    cluster_address: str | None = None  # dask scheduler / ray head; None: a local cluster (or the env's)
    augmented: bool = False  # also train on the cached augmented views (extract --train-views K); heads "<name>+aug"
    overwrite: bool = False
    seed: int = 0
    max_memory_gb: float | None = None  # None: half of the memory available now
    device: str = "cpu"  # for the dense head
    progress: bool = True

    def check(self) -> None:
        """Refuse what no sweep can run, before any cache is read (joblib's own refusal of 0 jobs was a traceback)."""
        check_backend(self.backend)
        check_seed(self.seed)
        if self.n_jobs == 0:
            raise FeaturecacheError("--n-jobs 0: give a number of parallel jobs (1 or more; -1: one per core)")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise FeaturecacheError(f"--max-memory-gb {self.max_memory_gb}: must be above 0 (leave it out: half of "
                                    "the memory available)")  # fmt: skip
        if self.refit not in REFIT_MODES:
            raise FeaturecacheError(f"unknown --refit {self.refit!r}; choose train or train+val")


@dataclass(frozen=True)
class Job:
    dataset: str
    base_tag: str
    layer: str
    head: str
    files: dict[str, str]  # split -> cache file
    out_dir: str
    options: TrainOptions
    threads: int
    taps: tuple[str, ...] = ()  # a multi-tap head's cached taps, side by side; empty: just `layer`

    @property
    def name(self) -> str:
        """The head as saved and ranked: ``logreg``, or ``logreg+aug`` when trained with the augmented views."""
        return saved_head_name(self.head, augmented=self.options.augmented)


def cache_files(dataset: str, base_tag: str, paths: Paths, *, augmented: bool = False) -> dict[str, Path]:
    """The split caches of a dataset x base (plus the augmented train views), or an error naming the command."""
    files = {s: paths.feature_file(dataset, base_tag, s) for s in SPLITS}
    if not files["train"].parent.is_dir():
        _refuse_unknown(dataset, base_tag, paths)
    views = paths.feature_file(dataset, base_tag, AUGMENTED_TRAIN)
    if augmented and not views.is_file():
        raise FeaturecacheError(
            f"--augmented needs cached augmented views of {dataset} x {base_tag} ({views} is missing); make them "
            f"once with `{extract_command(dataset, base_tag, '--train-views', '4', paths=paths)}` (or drop "
            f"--augmented)"
        )
    if augmented:
        files[AUGMENTED_TRAIN] = views
    missing = [s for s, p in files.items() if not p.is_file()]
    if missing:
        splits = [s for s in missing if s != AUGMENTED_TRAIN]
        only = ["--splits", ",".join(splits)] if 0 < len(splits) < len(SPLITS) else []
        raise FeaturecacheError(
            f"no feature cache for {dataset} x {base_tag} ({', '.join(missing)} missing under "
            f"{files[missing[0]].parent}); extract it first: `{extract_command(dataset, base_tag, *only, paths=paths)}`"
        )
    return files


def train_heads(
    *,
    dataset: str,
    base_tag: str,
    layers: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    options: TrainOptions | None = None,
    paths: Paths | None = None,
) -> list[dict[str, Any]]:
    """Sweep, select, score and save every requested layer x head; returns their sidecars (new or reused).

    Args:
        dataset: dataset name in ``data/features``.
        base_tag: the base's cache folder (``efficientnet_lite0``, ``efficientnet_lite0-random``, ...).
        layers: tap keys (default: every layer cached in all three splits).
        heads: head names (default: all registered heads).
    """
    options = options or TrainOptions()
    paths = paths or default_paths()
    options.check()  # a seed of -1: scikit-learn refused it deep inside linear_svm; logreg saved it in a head
    check_path_name(dataset, what="dataset name")  # both become folders under models/ and reports/
    check_path_name(base_tag, what="base")
    files = cache_files(dataset, base_tag, paths, augmented=options.augmented)
    metas = {s: store.read_metadata(p) for s, p in files.items()}
    _check_splits_agree(files, metas, augmented=options.augmented)
    _check_two_readable_classes(files["train"])
    cached = [k for k in metas["train"]["taps"] if all(k in m["taps"] for m in metas.values())]
    layers = list(layers) if layers else _default_layers(cached, metas["train"]["taps"])
    check_layers_in_every_split(layers, metas, files, dataset=dataset, base_tag=base_tag)
    heads = list(heads) if heads else list_heads()
    for h in heads:
        get_head_spec(h)
    # Fixed here, on the driver, whatever the backend: the torch heads' numbers depend on their thread count,
    # and the same command must give the same leaderboard on loky, dask or ray.
    threads = max(1, (os.cpu_count() or 1) // max(1, options.n_jobs))
    make = functools.partial(_job, dataset=dataset, base_tag=base_tag, files=files, options=options, threads=threads,
                             paths=paths)  # fmt: skip
    jobs = [make(layer, head) for layer in layers for head in heads if not get_head_spec(head).multi_tap]
    jobs += _multi_tap_jobs(layers, heads, metas["train"], make)
    return run_jobs(jobs, options, desc=f"{dataset}/{base_tag}")


def _default_layers(cached: list[str], taps: dict[str, dict[str, Any]]) -> list[str]:
    """Every tap the caches share, but the base's ImageNet logits (``store.is_imagenet_logits``), which
    compare-layers caches to measure the distance from ImageNet and does not compare (trained on only when
    asked: ``--layers <key>``). A cache of the logits alone trains on them."""
    layers = [k for k in cached if not store.is_imagenet_logits(taps[k])]
    if layers and len(layers) < len(cached):
        logits = ",".join(k for k in cached if k not in layers)
        log.info("leaving out the ImageNet logits tap %s (pass --layers %s to train heads on it)", logits, logits)
        return layers
    return cached


def _check_two_readable_classes(train: Path) -> None:
    """A head needs two classes among the train rows that could be read; extract refuses a train split with a class
    of unreadable images, but a cache made before it did would reach the estimator as a traceback."""
    labels, _, valid = store.read_rows(train)
    if len(np.unique(labels[valid])) < 2:
        raise FeaturecacheError(
            f"the readable images of {train} hold fewer than two classes (`featurecache info` lists the files it "
            f"could not read); make them readable and re-extract"
        )


def _check_splits_agree(files: dict[str, Path], metas: dict[str, dict[str, Any]], *, augmented: bool) -> None:
    """The split caches (and the augmented views) must come from one extraction: same classes, base, train rows."""
    if augmented and metas[AUGMENTED_TRAIN].get("source_rows") != metas["train"]["num_samples"]:
        raise FeaturecacheError(
            f"{files[AUGMENTED_TRAIN]} was made from another train split than {files['train']}; re-extract with "
            f"--train-views"
        )
    if (
        len({json.dumps(m["class_names"]) for m in metas.values()}) != 1
        or len({m["base"] for m in metas.values()}) != 1
    ):
        raise FeaturecacheError(
            f"the split caches under {files['train'].parent} disagree on classes or base; re-extract"
        )
    recorded = {s: Decoding.recorded(m) for s, m in metas.items()}
    # Augmented views always decode in full (random crops): they are compared on alpha and orientation only.
    if AUGMENTED_TRAIN in recorded:
        recorded[AUGMENTED_TRAIN] = dataclasses.replace(recorded[AUGMENTED_TRAIN], decode=recorded["train"].decode)
    # The raw alpha: a cache from before --alpha (none recorded) flattened transparency, unlike any --alpha.
    decoded = {s: (metas[s].get("alpha"), d.orientation, d.decode) for s, d in recorded.items()}
    if len(set(decoded.values())) != 1:
        raise FeaturecacheError(
            f"the split caches under {files['train'].parent} decoded their images differently (--alpha/--orientation/"
            f"--decode: {', '.join(f'{s} {a}/{o}/{d}' for s, (a, o, d) in decoded.items())}); re-extract every "
            f"split alike"
        )


def run_jobs(jobs: Sequence[Job], options: TrainOptions, *, desc: str) -> list[dict[str, Any]]:
    """Run ``jobs`` on the chosen joblib backend with a progress bar; their sidecars, in ``jobs`` order."""
    from joblib import Parallel, delayed

    results = []
    bar = progress_bar(total=len(jobs), unit="head", desc=desc, disable=not options.progress)
    try:
        with joblib_backend(options.backend, n_jobs=options.n_jobs, address=options.cluster_address):
            runner = Parallel(n_jobs=options.n_jobs, return_as="generator_unordered")
            for sidecar in runner(delayed(run_job)(job) for job in jobs):
                results.append(sidecar)
                bar.set_postfix_str(f"{sidecar['layer']}/{sidecar['head']} test {sidecar['test']['accuracy']:.3f}")
                bar.update()
    finally:
        bar.close()
    order = {(j.layer, j.name): i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda s: order[(s["layer"], s["head"])])


def _refuse_unknown(dataset: str, base_tag: str, paths: Paths) -> None:
    """Nothing is cached for ``dataset`` x ``base_tag``: a mistyped dataset or base tag is answered with the cached
    names closest to it; a new one with the command that extracts it."""
    datasets = sorted(p.name for p in paths.features.glob("*") if p.is_dir()) if paths.features.is_dir() else []
    if dataset not in datasets and datasets:
        close = close_names(dataset, datasets)
        raise FeaturecacheError(
            f"no caches of a dataset {dataset!r} under {paths.features}"
            + (f"; did you mean: {', '.join(close)}?" if close else ".")
            + f" Cached datasets: {', '.join(datasets)}. A new one: `{extract_command(dataset, base_tag, paths=paths)}`"
        )
    tags = sorted(p.name for p in (paths.features / dataset).glob("*") if p.is_dir())
    close = close_names(base_tag, tags)
    if close and base_and_variant(base_tag) is None:
        raise FeaturecacheError(
            f"no caches of {base_tag!r} for {dataset}; did you mean: {', '.join(close)}? Cached: {', '.join(tags)}"
        )


def check_layers_in_every_split(
    layers: Sequence[str], metas: dict[str, dict[str, Any]], files: dict[str, Path], *, dataset: str, base_tag: str
) -> None:
    """Refuse layers that some split's cache lacks (the splits were extracted with different --layers), naming
    the files and the extract command that adds them; a head needs the same layer in train, val and test."""
    for layer in layers:
        lacking = [s for s, m in metas.items() if layer not in m["taps"]]
        if not lacking:
            continue
        having = [s for s in metas if s not in lacking]
        cached = [k for k in metas["train"]["taps"] if all(k in m["taps"] for m in metas.values())]
        add = extract_command(dataset, base_tag, *_add_layer(layer, lacking, metas), meta=metas["train"])
        if not having:
            close = close_names(layer, cached)
            raise FeaturecacheError(
                f"layer {layer} is cached in no split of {dataset} x {base_tag}"
                + (f"; did you mean: {', '.join(close)}?" if close else ".")
                + f" To extract it: `{add}`. Cached layers: {', '.join(cached) or 'none'}"
            )
        raise FeaturecacheError(
            f"layer {layer} is cached in {', '.join(having) or 'no split'} but not in {', '.join(lacking)} "
            f"({files[lacking[0]]}); the splits of {dataset} x {base_tag} were extracted with different --layers. "
            f"Add it with `{add}` (cached taps are kept), or use a layer every split has: {', '.join(cached) or 'none'}"
        )


def _add_layer(layer: str, lacking: Sequence[str], metas: dict[str, dict[str, Any]]) -> list[str]:
    """The ``extract`` arguments that add ``layer`` to the caches that lack it: the splits by name, the augmented
    views by the options that made them (``--splits train`` plus ``--train-views``)."""
    splits = [s for s in lacking if s != AUGMENTED_TRAIN] or ["train"]
    views = views_flags(metas[AUGMENTED_TRAIN]) if AUGMENTED_TRAIN in lacking else []
    weights = WeightsRef.parse(str(metas["train"].get("weights", "")))
    if "--seed" in views and weights.is_random and weights.seed:  # the control's flags say --seed already
        views = views[: views.index("--seed")]
    node, _, pool = layer.partition("@")  # a tap key is node@pool for a pooling other than the default
    return ["--layers", f"{node}:{pool}" if pool else node, "--splits", ",".join(splits), *views]


# The pseudo layer of heads that read every stage tap: models/<ds>/<base>/all-stages/<head>. Its sidecar's `tap`
# has relative_depth 1.0, multi_tap true and imagenet_logits false, and `taps` lists the cached taps in the order
# they are concatenated.
MULTI_TAP_LAYER = "all-stages"


def _job(layer: str, head: str, taps: tuple[str, ...] = (), *, dataset: str, base_tag: str, files: dict[str, Path],
         options: TrainOptions, threads: int, paths: Paths) -> Job:  # fmt: skip
    """One layer x head job, saved under ``models/<dataset>/<base_tag>/<layer>/<head>``."""
    name = saved_head_name(head, augmented=options.augmented)
    return Job(dataset, base_tag, layer, head, {s: str(p) for s, p in files.items()},
               str(paths.head_dir(dataset, base_tag, layer, name)), options, threads, taps)  # fmt: skip


def _multi_tap_jobs(
    layers: Sequence[str], heads: Sequence[str], meta: dict[str, Any], make: Callable[..., Job]
) -> list[Job]:
    """One job per multi-tap head: every requested layer but the ImageNet logits, which are no stage."""
    # in cache order (shallow to deep), whatever order the layers were asked for in
    taps = tuple(k for k, tap in meta["taps"].items() if k in layers and not store.is_imagenet_logits(tap))
    return [make(MULTI_TAP_LAYER, head, taps) for head in heads if get_head_spec(head).multi_tap and taps]


def _job_tap(job: Job, meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's `tap`: the cached tap, or for a multi-tap head the marker described at MULTI_TAP_LAYER."""
    if not job.taps:
        return meta["taps"][job.layer]
    return {"key": MULTI_TAP_LAYER, "multi_tap": True, "relative_depth": 1.0, "imagenet_logits": False,
            "out_dim": sum(meta["taps"][t]["out_dim"] for t in job.taps)}  # fmt: skip


def _job_fingerprint(job: Job, meta: dict[str, Any]) -> str:
    taps = job.taps or (job.layer,)
    return " + ".join(feature_fingerprint(meta, t) for t in taps)


def _grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    from sklearn.model_selection import ParameterGrid

    return list(ParameterGrid(grid))


@dataclass(frozen=True)
class JobPlan:
    """What a job fits, decided before any fit: the head, the caches' metadata and fingerprints, the grid."""

    job: Job
    spec: HeadSpec
    metas: dict[str, dict[str, Any]]  # split -> cache metadata
    features: dict[str, dict[str, str]]  # split -> {file, fingerprint}: what the saved head records
    grid: list[dict[str, Any]]


@dataclass
class JobRows:
    """What a job fits on: the train rows (in memory or streamed) and the val split in memory."""

    train: TrainRows
    X_val: np.ndarray
    y_val: np.ndarray


@dataclass(frozen=True)
class Fitted:
    """The sweep on val and the head chosen from it, refitted."""

    sweep: list[dict[str, Any]]  # per grid point: params, val_accuracy, fit_seconds
    params: dict[str, Any]  # the selected grid point
    val_accuracy: float  # its val accuracy in the sweep (what selected it)
    final: Any  # the selected head, refitted on train or train+val
    refit_seconds: float


def run_job(job: Job) -> dict[str, Any]:
    """One layer x head: reuse a matching saved head, or sweep on val, refit, test once and save."""
    import torch

    torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    plan = _plan(job)
    previous, replaced = _reusable(plan)
    if previous is not None:
        return {**previous.to_json(), "status": "reused"}
    rows = _load_job_rows(plan)
    try:
        fitted = _sweep_and_refit(plan, rows)
    finally:
        rows.train.close()  # the HDF5 files a streamed split reads from
    record = persist.save_head(Path(job.out_dir), fitted.final, _test_and_record(plan, rows, fitted, t_start))
    return {**record.to_json(), "status": "trained", "replaced": replaced}


def _plan(job: Job) -> JobPlan:
    """Read the caches' metadata (checked again here: a cache may have been re-extracted since train_heads looked,
    or on another worker), fingerprint the features, and lay out the grid."""
    spec = get_head_spec(job.head)
    metas = {s: store.read_metadata(p) for s, p in job.files.items()}
    check_layers_in_every_split(list(job.taps or (job.layer,)), metas, {s: Path(p) for s, p in job.files.items()},
                                dataset=job.dataset, base_tag=job.base_tag)  # fmt: skip
    features = {s: {"file": job.files[s], "fingerprint": _job_fingerprint(job, metas[s])} for s in job.files}
    grid = _grid_points(spec.grid)
    if job.taps:  # the head needs to know where one tap's columns end and the next begin
        grid = [{**p, "group_sizes": [metas["train"]["taps"][t]["out_dim"] for t in job.taps]} for p in grid]
    return JobPlan(job, spec, metas, features, grid)


def _reusable(plan: JobPlan) -> tuple[HeadRecord | None, list[str]]:
    """The saved head of this job when it was trained on the same features, grid, refit and seed; else None and
    what differs from the saved one it will replace (a multilayer head of a --shortlist run and one of every tap
    share their folder: the user is told which one was replaced, and why)."""
    opts, out_dir = plan.job.options, Path(plan.job.out_dir)
    try:
        previous = persist.read_record(out_dir)
    except SidecarVersionError:
        return None, []  # written by another version: retrained over
    if previous is None or opts.overwrite or not (out_dir / persist.HEAD_FILE).is_file():
        return None, []
    differs = {
        "features": not previous.trained_on(plan.features),
        "grid": previous.grid != json.loads(json.dumps(plan.grid, default=list)),
        "refit": previous.refit != opts.refit,
        "seed": previous.seed != opts.seed,
    }
    changed = [what for what, different in differs.items() if different]
    return (None, changed) if changed else (previous, [])


def _load_job_rows(plan: JobPlan) -> JobRows:
    """Train rows (plus the augmented views) and val rows; a multi-tap job's taps side by side."""
    job = plan.job
    train_files = [job.files["train"]] + ([job.files[AUGMENTED_TRAIN]] if AUGMENTED_TRAIN in job.files else [])
    if job.taps:
        train = TrainRows.in_memory(*load_tap_rows(train_files, job.taps))
        X_val, y_val = load_tap_rows([job.files["val"]], job.taps)
    else:
        train = load_train_rows(train_files, job.layer, plan.spec, max_memory_gb=job.options.max_memory_gb)
        X_val, y_val, _ = store.load_features(job.files["val"], job.layer)
    return JobRows(train, X_val.astype(np.float32), y_val)


def _sweep_and_refit(plan: JobPlan, rows: JobRows) -> Fitted:
    """Fit every grid point on train and score it on val; keep the best (``selection.best_grid_point``) and refit it
    on train+val when asked (the dense head for the epoch count it early-stopped at, on the same device)."""
    opts, spec = plan.job.options, plan.spec
    with quiet_solvers():
        if spec.sweep is not None and not rows.train.streamed:
            fitted = spec.sweep(rows.train.X, rows.train.y, rows.X_val, rows.y_val, plan.grid, seed=opts.seed)
        else:
            fitted = [_fit_point(plan, params, rows) for params in plan.grid]
    sweep = sweep_record(fitted, rows.X_val, rows.y_val)
    params, final, val_accuracy, _ = fitted[best_grid_point(sweep)]
    t_refit = time.perf_counter()
    if opts.refit == "train+val":
        selected = final
        final = spec.build(opts.seed).set_params(**params)
        if spec.dense:  # no early stopping without a held-out split: train for the selected epoch count
            final.set_params(max_epochs=selected.best_epoch_, validation_fraction=0.0)
        X_tr, y_tr = rows.train.materialize()
        both = TrainRows.in_memory(np.concatenate([X_tr, rows.X_val]), np.concatenate([y_tr, rows.y_val]))
        with quiet_solvers():
            fit_head(final, both, eval_set=None, dense=spec.dense, device=opts.device)
    return Fitted(sweep, params, val_accuracy, final, time.perf_counter() - t_refit)


def _fit_point(plan: JobPlan, params: dict[str, Any], rows: JobRows) -> tuple[dict[str, Any], Any, float, float]:
    """One grid point fitted on train (in memory or streamed): ``(params, estimator, val accuracy, seconds)``."""
    estimator = plan.spec.build(plan.job.options.seed).set_params(**params)
    t0 = time.perf_counter()
    fit_head(estimator, rows.train, eval_set=(rows.X_val, rows.y_val), dense=plan.spec.dense,
             device=plan.job.options.device)  # fmt: skip
    fit_seconds = time.perf_counter() - t0
    return params, estimator, float((estimator.predict(rows.X_val) == rows.y_val).mean()), fit_seconds


def _test_and_record(plan: JobPlan, rows: JobRows, fitted: Fitted, t_start: float) -> HeadRecord:
    """Score the refitted head on val and, opened here after selection exactly once, on test; its record."""
    job, meta, final = plan.job, plan.metas["train"], fitted.final
    if job.taps:
        X_test, y_test = load_tap_rows([job.files["test"]], job.taps)
    else:
        X_test, y_test, _ = store.load_features(job.files["test"], job.layer)
    n_classes = len(meta["class_names"])
    test_pred, val_pred = final.predict(X_test.astype(np.float32)), final.predict(rows.X_val)
    # Per-image predictions (valid rows, cache order) let the report compare heads on the same images (McNemar).
    test_scores = {**classification_scores(y_test, test_pred, n_classes=n_classes), "predictions": test_pred}
    val_scores = {**classification_scores(rows.y_val, val_pred, n_classes=n_classes), "predictions": val_pred}
    sweep_seconds = sum(s["fit_seconds"] for s in fitted.sweep)
    decoding = Decoding.recorded(meta)
    return HeadRecord(
        kind=HEAD_KIND, dataset=job.dataset, base=meta["base"], base_tag=job.base_tag, weights=meta["weights"],
        feature_dtype=meta["dtype"],
        # How the images were decoded (--alpha, --orientation, --decode): predict decodes new ones the same way.
        alpha=meta.get("alpha"), orientation=decoding.orientation, decode=decoding.decode,
        layer=job.layer, tap=_job_tap(job, meta), taps=job.taps or None, head=job.name, head_spec=job.head,
        train_views=int(plan.metas[AUGMENTED_TRAIN]["views"]) if AUGMENTED_TRAIN in plan.metas else 0,
        dense=plan.spec.dense, class_names=tuple(meta["class_names"]), features=plan.features, grid=plan.grid,
        sweep=fitted.sweep, params=fitted.params, refit=job.options.refit, seed=job.options.seed,
        selection_val_accuracy=fitted.val_accuracy, val=val_scores, test=test_scores, n_train=int(rows.train.n),
        streamed=rows.train.streamed,
        timings={"sweep_seconds": round(sweep_seconds, 3), "refit_seconds": round(fitted.refit_seconds, 3),
                 "total_seconds": round(time.perf_counter() - t_start, 3)},
        library_versions=library_versions("sklearn", "joblib"),
    )  # fmt: skip
