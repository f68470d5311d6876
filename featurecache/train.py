"""Stage 2: sweep light heads on cached features, select on val, score on test once, save, rank.

For every layer x head: each grid point is fitted on train and scored on the val split (a predefined split,
never cross-validation, and test is not opened); the best is refitted on train (or train+val); only then is
the test split read, once, for accuracy with a bootstrap 95% interval, balanced accuracy, macro-F1 and the
confusion matrix. Grid points are plain ``ParameterGrid`` fits rather than ``GridSearchCV`` because the refit
must be on train alone and the dense head early-stops on the val split.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import persist, store
from featurecache.config import Paths, check_path_name, default_paths
from featurecache.data import AUGMENTED_TRAIN
from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write_text
from featurecache.heads import get_head_spec, list_heads, saved_head_name
from featurecache.metrics import classification_scores
from featurecache.records import HEAD_KIND, HeadRecord, SidecarVersionError
from featurecache.selection import candidate_of_record, ranked
from featurecache.weights import base_of_tag, is_random_tag

log = logging.getLogger(__name__)

REFIT_MODES = ("train", "train+val")
# joblib backends for the sweep; dask and ray are optional extras that run the same jobs on a cluster.
BACKENDS = ("loky", "dask", "ray")


@dataclass(frozen=True)
class TrainOptions:
    refit: str = "train"  # refit the selected head on train, or on train+val
    n_jobs: int = 1
    backend: str = "loky"  # where the layer x head jobs run (see BACKENDS); never changes the results
    cluster_address: str | None = None  # dask scheduler / ray head; None: a local cluster (or the env's)
    augmented: bool = False  # also train on the cached augmented views (extract --train-views K); heads "<name>+aug"
    overwrite: bool = False
    seed: int = 0
    max_memory_gb: float | None = None  # None: half of the memory available now
    device: str = "cpu"  # for the dense head
    progress: bool = True


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
    files = {s: paths.feature_file(dataset, base_tag, s) for s in ("train", "val", "test")}
    views = paths.feature_file(dataset, base_tag, AUGMENTED_TRAIN)
    if augmented and not views.is_file():
        raise FeaturecacheError(
            f"--augmented needs cached augmented views of {dataset} x {base_tag} ({views} is missing); make them "
            f"once with `featurecache extract data/raw/{dataset} --base {base_tag} --train-views 4` "
            f"(or drop --augmented)"
        )
    if augmented:
        files[AUGMENTED_TRAIN] = views
    missing = [s for s, p in files.items() if not p.is_file()]
    if missing:
        base = base_of_tag(base_tag)
        weights = " --weights none --dtype float32" if is_random_tag(base_tag) else ""
        raise FeaturecacheError(
            f"no feature cache for {dataset} x {base_tag} ({', '.join(missing)} missing under "
            f"{files[missing[0]].parent}); run make extract first: `make extract DATASET={dataset} BASE={base}` "
            f"or `featurecache extract data/raw/{dataset} --base {base}{weights}`"
        )
    return files


def feature_fingerprint(meta: dict[str, Any], layer: str) -> str:
    return f"{meta['config_fingerprint']}:{layer}:{json.dumps(meta['taps'][layer], sort_keys=True)}"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


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
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    options = options or TrainOptions()
    paths = paths or default_paths()
    if options.refit not in REFIT_MODES:
        raise FeaturecacheError(f"unknown --refit {options.refit!r}; choose train or train+val")
    if options.backend not in BACKENDS:
        raise FeaturecacheError(f"unknown --backend {options.backend!r}; choose one of: {', '.join(BACKENDS)}")
    check_path_name(dataset, what="dataset name")  # both become folders under models/ and reports/
    check_path_name(base_tag, what="base")
    files = cache_files(dataset, base_tag, paths, augmented=options.augmented)
    metas = {s: store.read_metadata(p) for s, p in files.items()}
    if options.augmented and metas[AUGMENTED_TRAIN].get("source_rows") != metas["train"]["num_samples"]:
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
    cached = [k for k in metas["train"]["taps"] if all(k in m["taps"] for m in metas.values())]
    layers = list(layers) if layers else cached
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
    results = []
    bar = tqdm(total=len(jobs), unit="head", desc=f"{dataset}/{base_tag}", disable=not options.progress)
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
        raise FeaturecacheError(
            f"layer {layer} is cached in {', '.join(having) or 'no split'} but not in {', '.join(lacking)} "
            f"({files[lacking[0]]}); the splits of {dataset} x {base_tag} were extracted with different --layers. "
            f"Add it with `featurecache extract data/raw/{dataset} --layers {layer} --splits "
            f"{','.join(s for s in lacking if s != AUGMENTED_TRAIN) or 'train'}` (cached taps are kept), or use "
            f"a layer every split has: {', '.join(cached) or 'none'}"
        )


# The pseudo layer of heads that read every stage tap: models/<ds>/<base>/all-stages/<head>. Its sidecar's `tap`
# has relative_depth 1.0 and multi_tap true, and `taps` lists the cached taps in the order they are concatenated.
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
    """One job per multi-tap head: every requested layer below depth 1.0 (the ImageNet logits are no stage)."""
    # in cache order (shallow to deep), whatever order the layers were asked for in
    taps = tuple(k for k, tap in meta["taps"].items() if k in layers and tap["relative_depth"] < 1.0)
    return [make(MULTI_TAP_LAYER, head, taps) for head in heads if get_head_spec(head).multi_tap and taps]


def _load_taps(job: Job, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A multi-tap job's rows: its taps side by side, the rows of every file one after another."""
    rows = []
    for f in files:
        parts = [store.load_features(f, tap)[:2] for tap in job.taps]
        rows.append((np.concatenate([p[0] for p in parts], axis=1).astype(np.float32), parts[0][1]))
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def _job_tap(job: Job, meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's `tap`: the cached tap, or for a multi-tap head the marker described at MULTI_TAP_LAYER."""
    if not job.taps:
        return meta["taps"][job.layer]
    return {"key": MULTI_TAP_LAYER, "multi_tap": True, "relative_depth": 1.0,
            "out_dim": sum(meta["taps"][t]["out_dim"] for t in job.taps)}  # fmt: skip


def _job_fingerprint(job: Job, meta: dict[str, Any]) -> str:
    taps = job.taps or (job.layer,)
    return " + ".join(feature_fingerprint(meta, t) for t in taps)


@contextlib.contextmanager
def joblib_backend(backend: str, *, n_jobs: int, address: str | None = None) -> Iterator[None]:
    """Run the enclosed joblib calls on loky (local processes), a Dask cluster or a Ray cluster.

    Dask: ``address`` is a scheduler (``tcp://host:8786``); without one, ``$DASK_SCHEDULER_ADDRESS`` or else a
    local cluster of ``n_jobs`` single-threaded worker processes. Ray: ``address`` or ``$RAY_ADDRESS``, else a
    local Ray. Cluster workers read the caches and write the models by path, so they need the same filesystem.
    """
    from joblib import parallel_config

    if backend == "loky":
        with parallel_config(backend="loky"):
            yield
        return
    if backend == "dask":
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise FeaturecacheError("--backend dask needs dask.distributed: pip install 'featurecache[dask]'") from None
        address = address or os.environ.get("DASK_SCHEDULER_ADDRESS")
        cluster = None
        if address is None:
            workers = n_jobs if n_jobs > 0 else os.cpu_count() or 1
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(address or cluster)
        log.info("dask backend: %s", client)
        try:
            with parallel_config(backend="dask"):
                yield
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError:
        raise FeaturecacheError("--backend ray needs ray: pip install 'featurecache[ray]'") from None
    register_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)  # None: $RAY_ADDRESS if set, else a local Ray
    try:
        with parallel_config(backend="ray"):
            yield
    finally:
        if started:
            ray.shutdown()


def _grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    from sklearn.model_selection import ParameterGrid

    return list(ParameterGrid(grid))


def run_job(job: Job) -> dict[str, Any]:
    """One layer x head: reuse a matching saved head, or sweep on val, refit, test once and save."""
    import torch

    torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    spec = get_head_spec(job.head)
    opts = job.options
    metas = {s: store.read_metadata(p) for s, p in job.files.items()}
    # Checked again here: a cache may have been re-extracted since train_heads looked (or on another worker).
    check_layers_in_every_split(list(job.taps or (job.layer,)), metas, {s: Path(p) for s, p in job.files.items()},
                                dataset=job.dataset, base_tag=job.base_tag)  # fmt: skip
    features = {s: {"file": job.files[s], "fingerprint": _job_fingerprint(job, metas[s])} for s in job.files}
    grid = _grid_points(spec.grid)
    if job.taps:  # the head needs to know where one tap's columns end and the next begin
        grid = [{**p, "group_sizes": [metas["train"]["taps"][t]["out_dim"] for t in job.taps]} for p in grid]
    out_dir = Path(job.out_dir)
    try:
        previous = persist.read_record(out_dir)
    except SidecarVersionError:
        previous = None  # written by another version: retrained over
    if previous is not None and not opts.overwrite:
        same = (
            previous.features == features
            and previous.grid == json.loads(json.dumps(grid, default=list))
            and previous.refit == opts.refit
            and previous.seed == opts.seed
        )
        if same and (out_dir / persist.HEAD_FILE).is_file():
            return {**previous.to_json(), "status": "reused"}

    train_files = [job.files["train"]] + ([job.files[AUGMENTED_TRAIN]] if AUGMENTED_TRAIN in job.files else [])
    if job.taps:
        X_tr, y_tr = _load_taps(job, train_files)
        train = (X_tr, y_tr, len(y_tr), None)
        X_val, y_val = _load_taps(job, [job.files["val"]])
    else:
        train = _load_split(train_files, job.layer, spec, opts)
        X_val, y_val, _ = store.load_features(job.files["val"], job.layer)
    X_val = X_val.astype(np.float32)

    if spec.sweep is not None and train[3] is None:
        fitted = spec.sweep(train[0], train[1], X_val, y_val, grid, seed=opts.seed)
    else:
        fitted = []
        for params in grid:
            estimator = spec.build(opts.seed).set_params(**params)
            t0 = time.perf_counter()
            _fit(estimator, train, eval_set=(X_val, y_val), spec_dense=spec.dense, device=opts.device)
            fit_seconds = time.perf_counter() - t0
            fitted.append((params, estimator, float((estimator.predict(X_val) == y_val).mean()), fit_seconds))
    sweep = []
    best = None
    for params, estimator, val_accuracy, fit_seconds in fitted:
        sweep.append({"params": params, "val_accuracy": val_accuracy, "fit_seconds": round(fit_seconds, 4)})
        if best is None or val_accuracy > best[2]:  # ties keep the earlier (grid order) point
            best = (params, estimator, val_accuracy)
    best_params, final, selection_val_accuracy = best

    t_refit = time.perf_counter()
    if opts.refit == "train+val":
        final = spec.build(opts.seed).set_params(**best_params)
        if spec.dense:  # no early stopping without a held-out split: train for the selected epoch count
            final.set_params(max_epochs=best[1].best_epoch_, validation_fraction=0.0)
        X_tr, y_tr = _materialize(train)
        _fit(final, (np.concatenate([X_tr, X_val]), np.concatenate([y_tr, y_val])), eval_set=None,
             spec_dense=spec.dense, device=opts.device)  # fmt: skip
    refit_seconds = time.perf_counter() - t_refit

    if train[3] is not None:
        for handle in train[3][3]:
            handle.close()  # the HDF5 files the streaming loaders read from

    # The test split is opened here, after selection, exactly once.
    if job.taps:
        X_test, y_test = _load_taps(job, [job.files["test"]])
    else:
        X_test, y_test, _ = store.load_features(job.files["test"], job.layer)
    n_classes = len(metas["train"]["class_names"])
    test_pred, val_pred = final.predict(X_test.astype(np.float32)), final.predict(X_val)
    # Per-image predictions (valid rows, cache order) let the report compare heads on the same images (McNemar).
    test_scores = {**classification_scores(y_test, test_pred, n_classes=n_classes), "predictions": test_pred}
    val_scores = {**classification_scores(y_val, val_pred, n_classes=n_classes), "predictions": val_pred}
    tap = _job_tap(job, metas["train"])
    meta = metas["train"]
    record = HeadRecord(
        kind=HEAD_KIND,
        dataset=job.dataset,
        base=meta["base"],
        base_tag=job.base_tag,
        weights=meta["weights"],
        feature_dtype=meta["dtype"],
        alpha=meta.get("alpha"),  # how transparent images were decoded; predict decodes the same way
        layer=job.layer,
        tap=tap,
        taps=job.taps or None,
        head=job.name,
        head_spec=job.head,
        train_views=int(metas[AUGMENTED_TRAIN]["views"]) if AUGMENTED_TRAIN in metas else 0,
        dense=spec.dense,
        class_names=tuple(meta["class_names"]),
        features=features,
        grid=grid,
        sweep=sweep,
        params=best_params,
        refit=opts.refit,
        seed=opts.seed,
        selection_val_accuracy=selection_val_accuracy,
        val=val_scores,
        test=test_scores,
        n_train=int(train[2]),
        streamed=bool(train[3]),
        timings={
            "sweep_seconds": round(sum(s["fit_seconds"] for s in sweep), 3),
            "refit_seconds": round(refit_seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
        },
        library_versions=_library_versions(),
    )
    record = persist.save_head(out_dir, final, record)
    return {**record.to_json(), "status": "trained"}


def _library_versions() -> dict[str, str]:
    import platform

    import joblib
    import sklearn
    import torch

    from featurecache import __version__

    return {"featurecache": __version__, "scikit-learn": sklearn.__version__, "torch": torch.__version__,
            "joblib": joblib.__version__, "numpy": np.__version__, "python": platform.python_version()}  # fmt: skip


# train split as (X, y, n, loaders): in memory (loaders None) or as lazy HDF5 chunks for streaming heads
TrainData = tuple[Any, Any, int, Any]


def _load_split(files: Sequence[str], layer: str, spec: Any, opts: TrainOptions) -> TrainData:
    """The training rows of ``layer`` from one or more caches (train, plus its augmented views), in memory when
    they fit the budget, else as chunk loaders for the heads that stream."""
    import h5py

    metas = [store.read_metadata(f) for f in files]
    n, dim = sum(m["num_valid"] for m in metas), metas[0]["taps"][layer]["out_dim"]
    need = n * dim * 4 * 3  # float32 copy + standardized copy + solver workspace
    budget = int((opts.max_memory_gb * 2**30) if opts.max_memory_gb is not None else _available_memory() // 2)
    shown = " + ".join(str(f) for f in files)
    if need <= budget:
        parts = [store.load_features(f, layer)[:2] for f in files]
        X = np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False)
        return X, np.concatenate([p[1] for p in parts]), n, None
    if not spec.streams:
        raise FeaturecacheError(
            f"layer {layer} of {shown} needs about {need / 2**30:.1f} GiB in memory for head {spec.name!r}, over the "
            f"budget of {budget / 2**30:.1f} GiB. Use a head that streams from the cache (--heads mlp), a pooled "
            f"layer (avg/grid2 instead of raw maps), or raise --max-memory-gb"
        )
    log.info("%s of %s does not fit in %.1f GiB: streaming it in chunks", layer, shown, budget / 2**30)

    def loader(
        dset: Any, labels: Any, valid: Any, start: int, stop: int
    ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def read() -> tuple[np.ndarray, np.ndarray]:
            keep = valid[start:stop]
            return dset[start:stop][keep].astype(np.float32), labels[start:stop][keep]

        return read

    handles, loaders = [], []
    for f in files:
        handle = h5py.File(f, "r")
        handles.append(handle)
        dset, labels, valid = handle["features"][layer], handle["labels"], handle["valid"]
        step = max(dset.chunks[0], (64 << 20) // max(1, 4 * dim))
        step -= step % dset.chunks[0]
        loaders += [loader(dset, labels, valid, s, min(s + step, dset.shape[0])) for s in range(0, dset.shape[0], step)]
    return None, None, n, (loaders, np.arange(len(metas[0]["class_names"])), dim, handles)


def _materialize(train: TrainData) -> tuple[np.ndarray, np.ndarray]:
    X, y, _, stream = train
    if stream is None:
        return X, y
    parts = [load() for load in stream[0]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _fit(estimator: Any, train: Any, *, eval_set: Any, spec_dense: bool, device: str) -> None:
    if spec_dense:
        estimator.set_params(device=device)
    if len(train) == 2:
        estimator.fit(*train)
        return
    X, y, _, stream = train
    if stream is not None:
        loaders, classes, dim, _ = stream
        estimator.fit_stream(loaders, classes=classes, n_features=dim, eval_set=eval_set)
    elif spec_dense:
        estimator.fit(X, y, eval_set=eval_set)
    else:
        estimator.fit(X, y)


# ------------------------------------------------------------------------------------------- leaderboard

LEADERBOARD_COLUMNS = [
    "base", "layer", "relative_depth", "head", "params", "val_accuracy", "test_accuracy", "test_ci_low",
    "test_ci_high", "test_balanced_accuracy", "test_macro_f1", "fit_seconds", "n_train", "model_dir",
]  # fmt: skip


def leaderboard_rows(dataset: str, paths: Paths) -> list[dict[str, Any]]:
    """One row per saved head of the dataset (every base), best first under the one selection rule
    (:mod:`featurecache.selection`: val accuracy; ties to the simpler head, then the shallower layer)."""
    rows = []
    for r in ranked(_records(paths.head_dirs(dataset)), candidate_of_record):
        rows.append(
            {
                "base": r.base_tag,
                "layer": r.layer,
                "relative_depth": r.tap["relative_depth"],
                "head": r.head,
                "dense": r.dense,
                "params": json.dumps(r.params, sort_keys=True),
                "val_accuracy": round(r.selection_val_accuracy, 4),
                "test_accuracy": round(r.test["accuracy"], 4),
                "test_ci_low": round(r.test["accuracy_ci95"][0], 4),
                "test_ci_high": round(r.test["accuracy_ci95"][1], 4),
                "test_balanced_accuracy": round(r.test["balanced_accuracy"], 4),
                "test_macro_f1": round(r.test["macro_f1"], 4),
                "fit_seconds": (r.timings or {}).get("total_seconds", 0.0),
                "n_train": r.n_train,
                "model_dir": str(paths.head_dir(dataset, r.base_tag, r.layer, r.head)),
            }
        )
    return rows


def _records(directories: Iterable[Path]) -> Iterator[HeadRecord]:
    """The records of the saved heads in ``directories``; one from another featurecache version is left out with
    a warning naming its retrain command (the rest of the leaderboard stands)."""
    for directory in directories:
        try:
            record = persist.read_record(directory)
        except SidecarVersionError as exc:
            log.warning("left out of the leaderboard: %s", exc)
            continue
        if record is not None:
            yield record


def write_leaderboard(dataset: str, paths: Paths | None = None) -> dict[str, Any]:
    """Write ``reports/<dataset>/results.{csv,md}`` and ``best.json``; returns the best.json content."""
    paths = paths or default_paths()
    rows = leaderboard_rows(dataset, paths)
    if not rows:
        raise FeaturecacheError(f"no trained heads under {paths.models / dataset}; run `make train-heads` first")
    out = paths.leaderboard_dir(dataset)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    atomic_write_text(out / "results.md", format_leaderboard(dataset, rows))
    dense = [r for r in rows if r["dense"]]
    best = {
        "dataset": dataset,
        "selected_by": "val_accuracy; ties: simpler head, then shallower layer (featurecache.selection)",
        "best": rows[0],
        "best_dense": dense[0] if dense else None,
    }
    atomic_write_text(out / "best.json", json.dumps(best, indent=1))
    return best


def format_leaderboard(dataset: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# {dataset}: heads on cached features",
        "",
        "Selected on val (ties: the simpler head, then the shallower layer); test scored once after selection, "
        "with a 95% Wilson interval.",
        "",
        "| rank | base | layer | depth | head | val acc | test acc (95% CI) | bal. acc | macro-F1 | s |",
        "|---:|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['base']} | {r['layer']} | {r['relative_depth']:.2f} | {r['head']} | {r['val_accuracy']:.3f} "
            f"| {r['test_accuracy']:.3f} ({r['test_ci_low']:.3f}–{r['test_ci_high']:.3f}) "
            f"| {r['test_balanced_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"
