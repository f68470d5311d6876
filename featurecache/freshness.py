"""Whether a saved head was trained on the features its home's caches hold now.

A head's sidecar records, per split, the fingerprint of the features it was fitted and scored on
(:func:`feature_fingerprint`: the cache's config fingerprint, the tap key and the tap's attributes). Re-extracting a
cache with other images, another runtime, dtype, base or weights changes it; the head's scores are then of other
numbers. Every reader that ranks saved heads (the leaderboard, the answer, the report, the layer scores,
fine-tuning's choice of a starting head) goes through :func:`current_heads`, which yields records, so a stale head
is left out everywhere alike, with a warning naming its retrain command.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from featurecache import persist, store
from featurecache.commands import extract_command
from featurecache.config import Paths
from featurecache.data import SPLITS, Decoding
from featurecache.errors import FeaturecacheError, first_time
from featurecache.records import HeadRecord, SidecarVersionError, retrain_command, retrain_commands
from featurecache.weights import PIXELS_TAG

log = logging.getLogger(__name__)


def feature_fingerprint(meta: dict[str, Any], layer: str) -> str:
    """What a head trained on ``layer`` of the cache with metadata ``meta`` records for that split.

    A cache with unreadable rows adds how many rows it could read: the same files made again once more of them are
    readable (HEIC photos once pillow-heif is installed) keep the config fingerprint but give the head other rows.
    """
    fingerprint = f"{meta['config_fingerprint']}:{layer}:{json.dumps(meta['taps'][layer], sort_keys=True)}"
    skipped = meta.get("num_samples", 0) != meta.get("num_valid", meta.get("num_samples", 0))
    return f"{fingerprint}:valid={meta['num_valid']}" if skipped else fingerprint


def pixels_fingerprint(meta: dict[str, Any], layer: str) -> str:
    """What the raw-pixel baseline (:mod:`featurecache.baselines`), which reads the images of a base's cache at
    ``layer`` (``pixels16x16``), records for that split: the image files and how they were decoded."""
    decoding = ",".join(f"{k}={v}" for k, v in sorted(Decoding.recorded(meta).cache_keys().items()))
    return f"{meta['data_fingerprint']}:{layer}:{decoding}"


def stale_reason(
    sidecar: Mapping[str, Any], paths: Paths, metas: dict[Path, dict[str, Any]] | None = None
) -> str | None:
    """Why a saved head (its sidecar) no longer matches this home's caches, or None when it matches.

    Stale: a cache re-extracted since (other images, runtime, dtype, base or weights), its layer no longer in it, or
    a cache that cannot be read. A split whose cache is gone (a head copied to another machine) has nothing to
    compare with and passes. ``metas`` memoizes cache metadata across heads.
    """
    if not all(isinstance(sidecar.get(k), str) for k in ("dataset", "base_tag", "layer")):
        return None  # another sidecar version: its reader refuses it with the retrain command
    metas = {} if metas is None else metas
    for split, trained_on in sidecar.get("features", {}).items():
        file = cache_read(sidecar, split, paths)
        if not file.is_file():
            continue
        if file not in metas:
            try:
                metas[file] = store.read_metadata(file)
            except (FeaturecacheError, OSError) as exc:
                return f"its {split} cache cannot be read: {exc}"
        if (reason := _changed(sidecar, metas[file], trained_on, file)) is not None:
            return reason
    return None


def _left_behind(sidecar: Mapping[str, Any], paths: Paths, metas: dict[Path, dict[str, Any]]) -> str | None:
    """Why a current head must still not be ranked beside the others: a cache it read holds other images than a
    newer cache of the same split under another base (the folder changed, or another split was drawn, and only that
    base was extracted again), so the two would be scored on different test images; None when it is not so."""
    for split in SPLITS:
        file = cache_read(sidecar, split, paths)
        if file in metas and (newer := _newer_images(file, metas)) is not None:
            return (
                f"{file} holds other images than the newer {newer}; extract this base again "
                f"(`{extract_command(sidecar['dataset'], file.parent.name, paths=paths)}`), then retrain"
            )
    return None


def _newer_images(file: Path, metas: dict[Path, dict[str, Any]]) -> Path | None:
    """A newer cache of the same dataset and split under another base, made from other files than ``file``
    (fingerprinted the same way), or None: heads of the two would score other test images, and the older cache is
    the one left behind when the folder changed."""
    meta = metas[file]
    fingerprint = str(meta.get("data_fingerprint", ""))
    for other in sorted(file.parent.parent.glob(f"*/{file.name}")):
        if other == file:
            continue
        if other not in metas:
            metas[other] = {}  # unreadable (another schema, half written): nothing to compare with, asked once
            with contextlib.suppress(FeaturecacheError, OSError):
                metas[other] = store.read_metadata(other)
        theirs = str(metas[other].get("data_fingerprint", ""))
        same_mode = theirs.split(":")[0] == fingerprint.split(":")[0]
        newer = str(metas[other].get("created_utc", "")) > str(meta.get("created_utc", ""))
        if same_mode and theirs != fingerprint and newer:
            return other
    return None


def cache_read(head: HeadRecord | Mapping[str, Any], split: str, paths: Paths) -> Path:
    """The cache in this home that a head (its record, or its sidecar as read) read for ``split`` (its rows,
    labels and features): its own base's, or for the raw-pixel baseline the base cache whose images it decoded.
    Found in ``paths``, not at the path the sidecar recorded: a home that was moved or copied keeps its heads."""
    fields = head if isinstance(head, Mapping) else {"dataset": head.dataset, "base_tag": head.base_tag,
                                                     "features": head.features}  # fmt: skip
    tag, trained_on = fields["base_tag"], fields.get("features", {}).get(split, {})
    if tag == PIXELS_TAG and isinstance(trained_on.get("file"), str):
        tag = Path(trained_on["file"]).parent.name
    return paths.feature_file(fields["dataset"], tag, split)


def _changed(sidecar: Mapping[str, Any], meta: dict[str, Any], trained_on: Mapping[str, Any], file: Path) -> str | None:
    if sidecar["base_tag"] == PIXELS_TAG:
        now = pixels_fingerprint(meta, sidecar["layer"])
    else:
        taps = sidecar.get("taps") or (sidecar["layer"],)
        if missing := [t for t in taps if t not in meta["taps"]]:
            return f"{file} no longer holds {', '.join(missing)}"
        now = " + ".join(feature_fingerprint(meta, t) for t in taps)
    return None if now == trained_on.get("fingerprint") else f"{file} was re-extracted after it was trained"


def current_heads(directories: Iterable[Path], paths: Paths) -> Iterator[tuple[Path, HeadRecord]]:
    """``(folder, record)`` of the saved heads in ``directories`` trained on this home's current caches: what every
    reader that ranks heads reads. Stale heads, and sidecars of another featurecache version, are left out with a
    warning naming their retrain command."""
    for directory, sidecar in current_sidecars(directories, paths):
        try:
            yield directory, persist.record_of(directory, sidecar)
        except SidecarVersionError as exc:
            if first_time("sidecar version", directory):  # once, however many readers rank the heads
                log.warning("left out: %s", exc)


def current_sidecars(directories: Iterable[Path], paths: Paths) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(folder, sidecar)`` of the saved heads in ``directories`` trained on this home's current caches; the stale
    ones are left out with one warning for all of them (a re-extraction makes every head of a cache stale at once,
    and a warning per head buried the answer)."""
    metas: dict[Path, dict[str, Any]] = {}
    current, stale = [], []
    for directory in directories:
        sidecar = persist.read_sidecar(directory)
        if sidecar is None:
            continue
        reason = stale_reason(sidecar, paths, metas) or _left_behind(sidecar, paths, metas)
        if reason is None:
            current.append((directory, sidecar))
        else:
            stale.append((directory, sidecar, reason))
    _warn_left_out(stale)
    yield from current


def _warn_left_out(stale: list[tuple[Path, Mapping[str, Any], str]]) -> None:
    """One warning for the stale heads not warned about yet: the first with its reason, and the retrain commands."""
    # Once per head and the features it records: the leaderboard, the answer and the report each read the heads,
    # and a head retrained and then stale again records other features.
    fresh = [(directory, sidecar, reason) for directory, sidecar, reason in stale
             if first_time("stale head", directory, json.dumps(sidecar.get("features"), sort_keys=True))]  # fmt: skip
    if len(fresh) == 1:
        directory, sidecar, reason = fresh[0]
        log.warning("left out: %s (%s); retrain it: %s", directory, reason, retrain_command(sidecar))
    elif fresh:
        directory, _, reason = fresh[0]
        log.warning(
            "left out %d heads trained on features that changed since (the first: %s, %s); retrain them: %s",
            len(fresh), directory, reason, "; ".join(retrain_commands([s for _, s, _ in fresh])),
        )  # fmt: skip
