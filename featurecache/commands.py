"""The ``featurecache extract`` commands that messages tell a user to run, with the options their caches record.

A hint that adds a layer to a cache, or makes a split it lacks, must repeat every option that enters the cache
fingerprint (weights, ``--dtype``, ``--runtime``, ``--decode``, ``--alpha``, ...). A command that differs in one of
them does not add to the cache: it makes the whole split again. So the command is read off the cache itself.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featurecache import store
from featurecache.config import Paths
from featurecache.data import DEFAULT_ALPHA, DEFAULT_DECODE, DEFAULT_ORIENTATION, SPLITS, Decoding
from featurecache.errors import FeaturecacheError
from featurecache.weights import WeightsRef, base_of_tag, is_random_tag


def extract_command(
    dataset: str, base_tag: str, *extra: str, paths: Paths | None = None, meta: Mapping[str, Any] | None = None
) -> str:
    """``featurecache extract`` for ``dataset`` x ``base_tag``, plus ``extra`` arguments (``--layers X``): the
    folder and options its caches record (``meta``: one cache's metadata, else read from ``paths``), else the
    folder featurecache knows for the dataset, else a placeholder."""
    if meta is None and paths is not None:
        meta = _any_cache_meta(dataset, base_tag, paths)
    folder = meta.get("dataset_root") if meta else None
    folder = folder or (_known_folder(dataset, paths) if paths is not None else f"path/to/{dataset}")
    flags = cache_flags(meta, base_tag) if meta else _flags_of_tag(base_tag)
    named = [] if Path(folder).name == dataset else ["--dataset", dataset]
    return shlex.join(["featurecache", "extract", folder, *flags, *named, *extra])


def cache_flags(meta: Mapping[str, Any], base_tag: str) -> list[str]:
    """The ``extract`` options that reproduce a cache's fingerprint (beyond its images and layers), from its
    metadata; options at the value their default gives are left out, except the runtime, whose default depends on
    the device and on what is installed."""
    weights = WeightsRef.parse(str(meta.get("weights", "")))
    flags = ["--base", str(meta.get("base") or base_of_tag(base_tag))]
    if weights.is_random:
        flags += ["--weights", "none"] + (["--seed", str(weights.seed)] if weights.seed else [])
    elif weights.is_file:
        flags += ["--weights-file", f"PATH/TO/{weights.name}"]
    elif base_tag != flags[1]:
        flags += ["--weights", base_tag.removeprefix(f"{flags[1]}-")]
    if meta.get("dtype") not in (None, store.storage_dtype("auto", random_init=weights.is_random)):
        flags += ["--dtype", str(meta["dtype"])]
    flags += ["--runtime", str(meta.get("runtime", "eager"))]
    if meta.get("precision", "f32") != "f32":
        flags += ["--precision", str(meta["precision"])]
    if meta.get("amp") == "fp16":  # bf16 is what auto gives on CUDA, off what it gives on the CPU
        flags += ["--amp", "fp16"]
    decoding = Decoding.recorded(meta)
    if decoding.decode != DEFAULT_DECODE:
        flags += ["--decode", decoding.decode]
    if meta.get("alpha") not in (None, DEFAULT_ALPHA):
        flags += ["--alpha", str(meta["alpha"])]
    if decoding.orientation != DEFAULT_ORIENTATION:
        flags += ["--orientation", decoding.orientation]
    if str(meta.get("data_fingerprint", "")).startswith("stat:"):
        flags += ["--fingerprint", "stat"]
    return flags


def _any_cache_meta(dataset: str, base_tag: str, paths: Paths) -> dict[str, Any] | None:
    for split in SPLITS:
        try:
            return store.read_metadata(paths.feature_file(dataset, base_tag, split))
        except (FeaturecacheError, OSError):
            continue
    return None


def _flags_of_tag(base_tag: str) -> list[str]:
    return ["--base", base_of_tag(base_tag)] + (["--weights", "none"] if is_random_tag(base_tag) else [])


def _known_folder(dataset: str, paths: Paths) -> str:
    """A built-in dataset's folder, or the folder a recorded split was drawn from, else a placeholder."""
    if (paths.raw / dataset).is_dir():
        return str(paths.raw / dataset)
    try:
        root = json.loads(paths.split_record(dataset).read_text()).get("root")
    except (OSError, ValueError, AttributeError):
        root = None
    return root if isinstance(root, str) else f"path/to/{dataset}"
