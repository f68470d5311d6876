"""The HDF5 feature store: schema, crash-safe journal of committed batches, atomic assembly, reading.

Layout of one cache file (one dataset x base x split)::

    /labels              (N,)   int64     class index into attrs["class_names"]
    /paths               (N,)   str       path relative to the dataset root
    /valid               (N,)   bool      False for files that could not be decoded (their rows are zeros)
    /skipped/{row,path,reason}            the unreadable files and why
    /features/<key>      (N, D) float16|float32, chunked along samples, fletcher32, optional gzip/lzf
    attrs                schema_version, base, weights, transforms, class_names, taps (JSON), fingerprints,
                         library versions, complete=True ...

Crash safety: while extracting, every batch is committed as a small ``.npz`` in ``<file>.partial/`` (written
to a temporary name, then renamed), so a ``kill -9`` at any point loses at most the batch in flight and a
re-run redoes only the batches that are not committed. The HDF5 file is assembled from those shards into a
temporary name and renamed into place: readers only ever see complete files.

Distributed extraction (``torchrun``) uses the same journal: every rank commits its own batches into the
one ``.partial/`` folder (shards are named by row range, so ranks never collide), and rank 0 assembles the
file once every batch is there. The result is byte-for-byte the file a single process writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write_text, temporary_for

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Chunks of ~512 KiB along the sample axis: big enough for fast sequential reads and compression,
# small enough that reading a few rows does not inflate a whole layer (h5py's 10 KiB-1 MiB advice).
TARGET_CHUNK_BYTES = 512 * 1024
COMPRESSIONS = ("gzip", "lzf", "none")
STORAGE_DTYPES = ("float16", "float32")
IMAGENET_CLASSES = 1000

# What a key missing from a cache's metadata (or a head's sidecar) means: the file predates the option, so it was made
# the way featurecache worked then. That is not always today's default: ``--orientation`` defaults to exif, but a cache
# without the key ignored EXIF. ``alpha`` is not here: caches from before ``--alpha`` flattened transparency and
# have another fingerprint (``featurecache.data.Decoding.recorded``).
_ABSENT_MEANS = {"runtime": "eager", "precision": "f32", "amp": "off", "compression": "none", "decode": "full",
                 "orientation": "ignore", "draft_rule": None, "device_decode_rule": None}  # fmt: skip


def recorded(meta: Mapping[str, Any], key: str) -> Any:
    """``meta[key]``, or what its absence means (a cache made before the option existed)."""
    value = meta.get(key)
    return _ABSENT_MEANS[key] if value is None else value


def storage_dtype(requested: str, *, random_init: bool) -> str:
    """``auto`` stores float16 (half the disk, the same head accuracy), except for random-init weights, whose deep
    activations shrink below float16's range; an explicit dtype is kept (float16 is still range-checked)."""
    if requested != "auto":
        return requested
    return "float32" if random_init else "float16"


# ------------------------------------------------------------------------------------------- locking


@contextlib.contextmanager
def writer_lock(final_path: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock for writing ``final_path``; a second writer is refused.

    ``flock`` is released by the kernel when the process dies (even ``kill -9``), so a crash never leaves
    a stale lock behind.
    """
    final_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final_path.with_name(final_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FeaturecacheError(
                f"another featurecache process (pid {holder}) is writing {final_path}; wait for it to finish "
                f"(it resumes from its own progress) instead of starting a second writer"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- journal


def _settings(manifest: Any) -> Any:
    """What decides whether a journal can be resumed: its manifest without ``config``, which only names the
    inputs of ``config_fingerprint`` for the log."""
    return {k: v for k, v in manifest.items() if k != "config"} if isinstance(manifest, dict) else manifest


def _changed_settings(previous: Any, manifest: dict[str, Any]) -> list[str]:
    """The manifest entries that differ, naming the settings inside ``config`` (the cache's fingerprint inputs)
    rather than the fingerprint itself: "runtime", not "config_fingerprint"."""
    if not isinstance(previous, dict):
        return ["unreadable manifest"]
    keys = sorted(set(manifest) | set(previous))
    changed = [k for k in keys if previous.get(k) != manifest.get(k)]
    old, new = previous.get("config"), manifest.get("config")
    if isinstance(old, dict) and isinstance(new, dict) and "config" in changed:
        inside = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        changed = [k for k in changed if k not in ("config", "config_fingerprint")] + inside
    return changed


class Journal:
    """Committed batches of an extraction in progress, one ``.npz`` per batch in ``<file>.partial/``."""

    MANIFEST = "manifest.json"

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, final_path: Path, manifest: dict[str, Any]) -> Journal:
        """Reuse a journal whose manifest matches (same data, base, taps, batching); else start afresh."""
        directory = cls.directory_for(final_path)
        manifest_path = directory / cls.MANIFEST
        if directory.is_dir():
            try:
                previous = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                previous = None
            if _settings(previous) == _settings(manifest):
                if previous != manifest:  # a journal from before manifests named the config: the ranks must agree
                    atomic_write_text(manifest_path, json.dumps(manifest, sort_keys=True))
                return cls(directory, manifest)
            changed = _changed_settings(previous, manifest)
            # The batch size is part of it: resuming at another --batch-size (or after its default changed) would
            # mix batch boundaries, so the split starts over; passing the old --batch-size keeps the progress.
            log.warning("discarding progress in %s: made with other settings (%s)", directory, ", ".join(changed))
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        atomic_write_text(manifest_path, json.dumps(manifest, sort_keys=True))
        return cls(directory, manifest)

    @classmethod
    def attach(cls, final_path: Path, manifest: dict[str, Any]) -> Journal:
        """Join a journal another process (rank 0 of a distributed run) has opened; never discards anything."""
        directory = cls.directory_for(final_path)
        try:
            previous = json.loads((directory / cls.MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise FeaturecacheError(
                f"cannot read the journal manifest in {directory} ({exc}); every rank must see the same "
                f"FEATURECACHE_HOME (a shared filesystem on multi-node runs)"
            ) from exc
        if previous != manifest:
            raise FeaturecacheError(f"the journal in {directory} was opened with other settings than this rank's")
        return cls(directory, manifest)

    @staticmethod
    def directory_for(final_path: Path) -> Path:
        return final_path.with_name(final_path.name + ".partial")

    def _shard_name(self, start: int, stop: int) -> str:
        return f"rows-{start:012d}-{stop:012d}.npz"

    def shards(self) -> list[tuple[int, int, Path]]:
        """Committed shards in row order (only whole files: temporaries are never listed)."""
        out = []
        for p in self.directory.glob("rows-*.npz"):
            _, start, stop = p.stem.split("-")
            out.append((int(start), int(stop), p))
        return sorted(out)

    def committed(self) -> set[tuple[int, int]]:
        """The ``(start, stop)`` row ranges already committed, in any order (ranks commit interleaved)."""
        return {(start, stop) for start, stop, _ in self.shards()}

    def missing_rows(self, num_rows: int) -> list[tuple[int, int]]:
        """Row ranges of ``0..num_rows`` that no committed shard covers (empty when the journal is complete)."""
        gaps, done = [], 0
        for start, stop, _ in self.shards():
            if start > done:
                gaps.append((done, start))
            if start < done:
                raise FeaturecacheError(
                    f"overlapping shards in {self.directory} (rows {start}-{stop}); delete the folder and re-run"
                )
            done = max(done, stop)
        if done < num_rows:
            gaps.append((done, num_rows))
        return gaps

    def commit(self, start: int, arrays: dict[str, np.ndarray], errors: Sequence[str]) -> None:
        """Persist one batch of rows ``start..start+len(errors)``; atomic (temporary name + rename)."""
        stop = start + len(errors)
        payload = {f"f:{k}": v for k, v in arrays.items()}
        payload["errors"] = np.asarray(list(errors), dtype=np.str_)
        final = self.directory / self._shard_name(start, stop)
        tmp = self.directory / f".tmp-{os.getpid()}-{final.name}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **payload)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, self.directory) from exc

    def read(self, path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("f:")}
            errors = [str(e) for e in z["errors"]]
        return arrays, errors

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class BackgroundCommits:
    """:meth:`Journal.commit` on a writer thread behind a bounded queue, so the forward pass never waits for disk.

    Crash safety is the journal's: a batch counts only once its shard is renamed into place, so a ``kill -9``
    loses at most the batches still queued (``max_pending`` + the one being written) and a re-run redoes them.
    An error on the writer thread (disk full) is raised on the caller's thread by the next :meth:`submit` or by
    leaving the ``with`` block; after one, later batches are not written. Leaving the block waits for the queue.
    """

    def __init__(self, journal: Journal, max_pending: int = 2) -> None:
        self.journal = journal
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="featurecache-journal", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # keep draining after a failure, so submit() never blocks on a full queue
                try:
                    self.journal.commit(*item)
                except BaseException as exc:  # handed to the main thread, which raises it
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, start: int, arrays: dict[str, np.ndarray], errors: Sequence[str]) -> None:
        """Queue one batch (blocks while ``max_pending`` are queued); the arrays must not be modified after."""
        self._raise_if_failed()
        self._queue.put((start, arrays, errors))

    def close(self) -> None:
        """Wait until every queued batch is committed; raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> BackgroundCommits:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's own error wins; the queued batches are still committed
            with contextlib.suppress(BaseException):
                self.close()


def _disk_error(exc: OSError, where: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FeaturecacheError(
            f"disk full while writing under {where}: free space there (or point FEATURECACHE_HOME at a larger "
            f"disk) and re-run; committed batches are kept and extraction resumes from them"
        )
    return exc


# ------------------------------------------------------------------------------------------- writing


def chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows per chunk so that one chunk holds about ``TARGET_CHUNK_BYTES``."""
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // max(1, row_bytes)))


def _compression_kwargs(compression: str) -> dict[str, Any]:
    # Measured by `make bench` (io section) on real 1280-d float16 features: gzip halves the file but reads
    # ~12x slower than no compression (55k vs 645k rows/s), and byte-shuffle makes float16 features *larger*
    # (1.25 vs 1.17 MiB per 1000 rows). Stage 2 re-reads every layer for every head, so the default is none.
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "lzf":
        return {"compression": "lzf"}
    raise FeaturecacheError(f"unknown compression {compression!r}; choose one of: {', '.join(COMPRESSIONS)}")


@dataclass
class TapColumn:
    """A tap to write into the assembled file: its attrs and where its rows come from."""

    key: str
    out_dim: int
    attrs: dict[str, Any]


def assemble(
    final_path: Path,
    *,
    journal: Journal,
    taps: Sequence[TapColumn],
    labels: Sequence[int],
    paths: Sequence[str],
    attrs: dict[str, Any],
    dtype: str,
    compression: str,
    keep_from: Path | None = None,
) -> None:
    """Write the cache from the journal's shards (plus taps copied from ``keep_from``) and rename it into place.

    The file is built under a temporary name opened with mode ``"x"`` (never clobbers), checksummed
    (fletcher32), flushed and fsynced before the atomic rename; on any error the temporary is removed and
    nothing appears under the final name.
    """
    import h5py

    n = len(paths)
    gaps = journal.missing_rows(n)
    if gaps:
        shown = ", ".join(f"{a}-{b - 1}" for a, b in gaps[:5])
        raise FeaturecacheError(
            f"cannot assemble {final_path}: rows {shown}{' ...' if len(gaps) > 5 else ''} were never committed; "
            f"re-run the same extract command to finish them"
        )
    tmp = temporary_for(final_path)
    tmp.unlink(missing_ok=True)  # a temporary from an earlier crash of this same pid number
    try:
        with h5py.File(tmp, "x") as f:
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("paths", data=_encoded(paths), dtype=h5py.string_dtype("utf-8"))
            group = f.create_group("features")
            valid, skipped = _write_shards(group, journal, taps, paths, dtype=dtype, compression=compression)
            tap_attrs = {t.key: t.attrs for t in taps}
            if keep_from is not None:  # the rows' validity and skip list are the old file's: same images, same run
                valid, skipped, kept = _copy_kept_taps(keep_from, group)
                tap_attrs.update(kept)
            _write_index(f, valid, skipped, tap_attrs, attrs)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final_path)
        _fsync_dir(final_path.parent)
    except OSError as exc:
        raise _disk_error(exc, final_path.parent) from exc
    finally:
        tmp.unlink(missing_ok=True)


Skipped = list[tuple[int, str, str]]  # (row, path, reason) of every image that could not be decoded


def _write_shards(
    group: Any, journal: Journal, taps: Sequence[TapColumn], paths: Sequence[str], *, dtype: str, compression: str
) -> tuple[np.ndarray, Skipped]:
    """One dataset per tap, filled from the journal's shards; returns the rows' validity and the skipped list."""
    n = len(paths)
    itemsize = np.dtype(dtype).itemsize
    dsets = {}
    for tap in taps:
        dsets[tap.key] = group.create_dataset(
            tap.key,
            shape=(n, tap.out_dim),
            dtype=dtype,
            chunks=(chunk_rows(tap.out_dim * itemsize, n), tap.out_dim),
            fletcher32=True,
            **_compression_kwargs(compression),
        )
        dsets[tap.key].attrs.update({k: _attr(v) for k, v in tap.attrs.items()})
    valid = np.ones(n, dtype=bool)
    skipped: Skipped = []
    for start, stop, shard in journal.shards():
        arrays, errors = journal.read(shard)
        for key, dset in dsets.items():
            dset[start:stop] = arrays[key]
        for i, err in enumerate(errors):
            if err:
                valid[start + i] = False
                skipped.append((start + i, paths[start + i], err))
    return valid, skipped


def _copy_kept_taps(keep_from: Path, group: Any) -> tuple[np.ndarray, Skipped, dict[str, dict[str, Any]]]:
    """Copy the taps of the file being added to that this run did not extract; its validity, skips and tap attrs."""
    import h5py

    with h5py.File(keep_from, "r") as old:
        old_taps = json.loads(old.attrs["taps"])
        kept = [k for k in old["features"] if k not in group]
        for key in kept:
            old.copy(old["features"][key], group, name=key)
        skipped = list(
            zip(
                old["skipped/row"][:].tolist(),
                old["skipped/path"].asstr(errors=PATH_ERRORS)[:],
                old["skipped/reason"].asstr(errors=PATH_ERRORS)[:],
                strict=True,
            )
        )
        return old["valid"][:], skipped, {k: old_taps[k] for k in kept}


def _write_index(
    f: Any, valid: np.ndarray, skipped: Skipped, tap_attrs: dict[str, dict[str, Any]], attrs: dict[str, Any]
) -> None:
    """The rows' validity, the skip list and the file's attrs, with the taps listed shallow to deep."""
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    f.create_dataset("valid", data=valid)
    sk = f.create_group("skipped")
    sk.create_dataset("row", data=np.asarray([s[0] for s in skipped], dtype=np.int64))
    sk.create_dataset("path", data=_encoded([s[1] for s in skipped]), dtype=str_dt)
    sk.create_dataset("reason", data=_encoded([s[2] for s in skipped]), dtype=str_dt)
    # Listed shallow to deep, the order in which every report wants them.
    ordered = sorted(tap_attrs.items(), key=lambda kv: kv[1]["relative_depth"])
    f.attrs.update({k: _attr(v) for k, v in attrs.items()})
    f.attrs["taps"] = json.dumps({k: {a: _plain(v) for a, v in t.items()} for k, t in ordered})
    f.attrs["num_samples"] = len(valid)
    f.attrs["num_valid"] = int(valid.sum())
    f.attrs["complete"] = True


# File names that are not valid UTF-8 reach Python as lone surrogates (PEP 383); they are stored as the bytes
# they have on disk and read back with the same error handler, so every path in a cache opens the file it names.
PATH_ERRORS = "surrogateescape"


def _encoded(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([t.encode("utf-8", PATH_ERRORS) for t in texts], dtype=object)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attr(value: Any) -> Any:
    """HDF5 attrs hold scalars and strings; structures go in as JSON text (readable with h5dump -A)."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


# ------------------------------------------------------------------------------------------- reading


def _unreadable(path: Path, what: str, exc: OSError) -> FeaturecacheError:
    """One line for a read that failed: a checksum (fletcher32) mismatch is corruption, the rest an I/O error."""
    if "filter returned failure" in str(exc) or "checksum" in str(exc).lower():
        return FeaturecacheError(
            f"the cache {path} is corrupt (checksum mismatch in {what}); delete it and re-run extract"
        )
    return FeaturecacheError(f"cannot read {what} of the cache {path} ({exc}); delete it and re-run extract")


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn an h5py read failure inside the block into one clear line naming the file and the dataset."""
    try:
        yield
    except OSError as exc:
        raise _unreadable(path, what, exc) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The root attrs of a cache file, JSON fields decoded. Raises if it is not a complete featurecache file.

    Tap keys become folder names under ``models/``, so a key that is not a plain name is refused here, before
    any stage can use it.
    """
    import h5py

    from featurecache.config import check_path_name

    path = Path(path)
    if not path.is_file():
        raise FeaturecacheError(f"no feature cache at {path}; run `featurecache extract` (or `make extract`) first")
    try:
        with h5py.File(path, "r") as f:
            meta = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise FeaturecacheError(f"{path} is not a readable HDF5 file ({exc}); delete it and re-extract") from exc
    if meta.get("schema_version") != SCHEMA_VERSION or not meta.get("complete"):
        raise FeaturecacheError(
            f"{path} is not a complete featurecache v{SCHEMA_VERSION} cache (schema {meta.get('schema_version')}); "
            f"delete it and re-extract"
        )
    if not isinstance(meta.get("taps"), dict):
        raise FeaturecacheError(f"{path} has no readable list of layers (attrs 'taps'); delete it and re-extract")
    for key in meta["taps"]:
        check_path_name(key, what=f"layer key in {path}")
    return meta


def is_imagenet_logits(tap: dict[str, Any]) -> bool:
    """Whether a cached tap (its attrs in a cache's ``taps``) is the base's ImageNet classifier output rather
    than a stage: compare-layers caches it to measure the distance from ImageNet, and heads, scores and
    multi-tap heads leave it out unless it is asked for by name.

    Extraction records it (``imagenet_logits``, however the layer was named: ``logits``, ``fc``, ``_fc``). In a
    cache written before, the logits are the tap after every conv and linear op (relative depth 1.0) with one
    value per ImageNet class; a headless base's last stage has depth 1.0 too, but not 1000 values. (An older
    cache of a base whose classifier is not ImageNet-1k, timm's in21k ones, reads as having no logits.)
    """
    if "imagenet_logits" in tap:
        return bool(tap["imagenet_logits"])
    return float(tap["relative_depth"]) >= 1.0 and int(tap["out_dim"]) == IMAGENET_CLASSES


def imagenet_logits_key(meta: dict[str, Any]) -> str | None:
    """The key of a cache's ImageNet-logits tap (:func:`is_imagenet_logits`); None if it has none."""
    return next((key for key, tap in meta["taps"].items() if is_imagenet_logits(tap)), None)


def _pick_layer(meta: dict[str, Any], layer: str | None, path: Path) -> str:
    taps: dict[str, Any] = meta["taps"]
    if layer is None:
        if len(taps) == 1:
            return next(iter(taps))
        raise FeaturecacheError(f"{path} holds {len(taps)} layers; pass layer= one of: {', '.join(taps)}")
    if layer in taps:
        return layer
    by_node = [k for k, t in taps.items() if layer in (t.get("node"), t.get("query"))]
    if len(by_node) == 1:
        return by_node[0]
    raise FeaturecacheError(
        f"layer {layer!r} is not in {path}; cached layers: {', '.join(taps)}. "
        f"Extract it with `featurecache extract --layers {layer} ...` (cached layers are kept)."
    )


def load_features(
    path: str | os.PathLike, layer: str | None = None, *, include_invalid: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load one layer of a cache as ``(X, y, metadata)`` numpy arrays.

    Args:
        path: a cache file (``data/features/<dataset>/<base>/<split>.h5``).
        layer: tap key or node name; may be omitted when the file holds one layer.
        include_invalid: keep the zero rows of unreadable images (default: drop them).

    ``metadata`` is the file's attrs plus ``layer``, ``paths`` (of the returned rows) and ``tap`` info.
    A checksum mismatch raises a FeaturecacheError naming the file and the layer.
    """
    import h5py

    path = Path(path)
    meta = read_metadata(path)
    key = _pick_layer(meta, layer, path)
    with h5py.File(path, "r") as f:
        with _reading(path, f"layer {key}"):
            X = f["features"][key][:]
        with _reading(path, "labels, paths and validity"):
            y = f["labels"][:]
            paths = f["paths"].asstr(errors=PATH_ERRORS)[:]
            valid = f["valid"][:]
    if not include_invalid:
        X, y, paths = X[valid], y[valid], paths[valid]
    meta = {**meta, "layer": key, "tap": meta["taps"][key], "paths": paths}
    return X, y, meta


def read_paths(path: str | os.PathLike) -> list[str]:
    """The relative image paths of every row of a cache (valid or not), without reading features."""
    import h5py

    read_metadata(path)
    with h5py.File(path, "r") as f, _reading(Path(path), "paths"):
        return list(f["paths"].asstr(errors=PATH_ERRORS)[:])


def read_skipped(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """``(row, path, reason)`` of every file the extraction could not decode."""
    import h5py

    read_metadata(path)
    with h5py.File(path, "r") as f, _reading(Path(path), "the skipped-file list"):
        return list(
            zip(
                f["skipped/row"][:].tolist(),
                f["skipped/path"].asstr(errors=PATH_ERRORS)[:],
                f["skipped/reason"].asstr(errors=PATH_ERRORS)[:],
                strict=True,
            )
        )


def read_rows(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(labels, paths, valid)`` of every row of a cache, without reading features."""
    import h5py

    read_metadata(path)
    with h5py.File(path, "r") as f:
        return f["labels"][:], list(f["paths"].asstr(errors=PATH_ERRORS)[:]), f["valid"][:].astype(bool)


def iter_feature_chunks(
    path: str | os.PathLike, layer: str | None = None, *, rows_per_chunk: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(X_chunk, y_chunk)`` over one layer without loading it whole (invalid rows dropped).

    Chunks are aligned to the file's HDF5 chunks, so each block is read and decompressed once.
    """
    import h5py

    path = Path(path)
    meta = read_metadata(path)
    key = _pick_layer(meta, layer, path)
    with h5py.File(path, "r") as f:
        dset = f["features"][key]
        step = rows_per_chunk or max(dset.chunks[0], (8 << 20) // max(1, dset.dtype.itemsize * dset.shape[1]))
        step = max(dset.chunks[0], step - step % dset.chunks[0])
        for start in range(0, dset.shape[0], step):
            stop = min(start + step, dset.shape[0])
            with _reading(path, f"layer {key}"):
                valid = f["valid"][start:stop]
                chunk = dset[start:stop][valid], f["labels"][start:stop][valid]
            yield chunk


def identical_row_groups(path: str | os.PathLike, layer: str | None = None) -> tuple[int, list[list[int]]]:
    """Valid rows of one layer (default: the narrowest, the cheapest to read) that hold exactly the same features.

    Returns ``(valid rows, groups)``: each group lists the row numbers of one repeated feature vector, largest
    group first. Identical features mean identical decoded inputs (a dataset collapsed by its decoding, or
    duplicated files); a cheap check, one hash per row.
    """
    import hashlib

    import h5py

    path = Path(path)
    meta = read_metadata(path)
    key = layer if layer is not None else min(meta["taps"], key=lambda k: meta["taps"][k]["out_dim"])
    by_digest: dict[bytes, list[int]] = {}
    with h5py.File(path, "r") as f, _reading(path, f"layer {key}"):
        dset, valid = f["features"][key], f["valid"][:]
        step = max(1, (8 << 20) // max(1, dset.dtype.itemsize * dset.shape[1]))
        for start in range(0, dset.shape[0], step):
            block = np.ascontiguousarray(dset[start : start + step])
            for i, row in enumerate(block, start):
                if valid[i]:
                    by_digest.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), []).append(i)
    groups = sorted((rows for rows in by_digest.values() if len(rows) > 1), key=lambda g: (-len(g), g[0]))
    return int(valid.sum()), groups


@dataclass(frozen=True)
class DatasetCheck:
    """The outcome of reading one HDF5 dataset of a cache through its checksums."""

    name: str
    ok: bool
    error: str = ""


def verify_cache(path: str | os.PathLike) -> list[DatasetCheck]:
    """Read every dataset of a cache in full, block by block, so each fletcher32 checksum is checked.

    Returns one :class:`DatasetCheck` per dataset (features, labels, paths, ...); a file that cannot be opened
    as a complete cache raises a FeaturecacheError instead.
    """
    import h5py

    path = Path(path)
    read_metadata(path)
    names: list[str] = []
    checks = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            dset = f[name]
            try:
                if dset.ndim == 0:
                    dset[()]
                step = 16 * (dset.chunks[0] if dset.chunks else 4096)  # whole chunks, a few MiB at a time
                for start in range(0, dset.shape[0] if dset.ndim else 0, step):
                    dset[start : start + step]
            except OSError as exc:
                checks.append(DatasetCheck(name, False, str(_unreadable(path, name, exc))))
                continue
            checks.append(DatasetCheck(name, True))
    return checks
