"""The raw-pixel baseline: logistic regression on downsampled pixels, the floor any pretrained feature must beat.

It reads the same rows as a base's caches (their paths, labels and valid masks), so its per-image predictions pair
with every head of that dataset. Saved like any head (``models/<dataset>/raw-pixels/pixels<S>x<S>/logreg/``), so it
appears in the leaderboard and is reused while the caches' data fingerprints are unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import persist, store
from featurecache.config import Paths
from featurecache.data import Decoding
from featurecache.freshness import pixels_fingerprint
from featurecache.heads import get_head_spec, quiet_solvers
from featurecache.metrics import classification_scores
from featurecache.records import HEAD_KIND, HeadRecord, SidecarVersionError
from featurecache.selection import best_grid_point, sweep_record
from featurecache.weights import PIXELS_TAG

log = logging.getLogger(__name__)

PIXELS_SIDE = 16  # 16 x 16 x RGB = 768 numbers: enough for digits and silhouettes, far below any CNN layer's power


def pixel_layer(side: int = PIXELS_SIDE) -> str:
    return f"pixels{side}x{side}"


def pixel_rows(cache_file: Path, paths: Paths, *, side: int = PIXELS_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: the valid rows of a cache as flattened ``side`` x ``side`` RGB pixels in [0, 1]."""
    from featurecache.data import images_folder, load_image

    meta = store.read_metadata(cache_file)
    labels, rel_paths, valid = store.read_rows(cache_file)
    root = images_folder(meta.get("dataset_root"), meta["dataset"], paths) or Path(meta["dataset_root"])
    rows = []
    for rel in np.asarray(rel_paths, dtype=object)[valid]:
        image = load_image(root / rel, Decoding.recorded(meta)).resize((side, side))
        rows.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(rows), labels[valid]


def pixel_baseline(
    dataset: str, base_tag: str, paths: Paths, *, seed: int = 0, side: int = PIXELS_SIDE
) -> dict[str, Any]:
    """Train (or reuse) the raw-pixel logistic regression on the rows of ``base_tag``'s caches; returns its sidecar."""
    files = {s: paths.feature_file(dataset, base_tag, s) for s in ("train", "val", "test")}
    metas = {s: store.read_metadata(f) for s, f in files.items()}
    layer = pixel_layer(side)
    features = {s: {"file": str(files[s]), "fingerprint": pixels_fingerprint(metas[s], layer)} for s in files}
    out_dir = paths.head_dir(dataset, PIXELS_TAG, layer, "logreg")
    try:
        previous = persist.read_record(out_dir)
    except SidecarVersionError:
        previous = None  # written by another version: retrained over
    if previous is not None and previous.trained_on(features) and previous.seed == seed:
        return previous.to_json()
    t0 = time.perf_counter()
    data = {s: pixel_rows(f, paths, side=side) for s, f in files.items()}
    spec = get_head_spec("logreg")
    grid = [{"C": c} for c in spec.grid["C"]]
    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = data["train"], data["val"], data["test"]
    with quiet_solvers():
        fitted = spec.sweep(X_tr, y_tr, X_val, y_val, grid, seed=seed)
    sweep = sweep_record(fitted, X_val, y_val)
    params, final, val_accuracy, _ = fitted[best_grid_point(sweep)]
    n_classes = len(metas["train"]["class_names"])
    record = HeadRecord(
        kind=HEAD_KIND, dataset=dataset, base=PIXELS_TAG, base_tag=PIXELS_TAG, weights="none",
        feature_dtype="float32", layer=pixel_layer(side),
        tap={"node": "pixels", "pool": "resize", "relative_depth": 0.0, "out_dim": 3 * side * side},
        head="logreg", head_spec="logreg", train_views=0, dense=False, alpha=metas["train"].get("alpha"),
        orientation=Decoding.recorded(metas["train"]).orientation,
        class_names=tuple(metas["train"]["class_names"]), features=features, grid=grid,
        sweep=sweep,
        params=params, refit="train", seed=seed, selection_val_accuracy=val_accuracy,
        val={**classification_scores(y_val, final.predict(X_val), n_classes=n_classes),
             "predictions": final.predict(X_val)},
        test={**classification_scores(y_te, final.predict(X_te), n_classes=n_classes),
              "predictions": final.predict(X_te)},
        n_train=len(y_tr), streamed=False,
        timings={"total_seconds": round(time.perf_counter() - t0, 3)},
    )  # fmt: skip
    record = persist.save_head(out_dir, final, record)
    log.info("%s: raw-pixel baseline test %.3f (val %.3f)", dataset, record.test["accuracy"], val_accuracy)
    return record.to_json()
