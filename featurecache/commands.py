"""The ``featurecache extract`` commands that messages tell a user to run, with the options their caches record.

A hint that adds a layer to a cache, or makes a split it lacks, must repeat every option that enters the cache
fingerprint (weights, ``--dtype``, ``--runtime``, ``--decode``, ``--alpha``, ...). A command that differs in one of
them does not add to the cache: it makes the whole split again. So the command is read off the cache itself.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featurecache import store
from featurecache.bases import base_and_variant
from featurecache.config import Paths
from featurecache.data import DEFAULT_ALPHA, DEFAULT_DECODE, DEFAULT_ORIENTATION, SPLITS, Decoding, images_folder
from featurecache.errors import FeaturecacheError
from featurecache.runtime import EXPORTED_RUNTIMES
from featurecache.weights import WEIGHTS_DEFAULT, WeightsRef, base_of_tag, is_random_tag


def extract_command(
    dataset: str, base_tag: str, *extra: str, paths: Paths | None = None, meta: Mapping[str, Any] | None = None
) -> str:
    """``featurecache extract`` for ``dataset`` x ``base_tag``, plus ``extra`` arguments (``--layers X``): the
    folder and options its caches record (``meta``: one cache's metadata, else read from ``paths``), else the
    folder featurecache knows for the dataset, else a placeholder."""
    if meta is None and paths is not None:
        meta = _any_cache_meta(dataset, base_tag, paths)
    recorded = meta.get("dataset_root") if meta else None
    folder = _known_folder(dataset, paths, recorded)
    flags = cache_flags(meta, base_tag) if meta else _flags_of_tag(base_tag)
    # NAME=PATH where the folder's name is not the dataset's, or where its path holds "=" (read as NAME=PATH)
    named = Path(folder).name == dataset and "=" not in folder
    source = folder if named else f"{dataset}={folder}"
    return shlex.join(["featurecache", "extract", source, *flags, *extra])


def cache_flags(meta: Mapping[str, Any], base_tag: str) -> list[str]:
    """The ``extract`` options that reproduce a cache's fingerprint (beyond its images and layers) and its storage,
    from its metadata; options at the value their default gives are left out, except the runtime and autocast,
    whose defaults depend on the device and on what is installed."""
    weights = WeightsRef.parse(str(meta.get("weights", "")))
    base = str(meta.get("base") or base_of_tag(base_tag))
    flags = ["--base", base, *_weights_flags(weights, base, base_tag)]
    if meta.get("dtype") not in (None, store.storage_dtype("auto", random_init=weights.is_random)):
        flags += ["--dtype", str(meta["dtype"])]
    runtime, amp = str(store.recorded(meta, "runtime")), str(store.recorded(meta, "amp"))
    flags += ["--runtime", runtime] + (["--device", "cpu"] if runtime in EXPORTED_RUNTIMES else [])
    if runtime == "eager" or amp != "off":  # auto: bf16 on CUDA, off on the CPU
        flags += ["--amp", amp]
    if store.recorded(meta, "precision") != "f32":
        flags += ["--precision", str(meta["precision"])]
    if store.recorded(meta, "compression") != "none":
        flags += ["--compression", str(meta["compression"])]
    return flags + _decoding_flags(meta)


def views_flags(meta: Mapping[str, Any]) -> list[str]:
    """The options that make the augmented train views a ``train-aug`` cache records (count, recipe, seed)."""
    seed = re.search(r"SeededPerRow\(seed=(\d+)", str(meta.get("transforms", "")))
    return ["--train-views", str(meta.get("views", 4)), "--augment", str(meta.get("augment", "light"))] + (
        ["--seed", seed.group(1)] if seed and seed.group(1) != "0" else []
    )


def _weights_flags(weights: WeightsRef, base: str, base_tag: str) -> list[str]:
    """The options of what rebuilds these weights (:meth:`WeightsRef.load_kwargs`), defaults left out."""
    rebuild = weights.load_kwargs(base=base, base_tag=base_tag, weights_file=f"PATH/TO/{weights.name}")
    flags = ["--weights-file", rebuild["weights_file"]] if "weights_file" in rebuild else []
    flags += ["--weights", rebuild["weights"]] if rebuild.get("weights", WEIGHTS_DEFAULT) != WEIGHTS_DEFAULT else []
    return flags + (["--seed", str(rebuild["seed"])] if rebuild.get("seed") else [])


def _decoding_flags(meta: Mapping[str, Any]) -> list[str]:
    decoding, flags = Decoding.recorded(meta), []
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
    """``--base`` (and ``--weights``) of a tag without a cache to read: ``<base>``, ``<base>-random`` or
    ``<base>-<variant>`` (a pretrained variant, told apart by the base name being registered)."""
    if is_random_tag(base_tag):
        return ["--base", base_of_tag(base_tag), "--weights", "none"]
    base, variant = base_and_variant(base_tag) or (base_tag, "")
    return ["--base", base] + (["--weights", variant] if variant else [])


def _known_folder(dataset: str, paths: Paths | None, recorded: str | None) -> str:
    """Where the dataset's images are now (:func:`featurecache.data.images_folder`; without ``paths``, where its
    caches recorded them), else a placeholder."""
    folder = images_folder(recorded, dataset, paths) if paths is not None else recorded
    return str(folder) if folder else f"path/to/{dataset}"
