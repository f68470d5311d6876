"""Train-split augmentation, shared by fine-tuning (on the fly) and cached augmented views (extracted once).

Both end in the base's own normalization, so an augmented image goes through the same preprocessing contract
as the plain ones; only the geometry and colour change.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from featurecache.errors import FeaturecacheError

# light: crop + small rotation/colour (safe for digits and text: no flips); standard adds flips; none: off.
AUGMENTATIONS = ("light", "standard", "none")


def _normalization(transform: Any) -> Any:
    """The Normalize step of a base's preprocessing (Compose of v1 transforms, or a torchvision preset)."""
    from torchvision import transforms as T

    for t in getattr(transform, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    if hasattr(transform, "mean") and hasattr(transform, "std"):
        return T.Normalize(mean=transform.mean, std=transform.std)
    raise FeaturecacheError(f"cannot find the normalization in {transform!r}; augmentation needs it")


def train_transform(base_transform: Any, input_size: int, augment: str) -> Any:
    """Random augmentation for the train split, ending in the base's own normalization."""
    from torchvision import transforms as T

    if augment not in AUGMENTATIONS:
        raise FeaturecacheError(f"unknown augmentation {augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return base_transform
    ops = [T.RandomResizedCrop(input_size, scale=(0.6 if augment == "standard" else 0.8, 1.0))]
    if augment == "standard":
        ops.append(T.RandomHorizontalFlip())
    ops += [T.RandomRotation(10 if augment == "standard" else 5), T.ColorJitter(0.2, 0.2, 0.2)]
    return T.Compose([*ops, T.ToTensor(), _normalization(base_transform)])


def row_seed(seed: int, row: int) -> int:
    """A seed for one row of an augmented split, independent of batching, workers and ranks."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_GLOBAL_RNG = threading.Lock()  # torch's global generator, which SeededPerRow seeds and restores


class SeededPerRow:
    """Apply a random ``transform`` with torch's RNG seeded from ``(seed, row)``; the caller's RNG is untouched.

    torchvision's v1 transforms draw from torch's global generator, so forking and seeding it around each call
    makes view ``v`` of image ``i`` the same pixels in every run, resumed or distributed. The generator is one per
    process, so decode threads (extraction's CPU default) take turns: a lock spans seed, transform and restore.
    """

    per_row = True  # ImageFiles passes the row index

    def __init__(self, transform: Any, seed: int) -> None:
        self.transform = transform
        self.seed = seed

    def __call__(self, image: Any, row: int) -> Any:
        import torch

        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(row_seed(self.seed, row))
            return self.transform(image)

    def __repr__(self) -> str:
        return f"SeededPerRow(seed={self.seed}, {self.transform!r})"
