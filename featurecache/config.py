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

    def head_dir(self, dataset: str, base_tag: str, layer: str, head: str) -> Path:
        """A saved head: ``models/<dataset>/<base_tag>/<layer>/<head>/`` (model files + sidecar)."""
        return self.models / dataset / base_tag / layer / head

    def head_dirs(self, dataset: str, base_tag: str = "*", *, layer: str = "*", head: str = "*") -> list[Path]:
        """The saved-head folders of a dataset that match (fnmatch patterns), sorted; complete or not."""
        return sorted(p for p in (self.models / dataset).glob(f"{base_tag}/{layer}/{head}") if p.is_dir())

    def leaderboard_dir(self, dataset: str) -> Path:
        """``reports/<dataset>/``: the stage-2 leaderboard (results.csv/md, best.json)."""
        return self.reports / dataset

    def leaderboard_file(self, dataset: str, suffix: str) -> Path:
        """The leaderboard of every saved head: ``reports/<dataset>/results.csv`` or ``results.md``."""
        return self.leaderboard_dir(dataset) / f"results{suffix}"

    def best_file(self, dataset: str) -> Path:
        """``reports/<dataset>/best.json``: the head the selection rule picks."""
        return self.leaderboard_dir(dataset) / "best.json"

    def bench_dir(self) -> Path:
        """Where ``make bench`` writes its results.json."""
        return self.reports / "bench"

    def compare_dir(self, dataset: str | None = None) -> Path:
        """``reports/compare/`` (the cross-dataset page) or ``reports/compare/<dataset>/`` (one dataset's answer)."""
        return self.reports / "compare" if dataset is None else self.reports / "compare" / dataset

    def find(self, given: str | os.PathLike) -> Path:
        """A path a user typed: as given when it exists (or is absolute), else below the home when it is there, so
        that the README's ``data/features/...`` and ``models/...`` work from any folder; else as given."""
        given = Path(given)
        below = self.root / given
        return below if not given.is_absolute() and not given.exists() and below.exists() else given

    def compare_report(self, dataset: str | None = None, suffix: str = ".html") -> Path:
        """``report.html`` or ``report.md`` of one dataset's answer, or of the cross-dataset page (``dataset=None``)."""
        return self.compare_dir(dataset) / f"report{suffix}"


def default_paths() -> Paths:
    """Paths below ``$FEATURECACHE_HOME``, or below the current directory."""
    return Paths(Path(os.environ.get("FEATURECACHE_HOME", ".")).resolve())


def check_path_name(name: str, *, what: str = "name") -> str:
    """Refuse a name that would not stay one folder or file below the project folders; return it unchanged.

    Dataset names, base tags, layer (tap) keys and head names become path components under ``data/features``
    and ``models``: a ``/``, a ``..`` or a leading ``.`` could write outside them or hide files, and a name
    that is not valid UTF-8 cannot be recorded in the caches' attrs.

    Args:
        name: the name to check.
        what: what the name is, for the message ("dataset name", "layer key in <file>", ...).
    """
    problem = None
    if not name or name in (".", ".."):
        problem = "is empty or a relative folder"
    elif any(sep in name for sep in ("/", "\\", "\0")):
        problem = "contains a path separator or NUL"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif any(0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        problem = "is not valid UTF-8"
    elif len(name.encode()) > 255:
        problem = "is longer than a file name may be (255 bytes)"
    if problem is not None:
        from featurecache.errors import FeaturecacheError

        raise FeaturecacheError(
            f"{what} {name!r} {problem}, so it cannot be used as a folder name below the project; rename it (or "
            f"pass --dataset NAME) using letters, digits and -_.+@ only"
        )
    return name
