"""The rows a head trains on: in memory when they fit the budget, else streamed from the HDF5 cache in chunks.

:class:`TrainRows` replaces the ``(X, y, n, loaders)`` tuples stage 2 used to pass around: either ``X``/``y``
are arrays, or ``stream`` holds chunk loaders over open HDF5 files (for the heads that can fit from a stream).
:func:`fit_head` fits a head on either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurecache import store
from featurecache.errors import FeaturecacheError

log = logging.getLogger(__name__)

STREAM_CHUNK_BYTES = 64 << 20  # rows read per streamed chunk: about this many bytes of float32
MEMORY_FACTOR = 3  # in-memory rows need: the float32 copy + a standardized copy + solver workspace


@dataclass
class ChunkStream:
    """Chunk loaders over open HDF5 files, for heads with ``fit_stream``; close it when the fits are done."""

    loaders: list[Callable[[], tuple[np.ndarray, np.ndarray]]]
    classes: np.ndarray
    n_features: int
    handles: list[Any] = field(default_factory=list)  # the open h5py files the loaders read from

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


@dataclass
class TrainRows:
    """A head's training rows: ``X``/``y`` in memory, or a :class:`ChunkStream` (then ``X`` and ``y`` are None)."""

    X: np.ndarray | None
    y: np.ndarray | None
    n: int
    stream: ChunkStream | None = None

    @classmethod
    def in_memory(cls, X: np.ndarray, y: np.ndarray) -> TrainRows:
        return cls(X, y, len(y))

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def materialize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` in memory (a streamed split is read whole: only for the train+val refit)."""
        if self.stream is None:
            return self.X, self.y
        parts = [load() for load in self.stream.loaders]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``, else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def load_train_rows(files: Sequence[str], layer: str, spec: Any, *, max_memory_gb: float | None) -> TrainRows:
    """The training rows of ``layer`` from one or more caches (train, plus its augmented views), in memory when
    they fit the budget (``max_memory_gb``; None: half of the memory available now), else streamed for the heads
    that can; other heads are refused with the ways out."""
    metas = [store.read_metadata(f) for f in files]
    n, dim = sum(m["num_valid"] for m in metas), metas[0]["taps"][layer]["out_dim"]
    need = n * dim * 4 * MEMORY_FACTOR
    budget = int((max_memory_gb * 2**30) if max_memory_gb is not None else available_memory() // 2)
    shown = " + ".join(str(f) for f in files)
    if need <= budget:
        parts = [store.load_features(f, layer)[:2] for f in files]
        X = np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False)
        return TrainRows(X, np.concatenate([p[1] for p in parts]), n)
    if not spec.streams:
        raise FeaturecacheError(
            f"layer {layer} of {shown} needs about {need / 2**30:.1f} GiB in memory for head {spec.name!r}, over the "
            f"budget of {budget / 2**30:.1f} GiB. Use a head that streams from the cache (--heads mlp), a pooled "
            f"layer (avg/grid2 instead of raw maps), or raise --max-memory-gb"
        )
    log.info("%s of %s does not fit in %.1f GiB: streaming it in chunks", layer, shown, budget / 2**30)
    stream = ChunkStream([], np.arange(len(metas[0]["class_names"])), dim)
    for f in files:
        stream.loaders += _chunk_loaders(f, layer, dim, stream.handles)
    return TrainRows(None, None, n, stream)


def _chunk_loaders(file: str, layer: str, dim: int, handles: list[Any]) -> list[Callable[[], Any]]:
    """Loaders of ``file``'s valid rows of ``layer`` in whole-chunk steps; the opened file joins ``handles``."""
    import h5py

    handle = h5py.File(file, "r")
    handles.append(handle)
    dset, labels, valid = handle["features"][layer], handle["labels"], handle["valid"]
    step = max(dset.chunks[0], STREAM_CHUNK_BYTES // max(1, 4 * dim))
    step -= step % dset.chunks[0]

    def loader(start: int, stop: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def read() -> tuple[np.ndarray, np.ndarray]:
            keep = valid[start:stop]
            return dset[start:stop][keep].astype(np.float32), labels[start:stop][keep]

        return read

    return [loader(s, min(s + step, dset.shape[0])) for s in range(0, dset.shape[0], step)]


def load_tap_rows(files: Sequence[str], taps: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A multi-tap head's rows: its taps side by side, the rows of every file one after another."""
    rows = []
    for f in files:
        parts = [store.load_features(f, tap)[:2] for tap in taps]
        rows.append((np.concatenate([p[0] for p in parts], axis=1).astype(np.float32), parts[0][1]))
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def fit_head(estimator: Any, rows: TrainRows, *, eval_set: Any, dense: bool, device: str) -> None:
    """Fit a head on in-memory or streamed rows; a dense head gets ``device`` and early-stops on ``eval_set``."""
    if dense:
        estimator.set_params(device=device)
    if rows.stream is not None:
        s = rows.stream
        estimator.fit_stream(s.loaders, classes=s.classes, n_features=s.n_features, eval_set=eval_set)
    elif dense:
        estimator.fit(rows.X, rows.y, eval_set=eval_set)
    else:
        estimator.fit(rows.X, rows.y)
