"""Split discovery for ImageFolder-style trees, deterministic sample order, and the image dataset.

Layouts accepted:

* ``ROOT/{train,val,test}/<class>/<image>``: used as is (val/test may be missing; see below);
* ``ROOT/<class>/<image>``: no split folders at all.

Missing val/test splits are carved out of train (or out of everything) with a seeded, stratified split that
is written to a JSON record, so the same files land in the same split on every run and machine. The raw
tree is never modified.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import filecmp
import functools
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurecache import store
from featurecache.config import Paths
from featurecache.errors import FeaturecacheError, first_time
from featurecache.fileio import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# K augmented views of the train split, cached once for heads that train "with augmentation" (extract
# --train-views K); it is read only for training, never for selection or scoring.
AUGMENTED_TRAIN = "train-aug"
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
SPLIT_RECORD_VERSION = 1
# What transparent pixels become (RGBA, LA, palette or grey/RGB with a transparent colour): composited onto a
# declared background instead of keeping whatever colour they happen to store (usually black, which turns
# black-on-transparent icons into one all-black image). "mean" is the ImageNet mean colour, which the
# normalization maps to zero input. The choice is part of every cache's fingerprint.
# Default "mean", measured (benchmarks/alpha_icons.py: 5 glyph classes, 60 train icons, efficientnet_lite0): on
# black glyphs "black" collapses all 60 train rows into 1, on white glyphs "white" does; "mean" keeps 60 of 60 for
# black, white and coloured glyphs alike, so it is the one background that never erases a glyph colour.
ALPHA_MODES = ("white", "black", "mean")
DEFAULT_ALPHA = "mean"
ALPHA_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "mean": (124, 116, 104)}
# Whether a photo's EXIF orientation tag is applied: a phone stores a portrait shot as a landscape JPEG plus a
# "rotate 90 degrees" tag, which every viewer applies; ignoring it (torchvision's default_loader, timm) feeds the
# base the photo on its side. "exif" applies it as PIL's ImageOps.exif_transpose does (Hugging Face datasets has
# done so by default since 2024); "ignore" reads the pixels as ImageFolder does: as stored, except TIFFs, which PIL
# turns by their tag as it loads them. Part of every cache's fingerprint.
ORIENTATION_MODES = ("exif", "ignore")
DEFAULT_ORIENTATION = "exif"
# --decode; see featurecache.preprocess.DraftSize (draft) and featurecache.gpu_decode (gpu)
DECODE_MODES = ("full", "draft", "gpu")
DEFAULT_DECODE = "full"  # every image decoded at its size: the base's own preprocessing, bit for bit


@dataclass(frozen=True)
class Decoding:
    """How every stage turns a file into RGB pixels (extract, predict, fine-tuning, the pixel baseline): the
    choices a cache records and a head inherits, so that new images are decoded as the training images were.

    ``alpha``: the background transparent pixels are composited onto (``--alpha``); ``orientation``: whether the
    EXIF orientation tag is applied (``--orientation``); ``decode``: ``"draft"`` decodes large JPEGs at a reduced
    scale where the base's resize allows (``--decode``; what that scale is depends on the base, see
    ``featurecache.preprocess.draft_for``); ``"gpu"`` decodes JPEGs with nvjpeg and resizes every image with torch on
    the device that runs the base (``featurecache.preprocess.device_geometry_for``).
    """

    alpha: str = DEFAULT_ALPHA
    orientation: str = DEFAULT_ORIENTATION
    decode: str = DEFAULT_DECODE

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.orientation not in ORIENTATION_MODES:
            raise FeaturecacheError(
                f"unknown --orientation {self.orientation!r}; choose one of: {', '.join(ORIENTATION_MODES)}"
            )
        if self.decode not in DECODE_MODES:
            raise FeaturecacheError(f"unknown --decode {self.decode!r}; choose one of: {', '.join(DECODE_MODES)}")

    def cache_keys(self) -> dict[str, str]:
        """What a cache's config (its fingerprint) records of ``alpha`` and ``orientation``. Ignoring the EXIF tag
        adds no key, so caches made before ``--orientation`` existed (which ignored it) stay valid under
        ``--orientation ignore``. ``decode`` enters only where the draft applies (``featurecache.extract``)."""
        return {"alpha": self.alpha, **({"orientation": self.orientation} if self.orientation != "ignore" else {})}

    @classmethod
    def recorded(cls, meta: Mapping[str, Any]) -> Decoding:
        """What a cache's metadata or a head's sidecar records; a key it predates takes what was done before the
        option existed: orientation ignored, JPEGs decoded in full. (Caches made before ``--alpha`` flattened
        transparency and have another fingerprint: any extract re-makes them; they are read as the default here,
        and the checks that must tell them apart read the raw ``alpha`` key.)"""
        return cls(
            alpha=meta.get("alpha") or DEFAULT_ALPHA,
            orientation=store.recorded(meta, "orientation"),
            decode=store.recorded(meta, "decode"),
        )


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


# Files a photo folder holds beside its images that are never images: phone sidecars (an iPhone's .AAE edit record,
# the .MOV of a Live Photo), videos, notes and metadata. They take no place in a split: drawn into val or test they
# would shrink it silently (they are skipped at extraction). Any other file is a candidate, whatever its extension,
# and is reported, and listed in the cache, if it cannot be read.
NOT_IMAGES = frozenset((
    ".aae", ".mov", ".mp4", ".m4v", ".avi", ".mkv", ".3gp", ".lrv", ".xmp", ".txt", ".md", ".json", ".csv",
    ".tsv", ".xml", ".yaml", ".yml", ".pdf", ".doc", ".docx", ".zip", ".tar", ".gz", ".db", ".ini", ".log", ".html",
))  # fmt: skip


def files_under(folder: Path) -> list[Path]:
    """Every candidate sample below ``folder``: non-hidden regular files, and symlinks whose target is gone (listed
    as unreadable instead of vanishing from the dataset), except the known non-images (:data:`NOT_IMAGES`)."""
    return [p for p in _visible_files(folder) if not is_not_image(p)]


def is_not_image(path: Path) -> bool:
    """A file that is never an image, by its extension (:data:`NOT_IMAGES`)."""
    return path.suffix.lower() in NOT_IMAGES


def _visible_files(folder: Path) -> list[Path]:
    """Files below ``folder``, none of whose names (folders included: ``.thumbnails/``) starts with a dot. Linked
    folders are followed, as linked class folders and files are, each real folder once (a link back up is no loop)."""
    out, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(top) / name
            if not name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists())):
                out.append(p)
    return sorted(out)


def _scan_classes(folder: Path, root: Path) -> dict[str, list[str]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    out: dict[str, list[str]] = {}
    ignored: list[Path] = []
    for d in classes:
        every = _visible_files(d)
        files = [p.relative_to(root).as_posix() for p in every if not is_not_image(p)]
        ignored += [p for p in every if is_not_image(p)]
        if not files:
            kind = f" ({len(every)} that are not images)" if every else ""
            raise FeaturecacheError(f"class folder {d} has no image files{kind}; add images to it or remove it")
        out[d.name] = files
    if ignored:
        kinds = collections.Counter(p.suffix.lower() for p in ignored)
        log.warning(
            "%s: %d files that are not images take no place in any split (%s; e.g. %s); a split recorded with them "
            "loses them, and its caches are made again once", folder, len(ignored),
            ", ".join(f"{n} {ext}" for ext, n in kinds.most_common()), ignored[0].relative_to(root).as_posix(),
        )  # fmt: skip
    return out


def _folder_note(member: str) -> str:
    """`` (folder <class folder>)`` for an image path under a class folder; empty for the embedded datasets' ids."""
    parent = Path(member).parent
    return "" if str(parent) == "." else f" (folder {parent})"


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
                f"class {label}{_folder_note(members[0])} has {len(members)} image(s); a stratified split "
                f"into train/{'/'.join(fractions)} needs at least {len(fractions) + 1}. Add images or provide "
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
    seed: int | None = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, SplitIndex]:
    """Index every split of a dataset; make and record a stratified split where val/test are missing.

    Args:
        root: the dataset folder.
        record_path: where a split made here is recorded (JSON) and re-read on later runs.
        seed: seed of that split; None: the seed the record was made with (a reader of the caches made from it,
            such as fine-tuning, must not draw a split of its own over it), 0 without a record.
        val_fraction, test_fraction: per-class fractions carved out when the split is missing.
    """
    root = Path(root)
    found, source = _scan_dataset(root)
    class_names = tuple(sorted(source))
    label_of = {c: i for i, c in enumerate(class_names)}

    def entries(classes: dict[str, list[str]]) -> list[tuple[str, int]]:
        return sorted((p, label_of[c]) for c, files in classes.items() for p in files)

    missing = [s for s in ("val", "test") if s not in found]
    if not missing:
        listed = {s: entries(found[s]) for s in SPLITS}
    else:
        pool = entries(source)
        fractions = {"val": val_fraction, "test": test_fraction}
        fractions = {s: f for s, f in fractions.items() if s in missing}
        split_files = _recorded_or_new_split(pool, fractions, seed=seed, record_path=record_path, root=root)
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


def _scan_dataset(root: Path) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[str]]]:
    """``(split folders found -> class -> files, the class -> files that train comes from)``; refuses a folder
    that is missing, has fewer than two classes, or has val/test classes that train lacks."""
    if not root.is_dir():
        raise FeaturecacheError(
            f"dataset folder {root} does not exist; expected ROOT/{{train,val,test}}/<class>/<image> "
            f"(run `make data` for the embedded datasets)"
        )
    split_dirs = _split_folders(root)
    has_split_dirs = "train" in split_dirs
    found = {s: _scan_classes(d, root) for s, d in split_dirs.items()} if has_split_dirs else {}
    source = found.get("train") if has_split_dirs else _scan_classes(root, root)
    if has_split_dirs and not source and any(not is_not_image(p) for p in _visible_files(split_dirs["train"])):
        raise FeaturecacheError(
            f"{split_dirs['train']} holds images, not class folders: a folder named like a split "
            f"({'/'.join(SPLIT_FOLDERS['train'])}) makes {root} read as ROOT/{{train,val,test}}/<class>/<image>; if "
            f"it is a class, rename that class folder"
        )
    if not source:
        raise FeaturecacheError(
            f"no class folders with images in {split_dirs['train'] if has_split_dirs else root}; expected "
            f"ROOT/{{train,val,test}}/<class>/<image> or ROOT/<class>/<image>"
        )
    if len(source) < 2:
        raise FeaturecacheError(
            f"only one class ({next(iter(source))!r}) in {root}; classification needs at least two class folders"
        )
    for split, classes in found.items():
        unknown = sorted(set(classes) - set(source))
        if unknown:
            raise FeaturecacheError(
                f"{split} has classes that train lacks: {', '.join(unknown)}; every class needs training images"
            )
        untested = sorted(set(source) - set(classes))
        if untested and first_time("untested", str(root), split, tuple(untested)):  # read once per base
            log.warning("%s has no image of %s: %s accuracy is never measured on %s; add some to %s", split,
                        ", ".join(untested), "its" if len(untested) == 1 else "their", split,
                        split_dirs[split])  # fmt: skip
    return found, source


# The folder names a split is found under, in any case: Roboflow and many Kaggle sets call val "valid", others
# "validation"; Kaggle sets also come as Training/ and Testing/, or Train/ and Test/.
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of a dataset laid out as ``ROOT/train/...``, by split (names in any case); a split under two
    names is refused and other folders beside them are named in a warning (they are not read). Without a train
    folder there are none: the dataset is ``ROOT/<class>/<image>``."""
    if not root.is_dir():
        return {}
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not any(d.name.lower() in SPLIT_FOLDERS["train"] for d in folders):
        held_out = [d.name for d in folders if d.name.lower() in SPLIT_FOLDERS["val"] + SPLIT_FOLDERS["test"]
                    and any(c.is_dir() and not c.name.startswith(".") for c in d.iterdir())]  # fmt: skip
        if held_out:  # split folders (they hold class folders): read as classes, their images would be a class each
            raise FeaturecacheError(
                f"{root} has {', '.join(f'{n}/' for n in held_out)} but no train/ (or training/) folder; name the "
                f"training images' folder train/, or rename a class folder called {held_out[0]}"
            )
        return {}
    out = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [d for d in folders if d.name.lower() in names]
        if len(present) > 1:
            raise FeaturecacheError(
                f"{root} has both {present[0].name}/ and {present[1].name}/, two {split} splits; keep one of them"
            )
        out.update({split: present[0]} if present else {})
    read = set(out.values())
    others = [d.name for d in folders if d not in read]
    if others:
        log.warning("%s: %s beside the split folders %s not read (a split's folder is named %s)", root,
                    ", ".join(f"{o}/" for o in others), "is" if len(others) == 1 else "are",
                    "; ".join("/".join(n) for n in SPLIT_FOLDERS.values()))  # fmt: skip
    return out


def _recorded_or_new_split(
    pool: list[tuple[str, int]], fractions: dict[str, float], *, seed: int | None, record_path: Path | None, root: Path
) -> dict[str, list[str]]:
    """The recorded split, grown by the files added since (:func:`extend_split`); a new one where there is no
    record or its seed or fractions changed (``seed`` None: the record's own)."""
    record = _read_split_record(record_path) if record_path is not None and record_path.is_file() else None
    folder = str(root.resolve())
    if record is not None:
        _check_same_folder(record, record_path, pool, folder)
    if seed is None:
        seed = int(record["params"]["seed"]) if record is not None else 0
    params = {"seed": seed, "fractions": fractions}
    if record is not None and record["params"] == params:
        split_files, redrawn = extend_split(record["splits"], pool, fractions, seed=seed)
        changed = split_files != record["splits"]
        if changed or record.get("root") != folder:  # grown, or moved here
            _write_split_record(record_path, params, split_files, folder)
        sizes = ", ".join(f"{s} {len(v)}" for s, v in split_files.items())
        if redrawn:
            log.warning("%s lost every file of one split since %s was written: drawn again, so its files may "
                        "change split; the other classes keep theirs (now %s)", ", ".join(redrawn), record_path,
                        sizes)  # fmt: skip
        elif changed:
            log.info("files added or removed since %s was written: every recorded file keeps its split (now %s)",
                     record_path, sizes)  # fmt: skip
        else:
            log.info("using the split recorded in %s (seed %d: %s)", record_path, seed, sizes)
        return split_files
    if record is not None:
        log.warning("split seed or fractions changed since %s was written; making a new split", record_path)
    split_files = stratified_split([p for p, _ in pool], [lbl for _, lbl in pool], fractions=fractions, seed=seed)
    if record_path is not None:
        _write_split_record(record_path, params, split_files, folder)
        log.info("recorded a %s split (seed %d) in %s", "/".join(split_files), seed, record_path)
    return split_files


def images_folder(recorded: str | None, dataset: str, paths: Paths) -> Path | None:
    """Where a dataset's images are now, for the stages that read them again (fine-tuning, the pixel baseline, the
    commands hints suggest): the folder its caches recorded while it is there, else the dataset's folder below this
    home (a home moved with its ``data/raw``), else the folder its split record names; None when none exists."""
    candidates = [Path(recorded)] if recorded else []
    candidates.append(paths.raw / dataset)
    with contextlib.suppress(FeaturecacheError, OSError, KeyError, TypeError):  # no record, or one without a root
        candidates.append(Path(_read_split_record(paths.split_record(dataset))["root"]))
    return next((c for c in candidates if c.is_dir()), None)


def _read_split_record(record_path: Path) -> dict[str, Any]:
    """A split record as written by :func:`_write_split_record`; a file that is not one is refused (drawing a new
    split over it would silently move the user's test set)."""
    try:
        record = json.loads(record_path.read_text())
        splits, fractions = record["splits"], record["params"]["fractions"]
        if not {"train", *fractions} <= set(splits) or not all(
            isinstance(files, list) and all(isinstance(p, str) for p in files) for files in splits.values()
        ):
            raise ValueError("a split is missing or is not a list of paths")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FeaturecacheError(
            f"{record_path} is not a split record ({bad_image_reason(exc)}); restore it, or delete it to draw a new "
            f"seeded split (which moves files between train, val and test)"
        ) from None
    return record


def _check_same_folder(record: dict[str, Any], record_path: Path, pool: list[tuple[str, int]], folder: str) -> None:
    """Refuse a record of another folder (``folder``: this one, resolved) with the same name: growing it would
    throw that folder's split away. Shared file names alone prove nothing (``0.png``, ``IMG_0001.JPG``): the record
    is this folder's when the files both hold are the same bytes (copied), or, where its folder cannot be read (moved,
    or on a drive not mounted now), when the files it sampled hash the same here."""
    recorded_root = record.get("root")  # records written before roots were kept have none
    if recorded_root is None or recorded_root == folder:
        return
    here = {p for p, _ in pool}
    shared = sorted(p for files in record["splits"].values() for p in files if p in here)
    old = Path(recorded_root)
    if shared and (_same_bytes(old, Path(folder), shared) if old.is_dir() else _samples_match(record, Path(folder))):
        return
    why = "whose files differ from these" if shared else "and none of its files is here"
    raise FeaturecacheError(
        f"{record_path} holds the split of another folder, {recorded_root}, {why}; give this folder its own name "
        f"(extract --dataset NAME, compare-layers NAME={folder}), or delete the record if that folder is gone"
    )


def _same_bytes(old: Path, new: Path, shared: Sequence[str], sample: int = 20) -> bool:
    """Whether up to ``sample`` of the files both folders hold, spread over the sorted names, are byte-identical."""
    try:
        return all(filecmp.cmp(old / p, new / p, shallow=False) for p in _spread(shared, sample))
    except OSError:  # a file of the old folder is gone: not a copy of it
        return False


def _spread(names: Sequence[str], n: int) -> Sequence[str]:
    """Up to ``n`` of ``names``, evenly spaced: the files that stand for a folder when telling it from another."""
    return names[:: max(1, len(names) // n)][:n]


def _samples_match(record: dict[str, Any], folder: Path) -> bool:
    """Whether some files the record sampled are here and all of those hold the bytes they held (records from
    before samples were kept: True, the shared names are all there is to go on)."""
    samples = record.get("samples")
    if samples is None:
        return True
    present = {rel: digest for rel, digest in samples.items() if (folder / rel).is_file()}
    return bool(present) and all(_digest(folder / rel, "content") == digest for rel, digest in present.items())


def _write_split_record(
    record_path: Path, params: dict[str, Any], split_files: dict[str, list[str]], folder: str, sample: int = 20
) -> None:
    """The split, the folder it belongs to, and the content digests of up to ``sample`` of its files, spread over
    the sorted names: what tells this folder, moved, from another of the same name (:func:`_check_same_folder`)."""
    every = sorted(p for files in split_files.values() for p in files)
    samples = {
        rel: _digest(Path(folder) / rel, "content") for rel in _spread(every, sample) if (Path(folder) / rel).is_file()
    }
    record = {"version": SPLIT_RECORD_VERSION, "root": folder, "params": params, "splits": split_files,
              "samples": samples}  # fmt: skip
    atomic_write_text(record_path, json.dumps(record, indent=1))


def extend_split(
    recorded: dict[str, list[str]], pool: list[tuple[str, int]], fractions: dict[str, float], *, seed: int
) -> tuple[dict[str, list[str]], list[str]]:
    """``recorded`` (split -> files) for the files of ``pool`` (``(path, label)``) now, and the class folders
    drawn again. Files that are gone leave their split, every other recorded file stays in its split, and each
    class's new files top val/test up to the sizes :func:`stratified_split` gives the class's count now, the
    rest going to train. A class left without a file in some split is drawn again on its own.

    So adding photos to a folder moves none of those already there, and the caches of the splits that gained
    nothing stay valid.
    """
    import numpy as np

    label_of = dict(pool)
    kept = {name: [p for p in files if p in label_of] for name, files in recorded.items()}
    placed = {p for files in kept.values() for p in files}
    added: dict[int, list[str]] = {}
    for path, label in sorted(pool):
        if path not in placed:
            added.setdefault(label, []).append(path)
    class_size = collections.Counter(label_of.values())
    rng = np.random.default_rng(seed)
    parts = {name: list(files) for name, files in kept.items()}
    held = {name: collections.Counter(label_of[p] for p in files) for name, files in kept.items()}  # class counts
    for label in sorted(added):
        members = [added[label][i] for i in rng.permutation(len(added[label]))]
        for name, frac in fractions.items():
            take = max(0, max(1, int(round(frac * class_size[label]))) - held[name][label])
            parts[name].extend(members[:take])
            members = members[take:]
        parts["train"].extend(members)
    present = [{label_of[p] for p in files} for files in parts.values()]
    broken = {label for label in class_size if any(label not in labels for labels in present)}
    redrawn = [p for p in label_of if label_of[p] in broken]
    if redrawn:
        parts = {name: [p for p in files if label_of[p] not in broken] for name, files in parts.items()}
        again = stratified_split(redrawn, [label_of[p] for p in redrawn], fractions=fractions, seed=seed)
        for name, files in again.items():
            parts[name].extend(files)
    folders = sorted({str(Path(p).parent) for p in redrawn})
    return {name: sorted(files) for name, files in parts.items()}, folders


def fingerprint_files(index: SplitIndex, *, mode: str = "content", workers: int = 8) -> str:
    """A digest of the split's file list, labels and file contents (``content``) or sizes+mtimes (``stat``).

    Any added, removed, relabelled or rewritten file changes it, which is what makes a cache stale.
    """
    if mode not in ("content", "stat"):
        raise FeaturecacheError(f"unknown fingerprint mode {mode!r}; choose content or stat")
    digests = file_digests(index, mode=mode, workers=workers)
    h = hashlib.sha256()
    h.update(json.dumps(list(index.class_names)).encode())
    for rel, label, d in zip(index.paths, index.labels, digests, strict=True):
        # A name that is not valid UTF-8 reaches Python as lone surrogates; hash the bytes it has on disk.
        h.update(f"{rel}\0{label}\0{d}\n".encode("utf-8", "surrogateescape"))
    return f"{mode}:{h.hexdigest()[:32]}"


def file_digests(index: SplitIndex, *, mode: str = "content", workers: int = 8) -> list[str]:
    """Each file's digest, in index order: its content's (``content``) or its size and mtime (``stat``). Inside
    :func:`remembered_digests`, a file's content is hashed once however many readers ask."""
    memo = _MEMO.get() if mode == "content" else None

    def digest_one(rel: str) -> str:
        path = index.root / rel
        if memo is not None and str(path) in memo:
            return memo[str(path)]
        digest = _digest(path, mode)
        if memo is not None:
            memo[str(path)] = digest
        return digest

    # Threads for slow (network) disks, each over a run of files: a future per file cost more than hashing it when
    # other threads held the GIL (0.26 s for 640 small JPEGs inside an extraction, 0.06 s alone).
    paths = list(index.paths)
    step = max(1, -(-len(paths) // (4 * workers)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = pool.map(
            lambda run: [digest_one(rel) for rel in run], [paths[i : i + step] for i in range(0, len(paths), step)]
        )
        return [digest for run in runs for digest in run]


def _digest(path: Path, mode: str) -> str:
    if path.is_symlink() and not path.exists():
        return f"dangling-link:{os.readlink(path)}"
    if mode == "stat":
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_MEMO: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("featurecache_digests", default=None)
_EMPTY = hashlib.blake2b(b"", digest_size=16).hexdigest()


@contextlib.contextmanager
def remembered_digests() -> Iterator[None]:
    """Within the block (one ``extract`` call), each file's content is hashed once: for its split's fingerprint and
    for :func:`copies_across_splits`. Not longer: a file edited between two calls must be hashed again."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def copies_across_splits(indexes: Mapping[str, SplitIndex]) -> dict[str, list[tuple[str, str]]]:
    """Per val/test split, its files byte-identical to a train file, as ``(file, its train twin)``: a head has seen
    them, so the split's accuracy overstates what it does on new images. Empty and dangling files are left out
    (they are unreadable, not leaked)."""
    train = indexes.get("train")
    if train is None:
        return {}
    twin: dict[str, str] = {}
    for rel, digest in zip(train.paths, file_digests(train), strict=True):
        twin.setdefault(digest, rel)
    out = {}
    for split in ("val", "test"):
        index = indexes.get(split)
        if index is None:
            continue
        pairs = [(rel, twin[d]) for rel, d in zip(index.paths, file_digests(index), strict=True)
                 if d in twin and d != _EMPTY and not d.startswith("dangling-link:")]  # fmt: skip
        if pairs:
            out[split] = pairs
    return out


def check_alpha(alpha: str) -> None:
    if alpha not in ALPHA_MODES:
        raise FeaturecacheError(f"unknown --alpha {alpha!r}; choose one of: {', '.join(ALPHA_MODES)}")


DraftFor = Callable[[tuple[int, int]], tuple[int, int]]  # (width, height) -> the smallest size to decode at


def load_image(path: str | os.PathLike, decoding: Decoding = Decoding(), *, draft: DraftFor | None = None) -> Any:
    """Decode an image to RGB the way every stage does (extract, predict, fine-tune), as ``decoding`` says.

    Like torchvision's ``default_loader`` (PIL, ``convert("RGB")``), except that transparent pixels are
    composited onto the ``decoding.alpha`` background rather than taking the colour they store, and that a photo
    is turned upright by its EXIF orientation tag (``decoding.orientation``). Raises the PIL errors of
    :func:`bad_image_errors` for unreadable files.

    ``draft`` (``--decode draft``; ``decoding.decode`` is what chose it, through the base's preprocessing:
    ``featurecache.preprocess.draft_for``): ``(width, height) -> the smallest size the preprocessing needs`` of the
    upright image; a JPEG is then decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling where that stays at
    least as large (PIL's ``draft``), which changes the pixels slightly (see
    ``featurecache.preprocess.Preprocessing.draft_size``).
    """
    from PIL import Image

    _quiet_pil_bomb_warning()
    with open(path, "rb") as f:
        image = _open(f, path)
        _refuse_thin(image.size)
        if draft is not None:
            _draft(image, draft, decoding)
        _say_if_huge(image.size, path)  # the size it decodes at (a draft is smaller)
        try:
            image.load()
        except RuntimeError as exc:  # a plugin's decoder refusing the payload (libheif without its codec)
            raise OSError(f"cannot decode {path}: {exc}") from exc
        # Asked after loading: PIL turns a TIFF by its tag as it loads it (and drops the tag), whatever is asked.
        turn = _upright_turn(image) if decoding.orientation == "exif" else None
        if image.mode.startswith("I") or image.mode == "F":
            rgb = _high_bit_depth_to_8(image).convert("RGB")
        elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUNDS[decoding.alpha] + (255,))
            rgb = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    return rgb if turn is None else rgb.transpose(turn)


def _open(f: Any, path: str | os.PathLike) -> Any:
    """PIL's ``Image.open``, and HEIC/HEIF photos (an iPhone's default format) through pillow-heif when it is
    installed: its opener is registered on the first such file, so folders without one never import it. Without it,
    the error names the install command (the file is then skipped, and listed, like any unreadable one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(f)
    except UnidentifiedImageError:
        f.seek(0)
        if f.read(12)[4:12] not in _HEIF_BRANDS:
            raise
        if not heif_readable():
            raise UnidentifiedImageError(f"{path} is a HEIC/HEIF photo, {HEIF_MISSING}") from None
        f.seek(0)
        return Image.open(f)


# The reason a HEIC photo is skipped without pillow-heif (a cache's skipped list keeps it: see heif_readable).
HEIF_MISSING = "which PIL reads only with pillow-heif: pip install 'featurecache[heic]'"
# The major brands of HEIF still images (ISO/IEC 23008-12): the "ftyp" box that opens the file names one.
_HEIF_BRANDS = {b"ftyp" + brand for brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")}


@functools.cache
def heif_readable() -> bool:
    """Register pillow-heif's opener with PIL (once per process); False when it is not installed. libheif applies
    the container's rotation itself (HEIF requires it) and pillow-heif then reports EXIF orientation 1, so a HEIC
    photo comes out upright under either ``--orientation``."""
    try:
        import pillow_heif
        from PIL import Image
    except ImportError:
        return False
    Image.init()  # PIL's own plugins first: an AVIF that Pillow reads stays Pillow's, not libheif's (no AV1 here)
    pillow_heif.register_heif_opener()
    return True


def draft_would_shrink(path: str | os.PathLike, draft: DraftFor, decoding: Decoding = Decoding()) -> bool:
    """Whether ``--decode draft`` would decode this file at a reduced scale, asked of PIL's ``draft`` itself as
    :func:`load_image` asks it (it only configures the decoder: nothing past the header is read). An unreadable
    file says no."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return _draft(image, draft, decoding)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _draft(image: Any, draft: DraftFor, decoding: Decoding) -> bool:
    """Configure a JPEG's decoder to the smallest DCT scale that keeps what ``draft`` asks of the upright image
    (PIL's ``draft``: nothing is decoded yet); True when that scale is reduced. Not a JPEG: nothing changes."""
    if not _is_jpeg(image):
        return False
    stored = image.size
    turn = _upright_turn(image) if decoding.orientation == "exif" else None
    if _swaps_sides(turn):  # draft speaks of the upright image: its width is the stored height
        width, height = draft(stored[::-1])
        request = height, width
    else:
        request = draft(stored)
    image.draft(None, request)  # None: keep the colour mode; only the scale changes
    return image.size != stored


# EXIF orientation tag (0x0112) -> the PIL transpose that makes the image upright, as ImageOps.exif_transpose.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


def _upright_turn(image: Any) -> Any:
    """The ``Image.Transpose`` that turns ``image`` upright by its EXIF orientation tag; None when it has none, or
    an EXIF block PIL cannot parse: such a file is decoded as stored, as it was before ``--orientation``, rather
    than refused (a mangled camera tag is common and says nothing about the pixels)."""
    from PIL import Image

    try:
        orientation = image.getexif().get(_ORIENTATION_TAG)
        name = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    except Exception:  # noqa: BLE001 - PIL's EXIF parser raises many types on corrupt blocks; the pixels are fine
        return None
    return getattr(Image.Transpose, name) if name else None


def _swaps_sides(turn: Any) -> bool:
    """Whether the turn is by 90 degrees (width and height trade places)."""
    from PIL import Image

    return turn in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                    Image.Transpose.ROTATE_90)  # fmt: skip


def _is_jpeg(image: Any) -> bool:
    """A JPEG, including phone photos PIL opens as MPO (a JPEG with embedded images: Ultra HDR gain maps, depth)."""
    from PIL import JpegImagePlugin

    return isinstance(image, JpegImagePlugin.JpegImageFile)


# Wider than this many times its height (or the reverse), an image is refused: a base's resize brings the short side
# to ~256 pixels, so a 12000x1 strip (a file of 100 bytes) became a 786-megapixel image and GBs of memory.
MAX_ASPECT_RATIO = 1000


def _quiet_pil_bomb_warning() -> None:
    """PIL's warning between its two bomb limits names neither the file nor what it costs: :func:`_say_if_huge`
    says both instead. A process-wide filter, added where it is missing (``catch_warnings`` around each decode is
    not thread-safe, and decode threads share the process; a test harness may reset the filters between calls)."""
    from PIL import Image

    bomb = Image.DecompressionBombWarning
    first = next((action for action, _, category, *_ in warnings.filters if issubclass(bomb, category)), None)
    if first != "ignore":  # the first filter that applies decides
        warnings.filterwarnings("ignore", category=bomb)


def _say_if_huge(size: tuple[int, int], path: str | os.PathLike) -> None:
    from PIL import Image

    pixels = size[0] * size[1]
    # Under twice the limit PIL decodes it (over, it refuses: a skipped file); augmented views decode a file K times.
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS and first_time("huge", str(path)):
        log.warning("%s is %dx%d pixels (%.0f megapixels): decoding it takes ~%.1f GB of memory, for a base that "
                    "sees ~224 pixels", path, size[0], size[1], pixels / 1e6, 3 * pixels / 1e9)  # fmt: skip


def _refuse_thin(size: tuple[int, int]) -> None:
    long, short = max(size), max(1, min(size))
    if long / short > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{size[0]}x{size[1]} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1: resizing its short side to 256 "
            f"would make a {256 * 256 * long / short / 1e6:.0f}-megapixel image; crop it into tiles"
        )


def _high_bit_depth_to_8(image: Any) -> Any:
    """A 16-bit, 32-bit integer or floating-point grey image scaled to 8 bits.

    PIL's ``convert`` clips such values at 255 (a typical 16-bit scan turns almost all white) and truncates floats
    (an image in 0..1 turns black). Integers in 0..65535 are scaled by 1/257 unless they already fit 8 bits; floats
    in 0..1 by 255, floats in 0..255 kept. Any other range (negative values, a float beyond 255, NaN) has no one
    reading, so the file is refused (ValueError: skipped and listed with the reason) rather than guessed at.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    floating = image.mode == "F"
    if not (np.isfinite(values).all() and low >= 0 and high <= (255 if floating else 65535)):
        raise ValueError(
            f"a {'floating-point' if floating else '32-bit integer'} image with values {low:g}..{high:g}, a range "
            f"with no one 8-bit reading; save it as 8- or 16-bit (or as floats in 0..1)"
        )
    if floating and high <= 1:
        values = values * 255
    elif not floating and (image.mode.startswith("I;16") or high > 255):
        values = values / 257
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


# Errors PIL raises for unreadable images: zero-byte, truncated, not an image, decompression bombs.
def bad_image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def bad_image_reason(exc: BaseException) -> str:
    """Why a file could not be read, on one line (some decoders end their messages with a newline), with the file
    named as a name: PIL names it by the repr of its file object (``<_io.BufferedReader name='a.txt'>``)."""
    text = _FILE_OBJECT.sub(r"\1", f"{type(exc).__name__}: {exc}")
    return " ".join(text.split())


_FILE_OBJECT = re.compile(r"<_io\.\w+ name=('[^']*'|\"[^\"]*\")>")


class ImageFiles:
    """A map-style dataset of ``(image_tensor, row_index, error)``; unreadable files give ``error != ""``.

    Decoding is :func:`load_image` as ``decoding`` says (PIL, converted to RGB like every torchvision dataset),
    so grey or palette images become 3-channel inputs; resizing is the base's own transforms. ``encoded``
    (``--decode gpu``: the base's :class:`featurecache.preprocess.DeviceGeometry`): items are :class:`Encoded` (None
    where unreadable), see :func:`read_encoded`, and ``transform`` is not used.
    """

    def __init__(
        self, index: SplitIndex, transform: Any, *, input_size: int, rows: Sequence[int],
        decoding: Decoding = Decoding(), draft: DraftFor | None = None, encoded: Callable | None = None,
    ) -> None:  # fmt: skip
        self.index = index
        self.encoded = encoded
        self.transform = transform
        self.input_size = input_size
        self.rows = list(rows)
        self.decoding = decoding
        self.draft = draft  # see load_image
        self._bad = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, int, str]:
        import torch

        if self._bad is None:
            self._bad = bad_image_errors()
        row = self.rows[i]
        if self.encoded is not None:
            return self._encoded(row)
        try:
            image = load_image(self.index.root / self.index.paths[row], self.decoding, draft=self.draft)
        except self._bad as exc:
            # A transform may say what stands in for an unreadable image (featurecache.preprocess: uint8 zeros).
            blank = getattr(self.transform, "blank", None)
            zeros = blank(self.input_size) if blank else torch.zeros(3, self.input_size, self.input_size)
            return zeros, row, bad_image_reason(exc)
        # A per-row transform (cached augmented views) seeds its randomness from the row, not from the loader.
        if getattr(self.transform, "per_row", False):
            return self.transform(image, row), row, ""
        return self.transform(image), row, ""

    def _encoded(self, row: int) -> tuple[Any, int, str]:
        try:
            return read_encoded(self.index.root / self.index.paths[row], self.decoding, self.encoded), row, ""
        except self._bad as exc:
            return None, row, bad_image_reason(exc)


NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg decodes to RGB as PIL does; CMYK goes through PIL


@dataclass(frozen=True)
class Encoded:
    """One image as a decode worker hands it over under ``--decode gpu`` (``featurecache.gpu_decode``): a JPEG's
    bytes and the turn that makes it upright, or (any other file) its pixels decoded by PIL, upright and resized.

    Plain bytes and numpy, not tensors: a DataLoader worker shares each tensor it sends through a file descriptor of
    its own, and a batch of separate images (8 workers x 4 batches ahead x 256 images) would pass the usual limit of
    1024 open files; pickled, they travel through the worker's pipe.
    """

    jpeg: bytes | None = None  # the file's bytes
    turn: Any = None  # PIL Image.Transpose from the EXIF orientation tag, applied after decoding; None: as stored
    pixels: Any = None  # (3, h, w) uint8 numpy array, already at the geometry's output size


def read_encoded(path: str | os.PathLike, decoding: Decoding, geometry: Callable) -> Encoded:
    """What a decode worker does under ``--decode gpu``: read the header and keep an RGB or grey JPEG's bytes;
    decode anything else as every stage does (:func:`load_image`) and resize it here with ``geometry`` (the base's
    ``featurecache.preprocess.DeviceGeometry``, the same arithmetic as on the device), so no full-size pixels wait in
    the loader. Raises :func:`bad_image_errors` for unreadable files; a JPEG whose payload is broken is found when
    it is decoded (``featurecache.gpu_decode.decode_batch``)."""
    from featurecache.preprocess import uint8_chw

    with open(path, "rb") as f:
        image = _open(f, path)  # the header only; PIL refuses decompression bombs here
        # An Adobe "transform 0" JPEG stores RGB, not YCbCr: PIL honours the marker; nvjpeg is not known to.
        if _is_jpeg(image) and image.mode in NVJPEG_MODES and image.info.get("adobe_transform") != 0:
            turn = _upright_turn(image) if decoding.orientation == "exif" else None
            f.seek(0)
            return Encoded(jpeg=f.read(), turn=turn)
    return Encoded(pixels=geometry(uint8_chw(load_image(path, decoding))).numpy())
