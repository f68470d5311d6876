"""Split discovery for ImageFolder-style trees, deterministic sample order, and the image dataset.

Layouts accepted:

* ``ROOT/{train,val,test}/<class>/<image>``: used as is (val/test may be missing; see below);
* ``ROOT/<class>/<image>``: no split folders at all.

Missing val/test splits are carved out of train (or out of everything) with a seeded, stratified split that
is written to a JSON record, so the same files land in the same split on every run and machine. The raw
tree is never modified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# K augmented views of the train split, cached once for heads that train "with augmentation" (extract
# --train-views K); it is read only for training, never for selection or scoring.
AUGMENTED_TRAIN = "train-aug"
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
SPLIT_RECORD_VERSION = 1


@dataclass(frozen=True)
class SplitIndex:
    """The samples of one split, in the order their feature rows are written."""

    split: str
    root: Path  # dataset root; paths are relative to it (posix)
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def augmented_views(train: SplitIndex, views: int) -> SplitIndex:
    """The index of ``views`` augmented copies of the train split, view-major: row ``v * N + i`` is view ``v`` of
    train row ``i``, so the cache's rows map back to train rows without a lookup table."""
    return SplitIndex(
        split=AUGMENTED_TRAIN,
        root=train.root,
        paths=train.paths * views,
        labels=train.labels * views,
        class_names=train.class_names,
    )


def _list_files(folder: Path) -> list[Path]:
    # Every non-hidden regular file is a sample candidate: a non-image file is reported as skipped
    # (and listed in the cache) rather than silently ignored by an extension filter.
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-1:]))


def _scan_classes(folder: Path, root: Path) -> dict[str, list[str]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    out: dict[str, list[str]] = {}
    for d in classes:
        files = [p.relative_to(root).as_posix() for p in _list_files(d)]
        if not files:
            raise FeaturecacheError(f"class folder {d} has no files; add images to it or remove it")
        out[d.name] = files
    return out


def stratified_split(
    items: Sequence[str],
    labels: Sequence[int],
    *,
    fractions: dict[str, float],
    seed: int,
) -> dict[str, list[str]]:
    """Split ``items`` into named parts with per-class proportions; the remainder goes to ``train``.

    Deterministic for a given seed and item set (items are sorted first, so discovery order does not matter).
    """
    import numpy as np

    order = np.argsort(np.asarray(items, dtype=object), kind="stable")
    items = [items[i] for i in order]
    labels = [labels[i] for i in order]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], **{name: [] for name in fractions}}
    by_class: dict[int, list[str]] = {}
    for item, label in zip(items, labels, strict=True):
        by_class.setdefault(label, []).append(item)
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < len(fractions) + 1:
            raise FeaturecacheError(
                f"class {label} has {len(members)} image(s); a stratified split into "
                f"train/{'/'.join(fractions)} needs at least {len(fractions) + 1}. Add images or provide "
                f"explicit train/val/test folders."
            )
        perm = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, frac in fractions.items():
            take = max(1, int(round(frac * len(members))))
            parts[name].extend(perm[start : start + take])
            start += take
        parts["train"].extend(perm[start:])
    return {name: sorted(v) for name, v in parts.items()}


def discover_splits(
    root: str | os.PathLike,
    *,
    record_path: Path | None = None,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, SplitIndex]:
    """Index every split of a dataset; make and record a stratified split where val/test are missing.

    Args:
        root: the dataset folder.
        record_path: where a split made here is recorded (JSON) and re-read on later runs.
        seed: seed of that split.
        val_fraction, test_fraction: per-class fractions carved out when the split is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FeaturecacheError(
            f"dataset folder {root} does not exist; expected ROOT/{{train,val,test}}/<class>/<image> "
            f"(run `make data` for the embedded datasets)"
        )
    has_split_dirs = (root / "train").is_dir()
    found = {s: _scan_classes(root / s, root) for s in SPLITS if (root / s).is_dir()} if has_split_dirs else {}
    source = found.get("train") if has_split_dirs else _scan_classes(root, root)
    if not source:
        raise FeaturecacheError(
            f"no class folders with images in {root / 'train' if has_split_dirs else root}; expected "
            f"ROOT/{{train,val,test}}/<class>/<image> or ROOT/<class>/<image>"
        )
    class_names = tuple(sorted(source))
    if len(class_names) < 2:
        raise FeaturecacheError(
            f"only one class ({class_names[0]!r}) in {root}; classification needs at least two class folders"
        )
    label_of = {c: i for i, c in enumerate(class_names)}
    for split, classes in found.items():
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise FeaturecacheError(
                f"{split} has classes that train lacks: {', '.join(unknown)}; every class needs training images"
            )

    def entries(classes: dict[str, list[str]]) -> list[tuple[str, int]]:
        return sorted((p, label_of[c]) for c, files in classes.items() for p in files)

    missing = [s for s in ("val", "test") if s not in found]
    if not missing:
        listed = {s: entries(found[s]) for s in SPLITS}
    else:
        pool = entries(source)
        fractions = {"val": val_fraction, "test": test_fraction}
        fractions = {s: f for s, f in fractions.items() if s in missing}
        split_files = _recorded_or_new_split(pool, fractions, seed=seed, record_path=record_path)
        label_by_path = dict(pool)
        listed = {s: [(p, label_by_path[p]) for p in split_files[s]] for s in split_files}
        for s in found:
            if s != "train":
                listed[s] = entries(found[s])
    out = {}
    for split in SPLITS:
        rows = listed.get(split, [])
        if not rows:
            raise FeaturecacheError(f"split {split!r} of {root} has no images")
        out[split] = SplitIndex(
            split=split,
            root=root,
            paths=tuple(p for p, _ in rows),
            labels=tuple(lbl for _, lbl in rows),
            class_names=class_names,
        )
    return out


def _recorded_or_new_split(
    pool: list[tuple[str, int]], fractions: dict[str, float], *, seed: int, record_path: Path | None
) -> dict[str, list[str]]:
    items = [p for p, _ in pool]
    params = {"seed": seed, "fractions": fractions}
    if record_path is not None and record_path.is_file():
        record = json.loads(record_path.read_text())
        recorded = sorted(p for s in record["splits"].values() for p in s)
        if recorded == sorted(items) and record.get("params") == params:
            return record["splits"]
        log.warning("files or split parameters changed since %s was written; making a new split", record_path)
    split_files = stratified_split(items, [lbl for _, lbl in pool], fractions=fractions, seed=seed)
    if record_path is not None:
        record = {"version": SPLIT_RECORD_VERSION, "params": params, "splits": split_files}
        atomic_write_text(record_path, json.dumps(record, indent=1))
        log.info("recorded a %s split (seed %d) in %s", "/".join(split_files), seed, record_path)
    return split_files


def fingerprint_files(index: SplitIndex, *, mode: str = "content", workers: int = 8) -> str:
    """A digest of the split's file list, labels and file contents (``content``) or sizes+mtimes (``stat``).

    Any added, removed, relabelled or rewritten file changes it, which is what makes a cache stale.
    """

    def digest_one(rel: str) -> str:
        path = index.root / rel
        if mode == "stat":
            st = path.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if mode not in ("content", "stat"):
        raise FeaturecacheError(f"unknown fingerprint mode {mode!r}; choose content or stat")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(digest_one, index.paths))
    h = hashlib.sha256()
    h.update(json.dumps(list(index.class_names)).encode())
    for rel, label, d in zip(index.paths, index.labels, digests, strict=True):
        h.update(f"{rel}\0{label}\0{d}\n".encode())
    return f"{mode}:{h.hexdigest()[:32]}"


def decode_rgb(path: str | os.PathLike, *, alpha: str = "white") -> Any:
    """An image file as a PIL RGB image, transparent pixels composited onto a ``white`` or ``black`` background."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if alpha == "black" else (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


# Errors PIL raises for unreadable images: zero-byte, truncated, not an image, decompression bombs.
def _bad_image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFiles:
    """A map-style dataset of ``(image_tensor, row_index, error)``; unreadable files give ``error != ""``.

    Decoding is torchvision's ``default_loader`` (PIL, converted to RGB like every torchvision dataset), so
    grey or palette images become 3-channel inputs; resizing is the base's own transforms.
    """

    def __init__(self, index: SplitIndex, transform: Any, *, input_size: int, rows: Sequence[int]) -> None:
        self.index = index
        self.transform = transform
        self.input_size = input_size
        self.rows = list(rows)
        self._bad = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, int, str]:
        import torch
        from torchvision.datasets.folder import default_loader

        if self._bad is None:
            self._bad = _bad_image_errors()
        row = self.rows[i]
        try:
            image = default_loader(str(self.index.root / self.index.paths[row]))
        except self._bad as exc:
            return torch.zeros(3, self.input_size, self.input_size), row, f"{type(exc).__name__}: {exc}"
        # A per-row transform (cached augmented views) seeds its randomness from the row, not from the loader.
        if getattr(self.transform, "per_row", False):
            return self.transform(image, row), row, ""
        return self.transform(image), row, ""
