"""Saving and loading fitted heads: a ``skops`` file + JSON sidecar with provenance, written atomically.

Loading never runs code. A head is stored with ``skops.io``, which rebuilds the estimator from plain arrays
and parameters and instantiates only the types it is told to trust: scikit-learn's own (skops' defaults) and
the head classes in :data:`TRUSTED_TYPES`. A file naming any other type or function (a planted or tampered
head) is refused before anything is built. The dense head's torch weights travel as a state dict read with
``torch.load(weights_only=True)``. Heads saved as joblib pickles by older versions are refused, not unpickled.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write, file_sha256

HEAD_FILE = "head.skops"
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


def save_head(directory: Path, estimator: Any, sidecar: dict[str, Any]) -> None:
    """Write ``head.skops`` (and ``state_dict.pt`` for torch heads), then the sidecar last.

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
    payload = {**sidecar, "files": files}
    atomic_write(directory / SIDECAR_FILE, lambda p: p.write_text(json.dumps(payload, indent=1, default=_json_default)))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_sidecar(directory: Path) -> dict[str, Any] | None:
    """The sidecar of a saved head, or None when the folder has none; a damaged one is a one-line error."""
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


def _retrain_command(sidecar: dict[str, Any]) -> str:
    """The train-heads command that rewrites the head a sidecar describes."""
    if not all(isinstance(sidecar.get(k), str) for k in ("dataset", "base_tag", "layer", "head_spec")):
        return "featurecache train-heads --dataset ... --bases ... --layers ... --heads ... --overwrite"
    augmented = " --augmented" if sidecar.get("train_views") else ""
    return (
        f"featurecache train-heads --dataset {sidecar['dataset']} --bases {sidecar['base_tag']} --layers "
        f"{sidecar['layer']} --heads {sidecar['head_spec']}{augmented} --overwrite"
    )


def load_head(directory: str | os.PathLike, *, expect_features: dict[str, str] | None = None) -> tuple[Any, dict]:
    """Load a head saved by :func:`save_head` and its sidecar; nothing in the files can run code.

    Args:
        directory: ``models/<dataset>/<base>/<layer>/<head>`` (or the ``head.skops`` inside it).
        expect_features: split -> feature-file fingerprint the head is about to be used with; a head trained
            on other features is refused.
    """
    directory = Path(directory)
    if directory.name in (HEAD_FILE, LEGACY_HEAD_FILE):
        directory = directory.parent
    sidecar = read_sidecar(directory)
    if sidecar is None:
        raise FeaturecacheError(
            f"{directory} has no {SIDECAR_FILE}: not a head saved by featurecache; train one with "
            f"`featurecache train-heads`"
        )
    head_path = directory / HEAD_FILE
    if not head_path.is_file() and (directory / LEGACY_HEAD_FILE).is_file():
        raise FeaturecacheError(
            f"{directory / LEGACY_HEAD_FILE} is a pickled head from an older featurecache; pickles run code when "
            f"loaded, so it is not loaded. Retrain it: `{_retrain_command(sidecar)}`"
        )
    expected_sha = (sidecar.get("files") or {}).get(HEAD_FILE)
    if not head_path.is_file() or file_sha256(head_path) != expected_sha:
        raise FeaturecacheError(
            f"{head_path} does not match the sha256 in its sidecar; it was modified or replaced, so it is not "
            f"loaded. Retrain it: `{_retrain_command(sidecar)}`"
        )
    if expect_features is not None:
        trained_on = sidecar["features"]
        stale = sorted(s for s, fp in expect_features.items() if trained_on.get(s, {}).get("fingerprint") != fp)
        if stale:
            raise FeaturecacheError(
                f"head {directory} was trained on other features than the current cache ({', '.join(stale)} "
                f"changed); retrain it with `featurecache train-heads --overwrite`"
            )
    return _load_trusted(head_path, sidecar), sidecar


def _load_trusted(head_path: Path, sidecar: dict[str, Any]) -> Any:
    """``skops.io.load`` with the explicit trusted-type list; anything else in the file is refused unbuilt."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=head_path)) - set(TRUSTED_TYPES))
        if untrusted:
            raise FeaturecacheError(
                f"{head_path} names types featurecache does not trust ({', '.join(untrusted[:5])}); it was not "
                f"written by featurecache, so it is not loaded. Retrain it: `{_retrain_command(sidecar)}`"
            )
        return skops.io.load(head_path, trusted=list(TRUSTED_TYPES))
    except FeaturecacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, RuntimeError) as exc:
        raise FeaturecacheError(
            f"{head_path} is not a readable skops head ({type(exc).__name__}: {exc}); retrain it: "
            f"`{_retrain_command(sidecar)}`"
        ) from exc
