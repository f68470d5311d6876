"""Saving and loading fitted heads: joblib file + JSON sidecar with provenance, written atomically.

Loading a joblib file runs code (it is a pickle). featurecache only loads files whose sha256 matches the
sidecar written next to them by featurecache itself; never point it at a head from someone you do not trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write, file_sha256

HEAD_FILE = "head.joblib"
STATE_DICT_FILE = "state_dict.pt"
SIDECAR_FILE = "sidecar.json"


def save_head(directory: Path, estimator: Any, sidecar: dict[str, Any]) -> None:
    """Write ``head.joblib`` (and ``state_dict.pt`` for torch heads), then the sidecar last.

    A directory with a sidecar is complete: the sidecar is renamed into place only after the model files.
    """
    import joblib

    directory.mkdir(parents=True, exist_ok=True)
    (directory / SIDECAR_FILE).unlink(missing_ok=True)
    atomic_write(directory / HEAD_FILE, lambda p: joblib.dump(estimator, p))
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
    path = Path(directory) / SIDECAR_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_head(directory: str | os.PathLike, *, expect_features: dict[str, str] | None = None) -> tuple[Any, dict]:
    """Load a head saved by :func:`save_head` and its sidecar.

    Args:
        directory: ``models/<dataset>/<base>/<layer>/<head>`` (or the ``head.joblib`` inside it).
        expect_features: split -> feature-file fingerprint the head is about to be used with; a head trained
            on other features is refused.
    """
    import joblib

    directory = Path(directory)
    if directory.name == HEAD_FILE:
        directory = directory.parent
    sidecar = read_sidecar(directory)
    if sidecar is None:
        raise FeaturecacheError(
            f"{directory} has no {SIDECAR_FILE}: not a head saved by featurecache (only our own artifacts are "
            f"loaded, since joblib files run code); train one with `featurecache train-heads`"
        )
    head_path = directory / HEAD_FILE
    if not head_path.is_file() or file_sha256(head_path) != sidecar["files"][HEAD_FILE]:
        raise FeaturecacheError(
            f"{head_path} does not match the sha256 in its sidecar; it was modified or replaced, so it is not "
            f"loaded. Retrain it with `featurecache train-heads --overwrite`"
        )
    if expect_features is not None:
        trained_on = sidecar["features"]
        stale = sorted(s for s, fp in expect_features.items() if trained_on.get(s, {}).get("fingerprint") != fp)
        if stale:
            raise FeaturecacheError(
                f"head {directory} was trained on other features than the current cache ({', '.join(stale)} "
                f"changed); retrain it with `featurecache train-heads --overwrite`"
            )
    return joblib.load(head_path), sidecar
