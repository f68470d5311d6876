"""Where things live on disk: the one place that knows the project's folder layout.

Data flows one way: ``data/raw`` (never modified) -> ``data/features`` (HDF5 caches) -> ``models`` ->
``reports``. Everything is relative to ``FEATURECACHE_HOME`` (default: the current directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """The project's folders, all below one root."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # accept str and any os.PathLike

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def external(self) -> Path:
        """Third-party sources as downloaded (registry packages unpacked); never modified after unpacking."""
        return self.root / "data" / "external"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def feature_file(self, dataset: str, base_tag: str, split: str) -> Path:
        """The cache of one dataset x base x split: ``data/features/<dataset>/<base_tag>/<split>.h5``."""
        return self.features / dataset / base_tag / f"{split}.h5"

    def export_file(self, dataset: str, base_tag: str, digest: str) -> Path:
        """An exported extractor graph (``featurecache.runtime``), beside the features it computes."""
        return self.features / dataset / base_tag / "exports" / f"{digest}.onnx"

    def split_record(self, dataset: str) -> Path:
        """Where a split made by featurecache (for a folder without val/test) is recorded."""
        return self.features / dataset / "splits.json"


def default_paths() -> Paths:
    """Paths below ``$FEATURECACHE_HOME``, or below the current directory."""
    return Paths(Path(os.environ.get("FEATURECACHE_HOME", ".")).resolve())
