"""make bench, gpu: stage 1 on a CUDA device (issue #14, part 3), skipped where there is none.

resnet50 with random-init weights (speed needs no pretrained ones), eager PyTorch with bf16 autocast (the CUDA
default), ImageNet-sized JPEGs. Three children, each a fresh process (``benchmarks.extraction``'s protocol),
a warm-up round, then ``rounds`` rounds in a seeded shuffled order, medians:

  split       one ``extract`` of the train split, decoded by PIL in DataLoader worker processes (the default)
  split-gpu   the same with ``--decode gpu`` (nvjpeg, resized on the device)
  bare        the bare forward: uint8 images already on the device, normalized and run batch by batch

and reports end-to-end ÷ bare forward (goal >= 0.9) and the img/s of each. Run it alone with
``FEATURECACHE_HOME=<tmp> python -m benchmarks.bench --only gpu``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.extraction import HEAVY, _child, make_photos

GPU_IMAGES = 4096  # a GPU runs resnet50 at thousands of img/s: fewer images would time the one-off costs
GPU_BARE_IMAGES = 1024
GPU_PHOTO_SIZE = (500, 375)  # ImageNet's typical photo
GPU_BATCH = 256


def gpu_jobs(work: Path, *, device: str = "cuda", images: int = GPU_IMAGES) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every child of one round, by name: (mode, flags)."""
    root = make_photos(work / "gpu-photos", images, size=GPU_PHOTO_SIZE, grid=(30, 40))
    flags = {"root": root, "work": work / "home", **HEAVY, "runtime": "eager", "device": device,
             "batch-size": GPU_BATCH}  # fmt: skip
    return {
        "split": ("split", flags),
        "split-gpu": ("split", {**flags, "decode": "gpu"}),
        "bare": ("bare", {**flags, "images": min(images, GPU_BARE_IMAGES)}),
    }


def bench_gpu(work: Path, report: Callable[..., None], rounds: int = 3) -> dict[str, Any] | None:
    """The GPU figures, or None (said on one line) where CUDA is not available."""
    import torch

    if not torch.cuda.is_available():
        print("[    ] gpu        skipped: no CUDA device here (the CPU figures stand on their own)", flush=True)
        return None
    jobs = gpu_jobs(work)
    for key in jobs:  # warm-up: cuDNN's autotuning, the page cache
        _child(*jobs[key])
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in jobs}
    for r in range(rounds):
        order = list(jobs)
        random.Random(r).shuffle(order)
        for key in order:
            runs[key].append(_child(*jobs[key]))
    median = {key: {field: float(np.median([r[field] for r in rs])) for field in rs[0] if field != "runtime"}
              for key, rs in runs.items()}  # fmt: skip
    bare = median["bare"]["img_s"]
    name = f"{HEAVY['base']} (random init), {torch.cuda.get_device_name()}, batch {GPU_BATCH}, bf16 autocast"
    report("gpu", "bare forward img/s", bare, "report", None, name)
    photos = f"{GPU_IMAGES} JPEGs {GPU_PHOTO_SIZE[0]}x{GPU_PHOTO_SIZE[1]}"
    for key, decode in (("split", "PIL decode"), ("split-gpu", "--decode gpu")):
        whole, loop = median[key]["whole"], median[key]["loop"]
        report("gpu", f"end-to-end / bare forward ({decode})", whole / bare, ">= 0.9", whole / bare >= 0.9,
               f"{whole:.0f} vs {bare:.0f} img/s, whole split of {photos}: start-up, planning, loop, HDF5")  # fmt: skip
        report("gpu", f"forward loop alone / bare forward ({decode})", loop / bare, "report", None,
               f"{loop:.0f} img/s: decoding beside the forward, journal on a writer thread")  # fmt: skip
    return median
