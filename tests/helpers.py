"""Tiny generated image datasets for tests: deterministic, a few KiB, mixed sizes and colour modes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "stripes")


def draw(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.35, 0.65, 2)
    if kind == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(0.04, 0.09)
    elif kind == "square":
        mask = (abs(xx - cx) < 0.25) & (abs(yy - cy) < 0.25)
    else:
        mask = np.sin(xx * rng.uniform(20, 30)) > 0
    img = rng.uniform(0, 60, (size, size, 3))
    img[mask] += np.array([180, 120, 60]) * rng.uniform(0.8, 1.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path, *, per_class: dict[str, int] | None = None, seed: int = 0, splits: bool = True
) -> Path:
    """Write ROOT/{train,val,test}/<class>/<i>.{png,jpg} (or ROOT/<class>/... with splits=False)."""
    per_class = per_class or {"train": 6, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c, kind in enumerate(CLASSES):
            folder = root / split / kind if splits else root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = int(rng.choice([24, 48, 64, 100]))
                arr = draw(kind, size, rng)
                mode = ("RGB", "L", "P")[(i + c) % 3]
                image = Image.fromarray(arr).convert(mode)
                name = f"{split}_{i:03d}"
                if mode == "RGB" and i % 2:
                    image.save(folder / f"{name}.jpg", quality=90)
                else:
                    image.save(folder / f"{name}.png")
    return root


def add_bad_files(class_dir: Path) -> list[str]:
    """Put one of each kind of unreadable file into a class folder; returns their names."""
    good = next(p for p in sorted(class_dir.iterdir()) if p.suffix == ".png")
    (class_dir / "zero.jpg").write_bytes(b"")
    (class_dir / "notes.dat").write_text("not an image, under a name that does not say so")
    jpeg = class_dir / "truncated.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    (class_dir / "corrupt.png").write_bytes(good.read_bytes()[:40] + b"\x00garbage" * 20)
    return ["zero.jpg", "notes.dat", "truncated.jpg", "corrupt.png"]


SAFETY_TIMEOUT_S = 600.0  # only a net under a hung subprocess: no outcome depends on it


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, *, what: str) -> bool:
    """Poll ``condition`` until it holds (True) or ``process`` exits (False); progress, not time, decides.

    A subprocess that neither exits nor makes progress for :data:`SAFETY_TIMEOUT_S` fails the test loudly.
    """
    started = time.monotonic()
    while process.poll() is None:
        if condition():
            return True
        if time.monotonic() - started > SAFETY_TIMEOUT_S:
            process.kill()
            raise AssertionError(f"gave up waiting for {what}: no progress in {SAFETY_TIMEOUT_S:.0f} s")
        time.sleep(0.005)  # a polling interval; the outcome never depends on it
    return False
