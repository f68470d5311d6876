"""Stage 1: run a frozen base once over every split and stream the chosen taps into the HDF5 store."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import decoders, fileio, gpu_decode, store
from featurecache import runtime as runtimes
from featurecache.augment import AUGMENTATIONS, SeededPerRow, train_transform
from featurecache.bases import RANDOM_INIT_PREFIX, WEIGHTS_DEFAULT, WEIGHTS_NONE, LoadedBase, get_base_spec, load_base
from featurecache.config import Paths, check_path_name, default_paths
from featurecache.data import (
    AUGMENTED_TRAIN,
    DEFAULT_ALPHA,
    DEFAULT_DECODE,
    DEFAULT_ORIENTATION,
    HEIF_MISSING,
    SPLITS,
    Decoding,
    ImageFiles,
    SplitIndex,
    augmented_views,
    copies_across_splits,
    discover_splits,
    draft_would_shrink,
    fingerprint_files,
    heif_readable,
    remembered_digests,
)
from featurecache.devices import resolve_device
from featurecache.distributed import World
from featurecache.errors import FeaturecacheError, check_seed, check_workers, first_time
from featurecache.layers import TapSpec, TracedBase, build_extractor, parse_taps, trace_base
from featurecache.preprocess import (
    DEVICE_DECODE_RULE,
    DRAFT_RULE,
    DeviceGeometry,
    DraftSize,
    Preprocessing,
    device_geometry_for,
    draft_for,
)
from featurecache.progress import progress_bar
from featurecache.records import library_versions

log = logging.getLogger(__name__)

RAW_MAPS_WARN_BYTES = 1 << 30
# Warn when this share of a split's rows repeat another row's features exactly: the sign of a dataset that its
# decoding collapsed (transparent icons on the wrong background) or of many duplicated files.
IDENTICAL_ROWS_WARN_FRACTION = 0.05
ON_BAD_IMAGE = ("skip", "fail")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DECODE_HELP = (
    "full: every image decoded at its size (the base's own preprocessing, bit for bit). draft: JPEGs larger than "
    "twice what the resize keeps are decoded at 1/2-1/8 scale by libjpeg (a 12 MP photo ~9x faster; pixels differ "
    "by ~0.5-0.6 of 255; recorded in the cache, so a full-decode cache is not reused). gpu (CUDA only): JPEGs "
    "decoded by nvjpeg in batches and every image resized on the GPU by torch, for a GPU that the CPU's decoding "
    "cannot keep busy (resized pixels within 1-2 of 255 of PIL's on the CPU, nvjpeg unmeasured; recorded in the "
    "cache)"
)
ORIENTATION_HELP = (
    "exif (default): photos are turned upright by their EXIF orientation tag, as every viewer shows them (phones "
    "store portrait shots sideways with that tag). ignore: as torchvision's ImageFolder reads them (pixels as "
    "stored, except TIFFs, which PIL turns itself). Recorded in the cache"
)


@dataclass(frozen=True)
class ExtractOptions:
    """How to run the base; everything that changes the stored numbers is part of the cache fingerprint."""

    batch_size: int | None = None  # None: default_batch_size(device)
    workers: int | None = None  # decode processes; None: decode threads on the CPU, worker processes on CUDA
    device: str = "auto"
    dtype: str = "auto"  # storage dtype; auto: float16, float32 for random-init weights (see store.storage_dtype)
    amp: str = "auto"  # autocast on CUDA: bf16 by default; never on CPU (keeps CPU runs bit-exact)
    channels_last: bool = True
    compression: str = "none"  # see store._compression_kwargs for the measurements behind it
    on_bad_image: str = "skip"
    fingerprint: str = "content"
    progress: bool = True
    runtime: str = "auto"  # featurecache.runtime.RUNTIMES; a non-eager runtime enters the cache fingerprint
    precision: str = "f32"  # "bf16": OpenVINO's bf16 hint, only when asked for (in the fingerprint)
    alpha: str = DEFAULT_ALPHA  # background of transparent pixels (featurecache.data.ALPHA_MODES)
    orientation: str = DEFAULT_ORIENTATION  # "exif": photos turned upright by their EXIF tag (in the fingerprint)
    decode: str = DEFAULT_DECODE  # "draft": JPEGs decoded at a reduced scale the resize allows (in the fingerprint)

    @property
    def decoding(self) -> Decoding:
        """How images become pixels (``--alpha``, ``--orientation``, ``--decode``): checked when it is made."""
        return Decoding(alpha=self.alpha, orientation=self.orientation, decode=self.decode)


@dataclass
class SplitResult:
    split: str
    path: Path
    status: str  # "extracted", "cached", "added-taps"
    num_samples: int
    num_skipped: int
    taps: list[str]
    seconds: float = 0.0
    images_per_second: float = 0.0
    file_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    identical_rows: int = 0  # valid rows whose features repeat another row's exactly (see _warn_identical_rows)
    copies_of_train: int = 0  # val/test images byte-identical to a train image (see _warn_copies)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ExtractRequest:
    """What to extract: which images, from which base and weights, at which taps, for which splits.

    Attributes:
        dataset_root: ImageFolder-style folder (see ``featurecache.data``).
        base: registered base name (``featurecache list-bases``).
        layers: ``all-stages`` or comma-separated node/module names, each optionally ``:pool``.
        pool: pooling for taps that do not name one.
        dataset: name of the dataset in the cache layout (default: the folder's name).
        splits: which splits to extract.
        weights, weights_file: see ``featurecache.bases.load_base``.
        seed: seed of the val/test split made when the dataset lacks one (None: the recorded split stays, whatever
            seed drew it; 0 for a first split), of random-init weights and of the augmented views (None: 0).
        train_views: also cache this many augmented views of every train image (``train-aug.h5``, view-major),
            so heads can train with augmentation without running the base every epoch.
        augment: the augmentation of those views (``featurecache.augment.AUGMENTATIONS``).
    """

    dataset_root: str | os.PathLike
    base: str
    layers: str | Sequence[str] = "all-stages"
    pool: str = "avg"
    dataset: str | None = None
    splits: Sequence[str] = SPLITS
    weights: str = WEIGHTS_DEFAULT
    weights_file: str | os.PathLike | None = None
    seed: int | None = None
    train_views: int = 0
    augment: str = "light"

    @property
    def model_seed(self) -> int:
        """The seed of random-init weights and of the augmented views: ``--seed``, else 0. Unlike the split's, it
        has no record to follow, so a hint that leaves ``--seed`` out keeps both the split and seed 0."""
        return 0 if self.seed is None else self.seed

    @property
    def dataset_name(self) -> str:
        """The dataset's folder name under ``data/features`` (checked: it becomes a path)."""
        return check_path_name(self.dataset or Path(self.dataset_root).resolve().name, what="dataset name")

    def check(self) -> None:
        """Refuse what no extraction can do, before any file is read."""
        if self.train_views < 0:
            raise FeaturecacheError("--train-views must be 0 (none) or a positive number of augmented views")
        if self.augment not in AUGMENTATIONS or self.augment == "none" and self.train_views:
            raise FeaturecacheError(
                f"--augment must be one of: light, standard for augmented views (got {self.augment!r})"
            )
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise FeaturecacheError(
                f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}"
                if unknown
                else f"--splits names no split; choose from {', '.join(SPLITS)}"
            )
        check_seed(self.seed)
        get_base_spec(self.base)  # a mistyped base is refused before a split is drawn and recorded


def extract(
    request: ExtractRequest,
    *,
    options: ExtractOptions | None = None,
    paths: Paths | None = None,
    world: World | None = None,
) -> list[SplitResult]:
    """Extract the requested taps of a base for every requested split of a dataset into ``data/features``.

    A complete cache with the same fingerprint is reused as is; new taps are added to it without
    re-writing the old ones; a changed dataset, base, weights or preprocessing re-extracts from scratch.

    Args:
        request: the images, base, weights, taps and splits (:class:`ExtractRequest`).
        options: batching, device, runtime, storage dtype, compression, bad-image policy.
        paths: project folders (default: below ``$FEATURECACHE_HOME`` or the current directory).
        world: the ranks of a torchrun launch (``featurecache.distributed.init_from_environment``); each rank
            extracts every ``size``-th batch and rank 0 writes the file, identical to a single-process run.
    """
    world = world or World()
    paths = paths or default_paths()
    options = options or ExtractOptions()
    _check_options(options)
    request.check()
    dtype = store.storage_dtype(options.dtype, random_init=request.weights == WEIGHTS_NONE)
    options = dataclasses.replace(options, dtype=dtype)
    dataset = request.dataset_name
    # The base, its taps and the device first: a refused --layers, --weights or --device used to leave a split
    # record behind (the only file of a run that did nothing).
    loaded = load_base(
        request.base, weights=request.weights, weights_file=request.weights_file, seed=request.model_seed
    )
    traced = trace_base(loaded)
    taps = parse_taps(request.layers, traced, default_pool=request.pool)
    caches = [paths.feature_file(dataset, loaded.tag, s) for s in (*SPLITS, AUGMENTED_TRAIN)]
    taps = world.broadcast(taps + _cached_taps(caches, traced, taps) if world.is_main else None)
    runner = _Runner(loaded, _rank_device(options.device, world), options, taps=taps,
                     export_file=_export_file(loaded, taps, dataset, paths))  # fmt: skip
    # Rank 0 alone may write the split record of a dataset without val/test; the others get its result.
    record = paths.split_record(dataset)
    indexes = world.broadcast(
        discover_splits(request.dataset_root, record_path=record, seed=request.seed) if world.is_main else None
    )
    _warn_raw_size(taps, indexes, options)
    if world.is_main:
        _suggest_draft(indexes[request.splits[0]], runner)
    split = functools.partial(_extract_split, runner=runner, taps=taps, dataset=dataset, world=world)
    with remembered_digests():  # each file hashed once, for its split's fingerprint and the copies check
        results = [_require_readable(split(indexes[s], paths.feature_file(dataset, loaded.tag, s)), indexes[s], world)
                   for s in request.splits]  # fmt: skip
        if world.is_main and options.fingerprint == "content" and "train" in request.splits:
            copies = _warn_copies(indexes)  # the train digests are in hand (stat fingerprints hash nothing: no check)
            results = [dataclasses.replace(r, copies_of_train=copies.get(r.split, 0)) for r in results]
        if request.train_views:
            final = paths.feature_file(dataset, loaded.tag, AUGMENTED_TRAIN)
            results.append(_extract_views(request, indexes["train"], final, runner=runner, split=split, world=world))
    return results


def _extract_views(
    request: ExtractRequest, train: SplitIndex, final: Path, *, runner: _Runner, split: Callable[..., Any], world: World
) -> SplitResult:
    """The ``train-aug`` cache: ``request.train_views`` seeded augmented views of every train image, view-major; its
    data fingerprint covers the train files once, not once per view."""
    augment = train_transform(runner.transform, runner.loaded.spec.input_size, request.augment)
    views = SeededPerRow(augment, request.model_seed)
    view_runner = runner.with_transform(views, views=request.train_views, augment=request.augment,
                                        source_split="train", source_rows=len(train))  # fmt: skip
    view_rows = augmented_views(train, request.train_views)
    return _require_readable(split(view_rows, final, runner=view_runner, files_of=train), view_rows, world)


def _cached_taps(caches: Sequence[Path], traced: TracedBase, requested: Sequence[TapSpec]) -> list[TapSpec]:
    """The taps the dataset's caches of this base hold beyond ``requested`` (any split's: a split made for the first
    time gets the layers its siblings have), resolved on this base again: a cache that must be made again (its
    images or options changed) keeps the layers it had, as one that only gains a layer does."""
    have, kept = {t.key for t in requested}, []
    for cache in caches:
        with contextlib.suppress(FeaturecacheError, OSError):  # no cache, or an unreadable one: nothing to keep
            for key, attrs in store.read_metadata(cache)["taps"].items() if cache.is_file() else ():
                if key not in have:
                    have.add(key)
                    kept += _resolved_again(key, attrs, traced, cache)
    if kept:
        log.info("layers already cached, made too wherever a split is made (again): %s",
                 ", ".join(t.key for t in kept))  # fmt: skip
    return kept


def _resolved_again(key: str, attrs: Any, traced: TracedBase, cache: Path) -> list[TapSpec]:
    """``[the tap]`` a cache's layer ``key`` is on this base now, or ``[]`` (with a warning) when it no longer is."""
    try:
        entry = attrs["query"] if attrs["pool"] == "none" else f"{attrs['query']}:{attrs['pool']}"  # "none": vectors
        (tap,) = parse_taps(entry, traced)
        if tap.key == key:
            return [tap]
    except (FeaturecacheError, KeyError, ValueError, TypeError):
        pass
    log.warning("%s holds layer %s, which this base no longer resolves: a split made again goes without it", cache,
                key)  # fmt: skip
    return []


def _require_readable(result: SplitResult, index: SplitIndex, world: World) -> SplitResult:
    """A split none of whose images could be read, or a train split with a class none of whose images could, is an
    error naming the first reason (often the same for all: a format PIL cannot read) rather than a cache for
    train-heads to stumble on; the cache is removed, so that the next run tries the images again."""
    problem = _unreadable(result, index) if world.is_main else None
    if problem is not None:
        result.path.unlink()  # before the other ranks hear of it: torchrun may stop this rank once they raise
    problem = world.broadcast(problem)
    if problem is None:
        return result
    raise FeaturecacheError(problem)


def _unreadable(result: SplitResult, index: SplitIndex) -> str | None:
    if result.num_skipped == 0:
        return None
    skipped = store.read_skipped(result.path)
    if result.num_skipped == result.num_samples:
        _, path, reason = skipped[0]
        return (
            f"none of the {result.num_samples} images of {result.split} could be read (the first, {path}: {reason}); "
            f"make them readable or remove them"
        )
    if result.split != "train":
        return None
    labels, _, valid = store.read_rows(result.path)
    classes = len(index.class_names)
    unread = (np.bincount(labels, minlength=classes) > 0) & (np.bincount(labels[valid], minlength=classes) == 0)
    if not unread.any():
        return None
    c = int(np.argmax(unread))  # the first such class
    path, reason = next((p, r) for row, p, r in skipped if labels[row] == c)
    return (
        f"no image of class {index.class_names[c]!r} in train could be read (the first, {path}: {reason}); make "
        f"them readable, or remove the class folder"
    )


def _warn_copies(indexes: dict[str, SplitIndex]) -> dict[str, int]:
    """Name val/test images that are byte-identical to train images (copies in the user's folders, or ``x (1).png``
    twins a drawn split put on both sides), once per folder and split in a process; returns their count by split."""
    copies = copies_across_splits(indexes)
    for split, pairs in copies.items():
        if not first_time("copies", str(indexes[split].root), split, len(pairs)):  # compare-layers: 3 bases
            continue
        shown = ", ".join(f"{copy} = {original}" for copy, original in pairs[:3])
        more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
        log.warning("%d of %d %s images are byte-identical to train images (%s%s): the heads have seen them, so %s "
                    "accuracy overstates what they do on new images; remove the copies from one of the splits",
                    len(pairs), len(indexes[split]), split, shown, more, split)  # fmt: skip
    return {split: len(pairs) for split, pairs in copies.items()}


def _suggest_draft(index: SplitIndex, runner: _Runner, sample: int = 8) -> None:
    """Say so when most of a few evenly spaced images of ``index`` are JPEGs large enough for ``--decode draft``
    to decode at a reduced scale: on phone photos the decoder, not the base, sets the speed (see DraftSize)."""
    draft = runner.preprocessing.draft_size()
    if runner.options.decode != DEFAULT_DECODE or draft is None or len(index) == 0:
        return
    rows = sorted({round(i * (len(index) - 1) / max(1, sample - 1)) for i in range(sample)})
    large = sum(draft_would_shrink(index.root / index.paths[r], draft, runner.options.decoding) for r in rows)
    if 2 * large >= len(rows):
        log.info(
            "%d of %d sampled images of %s are JPEGs over twice the size the base's resize keeps: --decode draft "
            "decodes such images several times faster (a 12 MP photo ~9x) with slightly different numbers, "
            "recorded in the cache", large, len(rows), index.root,
        )  # fmt: skip


def _rank_device(requested: str, world: World) -> str:
    """The device this rank runs on: ``auto`` resolved, and one GPU per rank under torchrun."""
    device = resolve_device(requested)
    if device == "cuda" and world.distributed:
        return f"cuda:{world.local_rank}"
    return device


def _export_file(loaded: LoadedBase, taps: Sequence[TapSpec], dataset: str, paths: Paths) -> Path:
    """Where the exported graph of this base x weights x taps lives (beside the dataset's caches)."""
    return paths.export_file(dataset, loaded.tag, export_digest_of(loaded, taps))


def export_digest_of(loaded: LoadedBase, taps: Sequence[TapSpec]) -> str:
    """The name of the exported graph of this base x weights x taps: a digest of what it computes."""
    identity = runtimes.export_identity(base=loaded.spec.name, weights=loaded.weights_id,
                                        input_size=loaded.spec.input_size, taps=taps)  # fmt: skip
    return runtimes.export_digest(identity)


def default_batch_size(device: str) -> int:
    """8 images per batch on the CPU, 32 on a GPU.

    Measured on the 2-core VM (``make bench``, fresh processes, BENCHMARKS.md): the bare forward of Lite0 runs
    1.80-1.86x faster at 8 than at 32 in eager PyTorch (64-71 vs 35-38 img/s) and 1.02-1.08x in ONNX Runtime; and
    (a one-off measurement with /usr/bin/time, not in the bench) ONNX Runtime's first pass in a fresh process pays
    for the batch's activations in fresh pages: resnet50 at 32 faulted in 1.3 GB (322k page faults), at 8 a quarter.
    """
    return 32 if device.startswith("cuda") else 8


def _check_options(options: ExtractOptions) -> None:
    if options.dtype not in (*store.STORAGE_DTYPES, "auto"):
        raise FeaturecacheError(f"unknown --dtype {options.dtype!r}; choose one of: {', '.join(store.STORAGE_DTYPES)}")
    if options.compression not in store.COMPRESSIONS:
        raise FeaturecacheError(
            f"unknown --compression {options.compression!r}; choose one of: {', '.join(store.COMPRESSIONS)}"
        )
    if options.on_bad_image not in ON_BAD_IMAGE:
        raise FeaturecacheError(f"unknown --on-bad-image {options.on_bad_image!r}; choose skip or fail")
    if options.amp not in AMP_MODES:
        raise FeaturecacheError(f"unknown --amp {options.amp!r}; choose one of: {', '.join(AMP_MODES)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise FeaturecacheError("--batch-size must be at least 1")
    runtimes.check_choice(options.runtime, options.precision)
    check_workers(options.workers)
    _ = options.decoding  # building the record raises the one-line error of an unknown --alpha/--orientation/--decode


def _warn_raw_size(taps: Sequence[TapSpec], indexes: dict[str, SplitIndex], options: ExtractOptions) -> None:
    n = sum(len(ix) for ix in indexes.values())
    itemsize = np.dtype(options.dtype).itemsize
    for tap in taps:
        size = n * tap.out_dim * itemsize
        if tap.pool == "raw" and size > RAW_MAPS_WARN_BYTES:
            log.warning(
                "raw maps of %s take about %.1f GiB uncompressed for %d images; grid2/grid4 pooling keeps "
                "spatial layout at a fraction of that",
                tap.key,
                size / 2**30,
                n,
            )


@dataclass
class _RuntimeChoice:
    """The runtime a runner and its ``with_transform`` copies share: decided once, checked against eager once (or
    taken over from rank 0), its exported graph loaded once."""

    runtime: str  # "eager", or an exported runtime until the check refuses it
    taps: list[TapSpec]  # what the exported graph computes
    export_file: Path | None
    graph: runtimes.ExportedGraph | None = None
    checked: bool = False


class _Runner:
    """The base on its device and runtime with the autocast/memory-format choices, built once per tap set.

    The runtime (``featurecache.runtime``) is resolved here once; an exported one is loaded and checked against
    eager PyTorch on the first batch by :meth:`prepare` (rank 0) or taken over by :meth:`adopt` (other ranks).
    That state is shared with the copies :meth:`with_transform` makes, so the augmented views run on the same
    runtime as the splits.
    """

    def __init__(
        self, loaded: LoadedBase, device: str, options: ExtractOptions, *, taps: Sequence[TapSpec] = (),
        export_file: Path | None = None,
    ) -> None:  # fmt: skip
        import torch

        self.loaded = loaded
        self.device = device
        # Callers that build a runner directly (predict, the benchmark) skip extract(): check and decide here too.
        _check_options(options)
        dtype = store.storage_dtype(options.dtype, random_init=loaded.weights_id.startswith(RANDOM_INIT_PREFIX))
        batch_size = default_batch_size(device) if options.batch_size is None else options.batch_size
        self.options = options = dataclasses.replace(options, dtype=dtype, batch_size=batch_size)
        self.transform = loaded.spec.transforms()
        self.transforms_repr = repr(self.transform)
        # Geometry in the decode workers (uint8 pixels), normalization once per batch here: the same numbers.
        self.preprocessing = Preprocessing(self.transform)
        self.draft = self._draft_size()
        self.device_geometry = self._device_geometry()
        if options.decode == "gpu":
            gpu_decode.check_device(device)
        if options.decode != DEFAULT_DECODE and self.draft is None and self.device_geometry is None:
            log.warning(
                "--decode %s has no effect on %s: its preprocessing does not start with a fixed-size Resize%s, so "
                "images are decoded on the CPU in full (and the cache says so)", options.decode, loaded.spec.name,
                ", bilinear or bicubic, (+ CenterCrop) to one shape" if options.decode == "gpu" else "",
            )  # fmt: skip
        on_cuda = device.startswith("cuda")
        amp = options.amp
        if amp == "auto":
            amp = "bf16" if on_cuda else "off"
        if amp != "off" and not on_cuda:
            raise FeaturecacheError("--amp bf16/fp16 needs CUDA; on the CPU use --amp off (the default there)")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.amp = amp
        self.precision = options.precision
        self._extractors: dict[tuple[str, ...], Any] = {}
        self._extra_config: dict[str, Any] = {}
        chosen = runtimes.resolve_runtime(options.runtime, device, options.precision)
        if chosen != "eager" and (export_file is None or not taps):
            raise FeaturecacheError(f"--runtime {chosen} needs the tap set and an export file")
        self._choice = _RuntimeChoice(chosen, list(taps), export_file)  # shared with with_transform's copies

    @property
    def runtime(self) -> str:
        return self._choice.runtime

    def with_transform(self, transform: Any, **config: Any) -> _Runner:
        """The same base and built extractors with another preprocessing (augmented views), recorded in the config."""
        other = copy.copy(self)
        other.transform = transform
        other.transforms_repr = repr(transform)
        other.preprocessing = Preprocessing(transform)
        other.draft = other._draft_size()
        other.device_geometry = other._device_geometry()
        other._extra_config = {**self._extra_config, **config}
        return other

    def _draft_size(self) -> DraftSize | None:
        """What ``--decode draft`` decodes JPEGs to keep under this preprocessing; None: decoded in full (the
        default, and augmentations, which crop at random scales)."""
        return draft_for(self.preprocessing, self.options.decode)

    def _device_geometry(self) -> DeviceGeometry | None:
        """What ``--decode gpu`` resizes on the device under this preprocessing; None: decoded on the CPU (the
        default, and augmentations)."""
        return device_geometry_for(self.preprocessing, self.options.decode)

    def on_device(self, batch: tuple) -> tuple:
        """A decoded batch as :meth:`forward` takes it: under ``--decode gpu`` its JPEGs are decoded and every image
        resized on this runner's device (:func:`featurecache.gpu_decode.decode_batch`), which may report more
        unreadable files; otherwise the batch as it is."""
        if self.device_geometry is None:
            return batch
        images, rows, errors = batch
        pixels, errors = gpu_decode.decode_batch(images, errors, self.device_geometry, self.device)
        return pixels, rows, errors

    def _load_graph(self, *, rebuild: bool) -> runtimes.ExportedGraph:
        taps = self._choice.taps
        identity = runtimes.export_identity(
            base=self.loaded.spec.name, weights=self.loaded.weights_id, input_size=self.loaded.spec.input_size,
            taps=taps,
        )  # fmt: skip
        return runtimes.exported_graph(
            self.runtime, self._choice.export_file, runtimes.export_fingerprint(identity),
            lambda: build_extractor(self.loaded, taps), keys=[t.key for t in taps], precision=self.precision,
            rebuild=rebuild,
        )  # fmt: skip

    def prepare(self, index: SplitIndex) -> bool:
        """Load the exported runtime and check it against eager on the first batch of ``index`` (once, first rows).

        Returns True when the runtime was refused and the runner fell back to eager (the caller re-plans, as the
        cache config records the runtime).
        """

        choice = self._choice
        if choice.checked or self.runtime == "eager" or len(index) == 0:
            return False
        rows = range(min(len(index), self.options.batch_size, PROBE_ROWS))
        images, _, _ = self.on_device(decoders.decode_batch(self.image_files(index, rows), (0, len(rows))))
        return self.check(images)

    def image_files(self, index: SplitIndex, rows: Sequence[int]) -> ImageFiles:
        """The ``rows`` of ``index`` as this runner decodes them: its preprocessing's per-image half, the
        options' decoding and the draft size its preprocessing allows."""
        return ImageFiles(index, self.preprocessing.per_image, input_size=self.loaded.spec.input_size, rows=rows,
                          decoding=self.options.decoding, draft=self.draft,
                          encoded=self.device_geometry)  # fmt: skip

    def check(self, images: Any) -> bool:
        """Load the exported runtime and compare it with eager on ``images``; True when it fell back to eager."""
        images = self.preprocessing.normalize(images)
        choice = self._choice
        choice.checked = True
        if self.runtime == "eager":
            return False
        graph = self._load_graph(rebuild=True)
        reference = self._eager(choice.taps)(images[:PROBE_ROWS])
        got = graph(images[:PROBE_ROWS], in_lane=True)  # the session the extraction loop runs
        if runtimes.agrees_with_eager(self.runtime, got, reference, self.precision):
            choice.graph = graph
            return False
        choice.runtime = "eager"
        return True

    def adopt(self, runtime: str) -> None:
        """Take over rank 0's decision (after :meth:`prepare` there): the same runtime, from the export it wrote."""
        choice = self._choice
        choice.runtime, choice.checked = runtime, True
        if runtime != "eager" and choice.graph is None:
            choice.graph = self._load_graph(rebuild=False)

    def extractor(self, taps: Sequence[TapSpec]) -> Any:
        """A callable ``images -> {tap.key: (B, D) float32 array}`` on this runner's runtime."""
        key = tuple(sorted(t.key for t in taps))
        cache_key = (self.runtime, *key)
        if cache_key not in self._extractors:
            if self.runtime == "eager":
                self._extractors[cache_key] = self._eager(taps)
            else:
                if self._choice.graph is None:
                    self._choice.graph = self._load_graph(rebuild=True)
                graph, keys = self._choice.graph, [t.key for t in taps]
                self._extractors[cache_key] = lambda images, in_lane=False: {
                    k: v for k, v in graph(images, in_lane=in_lane).items() if k in keys
                }
        return self._extractors[cache_key]

    @property
    def lanes(self) -> int:
        """Batches the runtime runs at once (``featurecache.runtime.CONCURRENT_BATCHES``); 1 for eager."""
        graph = self._choice.graph
        return graph.lanes if self.runtime != "eager" and graph is not None else 1

    def forward_batches(
        self, module: Any, batches: Iterable[tuple | decoders.Deferred]
    ) -> Iterator[tuple[tuple, dict[str, np.ndarray]]]:
        """Every batch (images first) with its rows from :meth:`forward`, in order, with up to :attr:`lanes`
        batches in flight, each in a lane of its own and a normalize buffer of its own. A :class:`decoders.Deferred`
        batch is decoded by the thread that runs it (:class:`featurecache.decoders.LaneBatches`)."""
        lanes = self.lanes
        if lanes == 1:
            if self.device_geometry is None:
                ready: Generator[tuple, None, None] = (decoders.loaded(item) for item in batches)
            else:  # --decode gpu: the next batch decoded on the device while this one runs
                ready = gpu_decode.decoded_ahead(batches, lambda item: self.on_device(decoders.loaded(item)),
                                                 self.device)  # fmt: skip
            try:
                for batch in ready:
                    yield batch, self.forward(module, batch[0])
            finally:  # a forward that raises would otherwise keep the decode-ahead thread until the error is freed
                ready.close()
            return

        def run(i: int, item: tuple | decoders.Deferred) -> tuple[tuple, dict[str, np.ndarray]]:
            batch = self.on_device(decoders.loaded(item))
            # At most ``lanes`` in flight: batch i - lanes is done before batch i is submitted, so its slot is free.
            return batch, self.forward(module, batch[0], slot=i % lanes, in_lane=True)

        for _item, done in decoders.in_order(run, batches, threads=lanes, in_flight=lanes, name="featurecache-lane"):
            yield done

    def _eager(self, taps: Sequence[TapSpec]) -> Any:
        import torch

        key = ("eager-module", *sorted(t.key for t in taps))
        if key not in self._extractors:
            module = build_extractor(self.loaded, taps).to(self.device)
            if self.options.channels_last:
                module = module.to(memory_format=torch.channels_last)
            self._extractors[key] = module
        module = self._extractors[key]

        def run(images: Any) -> dict[str, np.ndarray]:
            images = images.to(self.device, non_blocking=True)  # pinned by the DataLoader on CUDA
            if self.options.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                if self.amp_dtype is not None:
                    with torch.autocast(device_type="cuda", dtype=self.amp_dtype):
                        out = module(images)
                else:
                    out = module(images)
            return {k: v.float().cpu().numpy() for k, v in out.items()}

        return run

    def run_config(self) -> dict[str, Any]:
        """What about the forward pass changes the numbers (part of the cache fingerprint).

        A non-eager runtime or a reduced precision is part of it: their features differ from eager PyTorch's (by
        ~1e-6 in f32), so a cache made by one is not passed off as another's. Eager f32 adds no key, so caches
        written before runtimes existed (all eager) stay valid.
        """
        choice = {} if (self.runtime, self.precision) == ("eager", "f32") else {
            "runtime": self.runtime, "precision": self.precision,
        }  # fmt: skip
        if self.draft is not None:  # decoding in full adds no key either: caches made before --decode stay valid
            choice.update(decode="draft", draft_rule=DRAFT_RULE)
        if self.device_geometry is not None:
            choice.update(decode="gpu", device_decode_rule=DEVICE_DECODE_RULE)
        return {
            "base": self.loaded.spec.name,
            "weights": self.loaded.weights_id,
            "transforms": self.transforms_repr,
            "input_size": self.loaded.spec.input_size,
            "amp": self.amp,
            **choice,
            **self._extra_config,
        }

    def forward(self, module: Any, images: Any, *, slot: int = 0, in_lane: bool = False) -> dict[str, np.ndarray]:
        """Run ``module`` (from :meth:`extractor`) on a batch of decoded images; rows in the storage dtype.

        ``images``: uint8 pixels from :attr:`preprocessing`'s workers (normalized here, on the GPU for eager CUDA,
        after a copy of a quarter of float's bytes) or images already preprocessed to float.
        """
        if self.runtime == "eager":
            images = images.to(self.device, non_blocking=True)  # pinned by the DataLoader on CUDA
        # Every runtime returns fresh arrays (never a view of its input), so the buffer can serve the next batch.
        normalized = self.preprocessing.normalize(images, reuse=True, slot=slot)
        rows = module(normalized, in_lane=True) if in_lane else module(normalized)
        if self.options.dtype == "float16":
            for key, value in rows.items():
                _check_float16_range(key, value)
        return {k: v.astype(self.options.dtype, copy=False) for k, v in rows.items()}


# The first-batch check runs eager PyTorch on this many rows of the first batch: every tap is checked, and on a CPU
# where eager is ~6x slower than the exported runtime a whole batch would cost several batches' time per run.
PROBE_ROWS = 8
FLOAT16_MAX = float(np.finfo(np.float16).max)
# float16 subnormals step by 2**-24 (6e-8): below ~50 steps a value keeps less than 2% relative precision.
FLOAT16_LOSSY_BELOW = 50 * 2.0**-24


def _check_float16_range(key: str, value: np.ndarray) -> None:
    """Refuse float16 storage that would lose the features (overflow to inf, or underflow to zero).

    Random-init bases are the usual case: their deep activations shrink to ~1e-8, which float16 flushes to 0.
    """
    magnitude = np.abs(value)
    nonzero = magnitude > 0
    overflow = bool((magnitude > FLOAT16_MAX).any())
    underflow = nonzero.any() and (magnitude[nonzero] < FLOAT16_LOSSY_BELOW).mean() > 0.01
    if overflow or underflow:
        raise FeaturecacheError(
            f"features of layer {key!r} fall outside float16's range (|x| up to {magnitude.max():.3g}, "
            f"median {np.median(magnitude):.3g}); store them with --dtype float32"
        )


@dataclass
class _Plan:
    """What rank 0 decided for one split, sent to every rank."""

    config: dict[str, Any]
    config_fp: str
    todo: tuple[TapSpec, ...]  # the taps to extract; empty when the cache is complete
    keep_from: Path | None
    manifest: dict[str, Any] | None
    cached_meta: dict[str, Any] | None = None
    stale: tuple[list[str], dict[str, Any]] | None = None  # what changed since the cache on disk, and its metadata


def _plan_split(
    index: SplitIndex,
    final: Path,
    *,
    runner: _Runner,
    taps: Sequence[TapSpec],
    options: ExtractOptions,
    files_of: SplitIndex | None = None,
) -> _Plan:
    """Compare the cache on disk with what this run would write: reuse, add taps, or (re-)extract.

    ``files_of``: the index whose files the data fingerprint covers (the train split, for its augmented views,
    so K views do not hash every file K times).
    """
    data_fp = fingerprint_files(files_of or index, mode=options.fingerprint)
    config = {
        "schema_version": store.SCHEMA_VERSION,
        **runner.run_config(),
        "dtype": options.dtype,
        **options.decoding.cache_keys(),
        "data_fingerprint": data_fp,
        "class_names": list(index.class_names),
        "split": index.split,
    }
    config_fp = _digest(config)
    todo = tuple(taps)
    keep_from = None
    meta = _cached_meta(final)
    if meta and _skipped_heif_readable_now(final, meta):
        log.info("%s skipped HEIC photos that pillow-heif, installed since, reads; re-extracting", final)
        meta = {}
    if meta.get("config_fingerprint") == config_fp:
        todo = tuple(t for t in taps if t.key not in meta["taps"])
        if not todo:
            log.info("%s: cached (%d rows, taps %s)", final, meta["num_samples"], ", ".join(meta["taps"]))
            return _Plan(config, config_fp, (), None, None, cached_meta=meta)
        keep_from = final
        log.info("%s: adding taps %s (cached taps are kept)", final, ", ".join(t.key for t in todo))
    stale = (_stale_keys(config, meta), meta) if meta and meta.get("config_fingerprint") != config_fp else None
    manifest = {
        "config": config,  # the fingerprint's inputs, so that discarded progress names what changed
        "config_fingerprint": config_fp,
        "taps": [t.as_attrs() for t in todo],
        "batch_size": options.batch_size,
        "channels_last": options.channels_last,
        "num_samples": len(index),
    }
    return _Plan(config, config_fp, todo, keep_from, manifest, stale=stale)


def _stale_keys(config: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """What differs between this run's cache config and the cached file's metadata, for the log.

    Eager f32 leaves ``runtime``/``precision`` out of the config (caches from before runtimes stay valid) while
    every file records them, so they are compared with those defaults: a switch between runtimes is named as such.
    A full decode leaves ``decode`` out of both (absent means full), and ``draft_rule`` is named only when the
    draft itself stayed (a switch to or from draft names ``decode``); so does ``--orientation ignore``
    (``featurecache.data.Decoding.cache_keys``).
    """
    keys = sorted((set(config) | set(_LEFT_OUT_AT_DEFAULT)) - {"class_names"})
    changed = [k for k in keys if _recorded(meta, k) != _recorded(config, k)]
    if "decode" in changed:
        changed = [k for k in changed if k not in ("draft_rule", "device_decode_rule")]
    return changed or ["inputs"]


# The config keys left out at the value their absence means (see _stale_keys), and the options a user sets per run.
_LEFT_OUT_AT_DEFAULT = ("runtime", "precision", "decode", "draft_rule", "device_decode_rule", "orientation")
_OPTIONS = ("alpha", "orientation", "decode", "runtime", "precision", "dtype")


def _recorded(meta: dict[str, Any], key: str) -> Any:
    return store.recorded(meta, key) if key in _LEFT_OUT_AT_DEFAULT else meta.get(key)


def _say_stale(final: Path, changed: list[str], meta: dict[str, Any]) -> None:
    """Log why a cache is made again: at info when its images, base or weights changed (that is what re-extraction
    is for), as a warning naming the options that keep it when only this run's options differ from its own."""
    never_recorded = [k for k in changed if k not in meta and k not in _LEFT_OUT_AT_DEFAULT]  # from before the option
    if not set(changed) <= set(_OPTIONS) or never_recorded:
        log.info("%s is stale (%s changed); re-extracting", final, ", ".join(changed))
        return
    keep = " ".join(f"--{k} {_recorded(meta, k)}" for k in changed)
    log.warning("%s was made with other options (%s): making it again with this run's, every layer it held "
                "included; to keep it instead, run with %s", final, ", ".join(changed), keep)  # fmt: skip


def _skipped_heif_readable_now(final: Path, meta: dict[str, Any]) -> bool:
    """Whether the cache skipped HEIC photos for want of pillow-heif, which is installed now (the image files, and
    so the fingerprint, did not change: only what can read them did)."""
    if meta.get("num_valid", 0) == meta.get("num_samples", 0):
        return False
    return any(HEIF_MISSING in reason for _, _, reason in store.read_skipped(final)) and heif_readable()


def _cached_meta(final: Path) -> dict[str, Any]:
    """The metadata of the cache already at ``final``; empty when there is none or it cannot be read."""
    if not final.is_file():
        return {}
    try:
        return store.read_metadata(final)
    except FeaturecacheError as exc:
        log.warning("%s; re-extracting", exc)
        return {}


def _extract_split(
    index: SplitIndex,
    final: Path,
    *,
    runner: _Runner,
    taps: Sequence[TapSpec],
    dataset: str,
    world: World,
    files_of: SplitIndex | None = None,
) -> SplitResult:
    t0 = time.perf_counter()
    options = runner.options  # the batch size and dtype resolved for the runner's device
    plan_split = functools.partial(_plan_split, index, final, runner=runner, taps=taps, options=options,
                                   files_of=files_of)  # fmt: skip
    read_only = world.broadcast(plan_split() if world.is_main and not fileio.writable(final.parent) else None)
    if read_only is not None and not read_only.todo:
        return _cached_result(index, final, read_only.cached_meta)  # complete in a read-only home: no lock needed
    # Rank 0 holds the writer lock for the whole split (a foreign job is refused) and alone decides, opens the
    # journal (which may discard stale progress) and assembles; the other ranks only commit their batches.
    with store.writer_lock(final) if world.is_main else contextlib.nullcontext():
        plan, journal = _decide(index, final, plan_split, runner=runner, world=world)
        if not plan.todo:
            return _cached_result(index, final, plan.cached_meta)
        seconds, processed = _run_batches(index, journal, runner=runner, taps=plan.todo, options=options, world=world)
        # The split's speed is all ranks' images over the slowest rank's forward loop.
        counts = world.gather((seconds, processed))
        seconds, processed = max(c[0] for c in counts), sum(c[1] for c in counts)
        world.barrier()  # every rank's batches are committed
        if world.is_main:
            _assemble(index, final, plan, journal, runner=runner, dataset=dataset, seconds=seconds, world=world)
        world.barrier()  # the file is in place
    result = _split_result(index, final, plan, seconds=seconds, processed=processed, elapsed=time.perf_counter() - t0)
    if world.is_main:
        log.info(
            "%s: %s %d images (%d skipped) in %.1fs, %s", final, result.status, result.num_samples,
            result.num_skipped, result.seconds, _fmt_bytes(result.file_bytes),
        )  # fmt: skip
        result.identical_rows = _warn_identical_rows(final, alpha=options.alpha)
    return result


def _cached_result(index: SplitIndex, final: Path, meta: dict[str, Any]) -> SplitResult:
    return SplitResult(index.split, final, "cached", meta["num_samples"], meta["num_samples"] - meta["num_valid"],
                       list(meta["taps"]), file_bytes=final.stat().st_size)  # fmt: skip


def _decide(
    index: SplitIndex, final: Path, plan_split: Callable[[], _Plan], *, runner: _Runner, world: World
) -> tuple[_Plan, store.Journal | None]:
    """Rank 0 plans the split (``plan_split``) and checks the runtime; every rank gets the plan and the journal to
    commit into."""
    plan = journal = None
    if world.is_main:
        plan = plan_split()
        if plan.todo and runner.prepare(index):  # refused: the config must record the runtime actually used
            plan = plan_split()
        if plan.todo:
            journal = store.Journal.open(final, plan.manifest)
    if world.is_main and plan.stale is not None:  # said once, of the plan that stands (after a runtime fallback)
        _say_stale(final, *plan.stale)
    plan, chosen = world.broadcast((plan, runner.runtime))
    if plan.todo and not world.is_main:
        runner.adopt(chosen)  # every rank runs the runtime rank 0 checked
        journal = store.Journal.attach(final, plan.manifest)
    return plan, journal


def _assemble(
    index: SplitIndex, final: Path, plan: _Plan, journal: store.Journal, *, runner: _Runner, dataset: str,
    seconds: float, world: World,
) -> None:  # fmt: skip
    """Write the split's cache from the journal (keeping the taps of the file it adds to) and drop the journal."""
    options = runner.options
    attrs = {
        **plan.config,
        "dataset": dataset,
        "config_fingerprint": plan.config_fp,
        "compression": options.compression,
        "library_versions": library_versions("torchvision", "h5py"),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "extraction_seconds": round(seconds, 3),
        "dataset_root": str(Path(index.root).resolve()),  # fine-tuning and the pixel baseline read the images here
        "world_size": world.size,
        "runtime": runner.runtime,
        "precision": runner.precision,
    }
    columns = [store.TapColumn(t.key, t.out_dim, t.as_attrs()) for t in plan.todo]
    store.assemble(
        final, journal=journal, taps=columns, labels=index.labels, paths=index.paths, attrs=attrs,
        dtype=options.dtype, compression=options.compression, keep_from=plan.keep_from,
    )  # fmt: skip
    journal.remove()


def _split_result(
    index: SplitIndex, final: Path, plan: _Plan, *, seconds: float, processed: int, elapsed: float
) -> SplitResult:
    """What the split's extraction did, read back from the file every rank now sees."""
    meta = store.read_metadata(final)
    return SplitResult(
        split=index.split,
        path=final,
        status="added-taps" if plan.keep_from else "extracted",
        num_samples=meta["num_samples"],
        num_skipped=meta["num_samples"] - meta["num_valid"],
        taps=list(meta["taps"]),
        seconds=elapsed,
        images_per_second=processed / seconds if seconds > 0 else math.nan,
        file_bytes=final.stat().st_size,
    )


def _warn_identical_rows(path: Path, *, alpha: str) -> int:
    """Warn, naming a few files, when many rows of a cache are identical; returns how many rows repeat another."""
    valid, groups = store.identical_row_groups(path)
    repeated = sum(len(g) - 1 for g in groups)
    if repeated >= max(2, IDENTICAL_ROWS_WARN_FRACTION * valid):
        names = store.read_paths(path)
        log.warning(
            "%s: %d of %d images have exactly the same features as another image (%d distinct); the largest "
            "group of %d includes %s. Check that the images differ: images with transparency are composited onto "
            "--alpha %s (try white, black or mean), and duplicated files give duplicated rows", path, repeated,
            valid, valid - repeated, len(groups[0]), ", ".join(names[r] for r in groups[0][:3]), alpha,
        )  # fmt: skip
    return repeated


def batch_ranges(num_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """The row ranges of every batch of a split; fixed by the batch size alone, whatever the world size."""
    return [(start, min(start + batch_size, num_rows)) for start in range(0, num_rows, batch_size)]


def rank_batches(num_rows: int, batch_size: int, world: World) -> list[tuple[int, int]]:
    """This rank's batches: every ``size``-th one, starting at its rank (interleaved, so ranks finish together)."""
    return batch_ranges(num_rows, batch_size)[world.rank :: world.size]


def _run_batches(
    index: SplitIndex,
    journal: store.Journal,
    *,
    runner: _Runner,
    taps: Sequence[TapSpec],
    options: ExtractOptions,
    world: World,
) -> tuple[float, int]:
    """Forward this rank's not-yet-committed batches and commit each; returns (forward-loop seconds, images)."""
    import torch

    n = len(index)
    mine = rank_batches(n, options.batch_size, world)
    committed = journal.committed()
    todo = [b for b in mine if b not in committed]
    who = f"rank {world.rank}/{world.size}: " if world.distributed else ""
    resuming = len(todo) < len(mine)
    if resuming or world.distributed:
        log.info(
            "%s%s %s: %d of %d batches already committed, %d to do", who, "resuming" if resuming else "extracting",
            index.split, len(mine) - len(todo), len(mine), len(todo),
        )  # fmt: skip
    if not todo:
        return 0.0, 0
    module = runner.extractor(taps)
    loader = _loader(index, todo, runner=runner, options=options)  # after extractor(): the runtime's lanes are known
    t0 = time.perf_counter()
    mine_rows = sum(stop - start for start, stop in mine)
    todo_rows = sum(stop - start for start, stop in todo)
    bar = progress_bar(
        total=mine_rows,
        initial=mine_rows - todo_rows,
        unit="img",
        desc=f"{index.split}" + (f" [rank {world.rank}]" if world.distributed else ""),
        disable=not options.progress or not world.is_main,
        dynamic_ncols=True,
    )
    # Journal commits run on a writer thread behind a bounded queue, so the forward pass never waits for the disk;
    # a batch still counts only once its shard is renamed into place, and a failed commit raises here.
    try:
        with store.BackgroundCommits(journal) as commits:
            done, spent = _forward_loop(loader, index, runner=runner, module=module, commits=commits, bar=bar)
    finally:
        bar.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    log.debug(
        "%s: %.1fs loop = %.1fs waiting for decoded batches + %.1fs forward + %.1fs waiting for the journal writer",
        index.split, seconds, spent["decode"], spent["forward"], spent["writer"],
    )  # fmt: skip
    return seconds, done


def _loader(index: SplitIndex, todo: Sequence[tuple[int, int]], *, runner: _Runner, options: ExtractOptions) -> Any:
    """The batches of the row ranges ``todo``, decoded as :func:`featurecache.decoders.batches` chooses. Call it
    once the runtime is decided (after the first-batch check), as the lanes decide the decoder."""
    # Batches keep the composition they have in a single uninterrupted run (same rows, same batch size), so
    # resumed and distributed runs give bit-identical numbers.
    data = runner.image_files(index, range(len(index)))
    return decoders.batches(data, todo, device=runner.device, lanes=runner.lanes, workers=options.workers)


def _forward_loop(
    loader: Any, index: SplitIndex, *, runner: _Runner, module: Any, commits: store.BackgroundCommits, bar: Any
) -> tuple[int, dict[str, float]]:
    """Forward every batch the loader decodes and queue its rows; returns (images, seconds spent per stage).

    Lanes that decode their own batches (:class:`featurecache.decoders.LaneBatches`) count their decoding as
    forward time."""
    spent = dict.fromkeys(("decode", "forward", "writer"), 0.0)
    done = 0
    t0 = time.perf_counter()
    for (_, batch_rows, errors), arrays in runner.forward_batches(module, _timed(loader, spent, "decode")):
        t1 = time.perf_counter()
        errors = list(errors)
        for i in _bad_rows(index, batch_rows, errors, runner.options):
            for a in arrays.values():
                a[i] = 0
        commits.submit(int(batch_rows[0]), arrays, errors)
        done += len(errors)
        bar.update(len(errors))
        spent["writer"] += time.perf_counter() - t1
    spent["forward"] = time.perf_counter() - t0 - spent["decode"] - spent["writer"]
    return done, spent


def _timed(items: Iterable[Any], spent: dict[str, float], key: str) -> Iterator[Any]:
    """``items``, adding the seconds spent waiting for each to ``spent[key]``."""
    iterator = iter(items)
    while True:
        t0 = time.perf_counter()
        item = next(iterator, None)
        spent[key] += time.perf_counter() - t0
        if item is None:
            return
        yield item


def _bad_rows(index: SplitIndex, batch_rows: Any, errors: Sequence[str], options: ExtractOptions) -> list[int]:
    """Positions of the undecodable images of a batch (logged); raises under ``--on-bad-image fail``."""
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad if options.on_bad_image == "skip" else ():  # under "fail" the error below says it, not "skipping"
        row = int(batch_rows[i])
        if index.paths.index(index.paths[row]) == row:  # said once per file, not once per augmented view of it
            log.warning("skipping unreadable %s: %s", index.paths[row], errors[i])
    if bad and options.on_bad_image == "fail":
        first = bad[0]
        raise FeaturecacheError(
            f"unreadable image {index.root / index.paths[int(batch_rows[first])]}: {errors[first]} "
            f"(remove it, or pass --on-bad-image skip to skip and list such files)"
        )
    return bad


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
