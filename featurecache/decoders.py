"""How stage 1 decodes its batches beside the forward pass: decode threads, lanes that decode their own batch, or
DataLoader worker processes. Every decoder runs the same per-image function (``featurecache.data.ImageFiles``), so
they give the same pixels bit for bit; they differ in which threads do the work, measured on the 2-core VM."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurecache.data import ImageFiles


def default_workers(device: str) -> int:
    """Decode threads (CPU) or worker processes (CUDA) when ``--workers`` is left out."""
    cpus = os.cpu_count() or 1
    # On the CPU the model itself wants the cores; one decoder (a thread by default) overlaps I/O with compute.
    return min(8, cpus) if device.startswith("cuda") else min(2, max(1, cpus // 2))


def batches(
    data: ImageFiles, todo: Sequence[tuple[int, int]], *, device: str, lanes: int, workers: int | None
) -> Iterable[Any]:
    """``(uint8 images, rows, errors)`` batches of the row ranges ``todo`` of ``data``. On the CPU by default:
    decoded by the lanes that run them when the runtime has ``lanes`` (:class:`LaneBatches`), else by decode threads
    (:class:`DecodeThreads`); with ``workers`` (``--workers``) or on CUDA, by DataLoader worker processes (0: this
    thread)."""
    from torch.utils.data import DataLoader

    if workers is None and not device.startswith("cuda"):
        if lanes > 1:
            return LaneBatches(data, todo)
        return DecodeThreads(data, todo, threads=default_workers(device))
    workers = workers if workers is not None else default_workers(device)
    return DataLoader(
        data,
        batch_sampler=[list(range(start, stop)) for start, stop in todo],
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        collate_fn=collate_encoded if data.encoded else None,
    )


class DecodeThreads:
    """The CPU default for a runtime without lanes (eager PyTorch, OpenVINO: one batch on every thread): batches
    decoded by ``threads`` threads of this process, up to ``ahead`` batches per thread in flight, yielded in order,
    collated as a DataLoader does.

    PIL releases the GIL while it decodes and resizes, so a thread overlaps the forward pass as a worker process
    does, without a process to start or pixels to pass through shared memory: measured on the 2-core VM (Lite0,
    640 JPEGs, fresh processes, 3 alternating rounds), the forward loop ran 166-169 vs 157-162 img/s with one worker
    process (+4-7% round by round). The same per-image function as the workers, so the same pixels bit for bit.
    Seeded augmentations share torch's global generator across threads and take turns on it
    (``featurecache.augment.SeededPerRow``).
    """

    def __init__(self, data: ImageFiles, todo: Sequence[tuple[int, int]], *, threads: int, ahead: int = 4) -> None:
        self.data, self.todo, self.threads, self.ahead = data, list(todo), threads, ahead

    def __iter__(self) -> Iterator[Any]:
        batches = in_order(lambda _i, rows: decode_batch(self.data, rows), self.todo, threads=self.threads,
                            in_flight=self.threads * self.ahead, name="featurecache-decode")  # fmt: skip
        try:
            for _rows, batch in batches:
                yield batch
        finally:
            batches.close()  # stops the decode threads now, not when the generator is collected


@dataclass(frozen=True)
class Deferred:
    """A batch not decoded yet: the extraction's runner decodes it on the thread that runs it (``forward_batches``)."""

    rows: tuple[int, int]
    data: ImageFiles

    def load(self) -> tuple[Any, Any, list[str]]:
        return decode_batch(self.data, self.rows)


def loaded(item: tuple | Deferred) -> tuple:
    return item.load() if isinstance(item, Deferred) else item


class LaneBatches:
    """The CPU default under a runtime with lanes (ONNX Runtime): each lane decodes the batch it then runs.

    With a decode thread beside two lanes, three threads shared two cores and the decoder's pixels went cold
    before a lane read them; a lane that decodes its own batch (PIL releases the GIL) while the other runs the
    graph keeps two threads on two cores. Measured on the 2-core VM (Lite0, 640 JPEGs, one process, 4
    alternating rounds): 178-181 vs 165-174 img/s for a decode thread, the bare forward 205-212. The same
    per-image function as every decoder, so the same pixels bit for bit.
    """

    def __init__(self, data: ImageFiles, todo: Sequence[tuple[int, int]]) -> None:
        self.data, self.todo = data, list(todo)

    def __iter__(self) -> Iterator[Deferred]:
        return (Deferred(rows, self.data) for rows in self.todo)


def decode_batch(data: ImageFiles, rows: tuple[int, int]) -> tuple[Any, Any, list[str]]:
    """DataLoader's collation of the ``(image, row, error)`` items of ``rows``, stacked in numpy on this thread:
    torch's copy kernels would wake its intra-op threads, on the cores the forward pass is using."""
    import torch

    items = [data[i] for i in range(*rows)]
    if data.encoded:
        return collate_encoded(items)
    images, indices, errors = zip(*items, strict=True)
    stacked = torch.from_numpy(np.stack([image.numpy() for image in images]))
    return stacked, torch.tensor(indices), list(errors)


def collate_encoded(items: Sequence[tuple[Any, int, str]]) -> tuple[list[Any], Any, list[str]]:
    """``(encoded images, rows, errors)`` under ``--decode gpu``: the images stay a list (JPEG bytes of any length,
    decoded later on the device by :func:`featurecache.gpu_decode.decode_batch`)."""
    import torch

    images, indices, errors = zip(*items, strict=True)
    return list(images), torch.tensor(indices), list(errors)


def in_order(
    fn: Callable[[int, Any], Any], items: Iterable[Any], *, threads: int, in_flight: int, name: str
) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(i, item))`` for each item, computed on ``threads`` threads with at most ``in_flight`` items
    submitted and not yet yielded, in the items' order. When the consumer stops early (an error, ``--on-bad-image
    fail``) the queued calls are cancelled and the running ones awaited: no thread works on after the loop."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    pending: collections.deque = collections.deque()
    try:
        for i, item in enumerate(items):
            if len(pending) == in_flight:
                done, future = pending.popleft()
                yield done, future.result()
            pending.append((item, pool.submit(fn, i, item)))
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
