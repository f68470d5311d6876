"""Embedded datasets that need nothing beyond pip: prepared into ``data/raw/<name>`` in ImageFolder layout.

Each preparer writes ``{train,val,test}/<class>/<image>.png`` with a fixed, seeded, stratified split (the
file lists are recorded in ``splits.json``) and a ``LICENSE.txt`` saying where the data came from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurecache.data import stratified_split
from featurecache.errors import FeaturecacheError

log = logging.getLogger(__name__)

SPLIT_SEED = 0
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    summary: str
    license: str
    source: str
    load: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]  # images (N,H,W) uint8, labels, class names


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        raise FeaturecacheError(f"unknown dataset {name!r}; embedded datasets: {', '.join(list_datasets())}")
    return _DATASETS[name]


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 images with values 0..16; scale to the full 8-bit range so PNG viewers show them as they are.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(int), [str(c) for c in bunch.target_names]


register_dataset(
    DatasetSpec(
        name="digits",
        summary="1,797 handwritten digits, 8x8 grey, 10 classes (bundled with scikit-learn; far from ImageNet)",
        license="BSD-3-Clause (scikit-learn); the UCI Optical Recognition of Handwritten Digits data is CC BY 4.0",
        source="sklearn.datasets.load_digits (ships inside the scikit-learn wheel, no download)",
        load=_load_digits,
    )
)


def prepare_dataset(name: str, raw_dir: Path, *, overwrite: bool = False) -> Path:
    """Write dataset ``name`` into ``raw_dir/name`` (atomically: a complete folder or none)."""
    from PIL import Image

    spec = get_dataset_spec(name)
    dest = raw_dir / name
    if dest.is_dir() and not overwrite:
        log.info("%s already prepared at %s", name, dest)
        return dest
    images, labels, class_names = spec.load()
    ids = [f"{i:06d}" for i in range(len(images))]
    parts = stratified_split(ids, labels.tolist(), fractions=SPLIT_FRACTIONS, seed=SPLIT_SEED)
    tmp = raw_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        record: dict[str, list[str]] = {}
        for split, members in parts.items():
            record[split] = []
            for sid in members:
                i = int(sid)
                rel = f"{split}/{class_names[labels[i]]}/{sid}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(tmp / rel)
                record[split].append(rel)
        (tmp / "splits.json").write_text(
            json.dumps({"seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS, "splits": record}, indent=1)
        )
        (tmp / "LICENSE.txt").write_text(f"{spec.summary}\nLicense: {spec.license}\nSource: {spec.source}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s: %s", name, ", ".join(f"{s} {len(v)}" for s, v in parts.items()))
    return dest
