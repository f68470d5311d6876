"""Weight identity: which weights a base ran with, as a value instead of a string parsed back by hand.

Caches, sidecars and export identities record a base's weights as one string (``weights_id``). Three forms
exist, and :class:`WeightsRef` reads and writes each of them exactly:

- ``random-init(seed=0)``: the architecture's own random initialisation under a seed (the control);
- ``file:<name>:sha256=<hex>``: a state dict passed with ``--weights-file`` (its name and digest prefix);
- anything else: the identity a base's loader reports for packaged or cached pretrained weights
  (``torchvision:ResNet18_Weights.IMAGENET1K_V1``, ``timm:...``, ``offline:...``; ``none`` for raw pixels).

The base tag (the cache folder under ``data/features/<dataset>/``) is the base name, ``<base>-random`` for the
random-init control, or ``<base>-<variant>`` for a non-default pretrained variant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import file_sha256

WEIGHTS_DEFAULT = "default"  # the base's pretrained ImageNet weights
WEIGHTS_NONE = "none"  # random init: for tests, and the "is pretraining worth it?" control
RANDOM_INIT_PREFIX = "random-init"  # weights_id of random-init weights: "random-init(seed=0)"
RANDOM_TAG_SUFFIX = "-random"  # the random-init control of a base is cached and trained under "<base>-random"
PIXELS_TAG = "raw-pixels"  # the raw-pixel baseline (featurecache.baselines) is saved under this base tag
FILE_DIGEST_LENGTH = 12  # hex digits of a weights file's sha256 kept in its identity

_RANDOM = re.compile(rf"{RANDOM_INIT_PREFIX}\(seed=(-?\d+)\)")
_FILE = re.compile(r"file:(?P<name>.*):sha256=(?P<sha>[0-9a-f]+)")


@dataclass(frozen=True)
class WeightsRef:
    """The identity of a base's weights; ``str()`` gives the recorded string, :meth:`parse` reads it back."""

    kind: str  # "pretrained", "random" or "file"
    name: str = ""  # pretrained: the loader's identity; file: the file's name (no folder)
    seed: int | None = None  # random: the torch seed of the initialisation
    file_sha256: str | None = None  # file: the first FILE_DIGEST_LENGTH hex digits of its sha256

    @classmethod
    def random_init(cls, seed: int) -> WeightsRef:
        return cls("random", seed=int(seed))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WeightsRef:
        """The identity of a weights file: its name and the start of its sha256 (reads the file)."""
        path = Path(path)
        return cls("file", name=path.name, file_sha256=file_sha256(path, length=FILE_DIGEST_LENGTH))

    @classmethod
    def pretrained(cls, identity: str) -> WeightsRef:
        return cls("pretrained", name=identity)

    @classmethod
    def parse(cls, text: str) -> WeightsRef:
        """Read a recorded weights string (any form; unknown forms are a loader's pretrained identity)."""
        if match := _RANDOM.fullmatch(text):
            return cls.random_init(int(match.group(1)))
        if match := _FILE.fullmatch(text):
            return cls("file", name=match.group("name"), file_sha256=match.group("sha"))
        return cls.pretrained(text)

    def __str__(self) -> str:
        if self.kind == "random":
            return f"{RANDOM_INIT_PREFIX}(seed={self.seed})"
        if self.kind == "file":
            return f"file:{self.name}:sha256={self.file_sha256}"
        return self.name

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def base_tag(self, base: str, variant: str | None = None) -> str:
        """The cache folder of ``base`` with these weights; ``variant``: a non-default pretrained variant."""
        if self.is_random:
            return random_tag(base)
        return f"{base}-{variant}" if variant and not self.is_file else base

    def load_kwargs(self, *, base: str, base_tag: str, weights_file: str | os.PathLike | None = None) -> dict[str, Any]:
        """The ``load_base(base, **kwargs)`` arguments that rebuild these weights for a head cached under
        ``base_tag`` (the caller checks the rebuilt identity against this one)."""
        if self.is_random:
            return {"weights": WEIGHTS_NONE, "seed": self.seed}
        if self.is_file:
            if weights_file is None:
                raise FeaturecacheError(
                    f"this head's base was loaded from a weights file ({self}); pass the same --weights-file"
                )
            return {"weights_file": weights_file}
        variant = base_tag.removeprefix(f"{base}-") if base_tag != base else WEIGHTS_DEFAULT
        return {"weights": variant}


def random_tag(base: str) -> str:
    """The cache folder of ``base``'s random-init control."""
    return f"{base}{RANDOM_TAG_SUFFIX}"


def is_random_tag(base_tag: str) -> bool:
    return base_tag.endswith(RANDOM_TAG_SUFFIX)


def is_control(base_tag: str) -> bool:
    """A control's base tag: a random-init base or the raw-pixel baseline. Controls are measured against, never
    recommended (the leaderboard's best, the comparison's answer)."""
    return is_random_tag(base_tag) or base_tag == PIXELS_TAG


def base_of_tag(base_tag: str) -> str:
    """The base name of a random-init control's tag (other tags are returned as they are)."""
    return base_tag.removesuffix(RANDOM_TAG_SUFFIX)
