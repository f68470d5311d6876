"""Saving and loading fitted heads: a ``skops`` file + JSON sidecar with provenance, written atomically.

Loading never runs code. A head is stored with ``skops.io``, which rebuilds the estimator from plain arrays
and parameters and instantiates only the types it is told to trust: scikit-learn's own (skops' defaults) and
the head classes in :data:`TRUSTED_TYPES`. A file naming any other type or function (a planted or tampered
head) is refused before anything is built. The dense head's torch weights travel as a state dict read with
``torch.load(weights_only=True)``. Heads saved as joblib pickles by older versions are refused, not unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write, atomic_write_text, file_sha256
from featurecache.records import HEAD_FILE, HEAD_KIND, HeadRecord, retrain_command

STATE_DICT_FILE = "state_dict.pt"
SIDECAR_FILE = "sidecar.json"
# What older versions saved: a pickle, which runs code when loaded. Recognised only to refuse it clearly.
LEGACY_HEAD_FILE = "head.joblib"
# Our estimator classes, trusted on top of skops' defaults (scikit-learn, numpy, scipy, builtins containers).
# A new head class must be added here, or its saved heads are refused.
TRUSTED_TYPES = (
    "featurecache.heads.classic.KNNHead",
    "featurecache.heads.classic.LinearSVMHead",
    "featurecache.heads.classic.LogisticRegressionHead",
    "featurecache.heads.classic.RBFSVMClassifier",
    "featurecache.heads.dense.DenseClassifier",
    "featurecache.heads.multilayer.MultiLayerHead",
)


def save_head(directory: Path, estimator: Any, record: HeadRecord) -> HeadRecord:
    """Write ``head.skops`` (and ``state_dict.pt`` for torch heads), then the sidecar last; returns the record
    as written (with the files' sha256).

    A directory with a sidecar is complete: the sidecar is renamed into place only after the model files.
    """
    import skops.io

    if ".." in Path(directory).parts:  # callers build it from checked names; this is the last line of defence
        raise FeaturecacheError(f"refusing to save a head under {directory}: '..' would leave the models folder")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SIDECAR_FILE).unlink(missing_ok=True)
    (directory / LEGACY_HEAD_FILE).unlink(missing_ok=True)  # a retrained head replaces a pickled one
    data = skops.io.dumps(estimator)
    untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if untrusted:  # a programming error: a head we could save but never load back
        raise TypeError(f"cannot save {type(estimator).__name__}: add {', '.join(untrusted)} to TRUSTED_TYPES")
    atomic_write(directory / HEAD_FILE, lambda p: p.write_bytes(data))
    files = {HEAD_FILE: file_sha256(directory / HEAD_FILE)}
    module = getattr(estimator, "module_", None)
    if module is not None:
        import torch

        atomic_write(directory / STATE_DICT_FILE, lambda p: torch.save(module.state_dict(), p))
        files[STATE_DICT_FILE] = file_sha256(directory / STATE_DICT_FILE)
    return write_record(directory, dataclasses.replace(record, kind=HEAD_KIND, files=files))


def write_record(directory: Path, record: HeadRecord) -> HeadRecord:
    """Write ``sidecar.json`` atomically (after the model files it lists); returns ``record``."""
    atomic_write_text(Path(directory) / SIDECAR_FILE, json.dumps(record.to_json(), indent=1))
    return record


def read_sidecar(directory: Path) -> dict[str, Any] | None:
    """The sidecar of a saved head as raw JSON (any version), or None when the folder has none; a damaged one is
    a one-line error. Code that needs the fields reads :func:`read_record`."""
    path = Path(directory) / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeaturecacheError(
            f"{path} is not readable JSON ({exc}); retrain the head with `featurecache train-heads --overwrite`"
        ) from exc
    if not isinstance(sidecar, dict):
        raise FeaturecacheError(f"{path} is not a featurecache sidecar; retrain with `featurecache train-heads`")
    return sidecar


def read_record(directory: Path) -> HeadRecord | None:
    """The :class:`HeadRecord` of a saved head or fine-tuned model, or None when the folder has no sidecar;
    another sidecar version is a :class:`SidecarVersionError` naming the retrain command."""
    sidecar = read_sidecar(directory)
    return None if sidecar is None else record_of(directory, sidecar)


def record_of(directory: Path, sidecar: dict[str, Any]) -> HeadRecord:
    """The :class:`HeadRecord` of a sidecar already read from ``directory`` (:func:`read_sidecar`)."""
    return HeadRecord.from_json(sidecar, source=str(Path(directory) / SIDECAR_FILE))


def require_record(directory: Path) -> HeadRecord:
    """:func:`read_record`, refusing a folder without a sidecar."""
    record = read_record(directory)
    if record is None:
        raise FeaturecacheError(
            f"{directory} has no {SIDECAR_FILE}: not a head saved by featurecache; train one with "
            f"`featurecache train-heads`"
        )
    return record


def verified_file(directory: Path, record: HeadRecord, name: str) -> Path:
    """``directory/name`` after checking it against the sha256 its sidecar lists: a missing file and a changed
    one are different one-line errors, both naming the retrain command."""
    path = Path(directory) / name
    if not path.is_file():
        raise FeaturecacheError(
            f"{path} is missing (its sidecar lists it), so there is nothing to load. Retrain it: "
            f"`{retrain_command(record.to_json())}`"
        )
    if file_sha256(path) != record.files.get(name):
        raise FeaturecacheError(
            f"{path} does not match the sha256 in its sidecar; it was modified or replaced, so it is not "
            f"loaded. Retrain it: `{retrain_command(record.to_json())}`"
        )
    return path


def load_head(directory: str | os.PathLike, *, expect_features: dict[str, str] | None = None) -> tuple[Any, HeadRecord]:
    """Load a stage-2 head saved by :func:`save_head` and its record; nothing in the files can run code.

    Args:
        directory: ``models/<dataset>/<base>/<layer>/<head>`` (or the ``head.skops`` inside it).
        expect_features: split -> feature-file fingerprint the head is about to be used with; a head trained
            on other features is refused.
    """
    directory = Path(directory)
    if directory.name in (HEAD_FILE, LEGACY_HEAD_FILE):
        directory = directory.parent
    sidecar = read_sidecar(directory)
    if sidecar is not None and not (directory / HEAD_FILE).is_file() and (directory / LEGACY_HEAD_FILE).is_file():
        raise FeaturecacheError(
            f"{directory / LEGACY_HEAD_FILE} is a pickled head from an older featurecache; pickles run code when "
            f"loaded, so it is not loaded. Retrain it: `{retrain_command(sidecar)}`"
        )
    record = require_record(directory)
    if record.kind != HEAD_KIND:
        raise FeaturecacheError(
            f"{directory} is a fine-tuned model ({record.model_file}), not a head on cached features; classify "
            f"images with it through `featurecache predict --head {directory}`"
        )
    head_path = verified_file(directory, record, HEAD_FILE)
    if expect_features is not None:
        trained_on = record.features
        stale = sorted(s for s, fp in expect_features.items() if trained_on.get(s, {}).get("fingerprint") != fp)
        if stale:
            raise FeaturecacheError(
                f"head {directory} was trained on other features than the current cache ({', '.join(stale)} "
                f"changed); retrain it with `featurecache train-heads --overwrite`"
            )
    return _load_trusted(head_path, record.to_json()), record


def _load_trusted(head_path: Path, sidecar: dict[str, Any]) -> Any:
    """``skops.io.load`` with the explicit trusted-type list; anything else in the file is refused unbuilt."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=head_path)) - set(TRUSTED_TYPES))
        if untrusted:
            raise FeaturecacheError(
                f"{head_path} names types featurecache does not trust ({', '.join(untrusted[:5])}); it was not "
                f"written by featurecache, so it is not loaded. Retrain it: `{retrain_command(sidecar)}`"
            )
        return skops.io.load(head_path, trusted=list(TRUSTED_TYPES))
    except FeaturecacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, RuntimeError) as exc:
        raise FeaturecacheError(
            f"{head_path} is not a readable skops head ({type(exc).__name__}: {exc}); retrain it: "
            f"`{retrain_command(sidecar)}`"
        ) from exc
