"""Use a trained head on new images: rebuild its base and tap, extract, classify."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import store
from featurecache.bases import WEIGHTS_DEFAULT, WEIGHTS_NONE, LoadedBase, load_base
from featurecache.config import Paths, default_paths
from featurecache.data import bad_image_errors, load_image
from featurecache.errors import FeaturecacheError
from featurecache.layers import TapSpec
from featurecache.persist import load_head


def _weights_for(sidecar: dict[str, Any], weights_file: str | os.PathLike | None) -> dict[str, Any]:
    """How to rebuild the exact weights the head's features came from (checked against the sidecar after)."""
    weights_id = sidecar["weights"]
    if match := re.fullmatch(r"random-init\(seed=(\d+)\)", weights_id):
        return {"weights": WEIGHTS_NONE, "seed": int(match.group(1))}
    if weights_id.startswith("file:"):
        if weights_file is None:
            raise FeaturecacheError(
                f"this head's base was loaded from a weights file ({weights_id}); pass the same --weights-file"
            )
        return {"weights_file": weights_file}
    tag, base = sidecar["base_tag"], sidecar["base"]
    return {"weights": tag[len(base) + 1 :] if tag != base else WEIGHTS_DEFAULT}


def _runtime_for(sidecar: dict[str, Any], runtime: str | None) -> tuple[str, str]:
    """The runtime and precision the head's training features were extracted with (``auto``/f32 if unknown)."""
    if runtime is not None:
        return runtime, "f32"
    try:
        meta = store.read_metadata(sidecar["features"]["train"]["file"])
    except (FeaturecacheError, KeyError, OSError):
        return "auto", "f32"  # the cache is gone (a head copied to another machine): the device's default
    return meta.get("runtime", "eager"), meta.get("precision", "f32")


def _home_of(sidecar: dict[str, Any]) -> Paths:
    """The project home of the head's training cache (its exports live beside it), else ``default_paths()``."""
    dataset, tag = sidecar["dataset"], sidecar["base_tag"]
    with contextlib.suppress(KeyError, TypeError, IndexError):
        train_file = Path(sidecar["features"]["train"]["file"]).resolve()
        home = Paths(train_file.parents[4])  # <home>/data/features/<dataset>/<base_tag>/train.h5
        if home.feature_file(dataset, tag, "train") == train_file:
            return home
    return default_paths()


def _extractor(loaded: LoadedBase, sidecar: dict[str, Any], tap: TapSpec, runtime: str | None, first: Any) -> Any:
    """``images -> {tap.key: rows}`` on the runtime the head's features came from, checked on the first batch."""
    from featurecache import runtime as runtimes
    from featurecache.extract import ExtractOptions, _Runner

    name, precision = _runtime_for(sidecar, runtime)
    identity = runtimes.export_identity(base=loaded.spec.name, weights=loaded.weights_id,
                                        input_size=loaded.spec.input_size, taps=[tap])  # fmt: skip
    digest = runtimes.export_digest(identity)
    export_file = _home_of(sidecar).export_file(sidecar["dataset"], sidecar["base_tag"], digest)
    options = ExtractOptions(device="cpu", runtime=name, precision=precision)
    runner = _Runner(loaded, "cpu", options, taps=[tap], export_file=export_file)
    runner.check(first)
    return runner.extractor([tap])


def _alpha_of(sidecar: dict[str, Any]) -> str:
    """The background the head's training images were composited onto, so new images are decoded the same way.

    Recorded in the sidecar; heads whose sidecar predates it read it from the training cache's attrs.
    """
    if sidecar.get("alpha"):
        return sidecar["alpha"]
    train_file = Path(sidecar["features"]["train"]["file"])
    alpha = store.read_metadata(train_file).get("alpha") if train_file.is_file() else None
    if alpha is None:
        raise FeaturecacheError(
            f"cannot tell how the training images of this head were decoded (no 'alpha' in its sidecar or in "
            f"{train_file}): it predates --alpha; re-run `featurecache extract` and `featurecache train-heads "
            f"--overwrite`"
        )
    return alpha


def predict_images(
    head_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    weights_file: str | os.PathLike | None = None,
    batch_size: int = 32,
    runtime: str | None = None,
) -> list[dict[str, Any]]:
    """Classify image files with a saved head; returns ``[{path, label, probability}]`` in input order.

    ``runtime``: ``featurecache.runtime.RUNTIMES``; by default the runtime the head's training cache records.
    """
    import torch

    estimator, sidecar = load_head(head_dir)
    alpha = _alpha_of(sidecar)
    loaded = load_base(sidecar["base"], **_weights_for(sidecar, weights_file))
    if loaded.weights_id != sidecar["weights"]:
        raise FeaturecacheError(
            f"the base rebuilt here has weights {loaded.weights_id}, but the head was trained on features of "
            f"{sidecar['weights']}; use the same weights (or retrain the head)"
        )
    tap = TapSpec.from_attrs(sidecar["tap"])
    transform = loaded.spec.transforms()
    extractor = None
    classes = sidecar["class_names"]
    out = []
    for start in range(0, len(images), batch_size):
        batch_paths = [Path(p) for p in images[start : start + batch_size]]
        tensors = []
        for p in batch_paths:
            try:
                tensors.append(transform(load_image(p, alpha=alpha)))
            except bad_image_errors() as exc:
                raise FeaturecacheError(f"cannot read image {p}: {exc}") from exc
        batch = torch.stack(tensors)
        extractor = extractor or _extractor(loaded, sidecar, tap, runtime, batch)
        rows = extractor(batch)[tap.key]
        # Round-trip through the cache's storage dtype: the head saw exactly such numbers in training.
        rows = rows.astype(sidecar.get("feature_dtype", "float32")).astype(np.float32)
        labels = estimator.predict(rows)
        proba = estimator.predict_proba(rows).max(axis=1) if hasattr(estimator, "predict_proba") else None
        for i, p in enumerate(batch_paths):
            entry = {"path": str(p), "label": classes[int(labels[i])]}
            if proba is not None:
                entry["probability"] = float(proba[i])
            out.append(entry)
    return out
