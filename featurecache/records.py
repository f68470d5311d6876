"""The head record: what ``models/<dataset>/<base_tag>/<layer>/<head>/sidecar.json`` says, as a typed value.

Two kinds of folder share the sidecar: a stage-2 head (``kind="head"``, ``head.skops``, written by
:mod:`featurecache.train` and the raw-pixel baseline) and a fine-tuned model (``kind="finetuned"``, ``model.pt``,
written by :mod:`featurecache.finetune`). The on-disk JSON keeps the keys it has always had (so reports read old
runs): the kind is not stored but read from the model file the sidecar lists. :meth:`HeadRecord.to_json` and
:meth:`HeadRecord.from_json` convert exactly; optional fields that are ``None`` are left out of the JSON (unless
the sidecar read wrote them as null).

This module sits low in the house: it imports only errors and the weight identity, never an orchestration module.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.weights import PIXELS_TAG, WeightsRef

SIDECAR_VERSION = 2  # 2: val/test scores carry per-image predictions (paired tests in the report)
HEAD_KIND = "head"  # a stage-2 head on cached features: head.skops (+ state_dict.pt for torch heads)
FINETUNED_KIND = "finetuned"  # base + head fine-tuned together: model.pt (a state dict)
FINETUNED_MODEL_FILE = "model.pt"
# How a kept-frozen fine-tuned model (:attr:`HeadRecord.kept_frozen`) is named beside its name, wherever it is listed.
KEPT_FROZEN_NOTE = "= the frozen head: no epoch beat it on val"
HEAD_FILE = "head.skops"  # a stage-2 head, saved with skops (featurecache.persist)


_NOT_IN_JSON = frozenset({"kind", "extra", "null_keys"})


@dataclass(frozen=True)
class HeadRecord:
    """The provenance and scores of one saved head or fine-tuned model (one ``sidecar.json``)."""

    kind: str  # HEAD_KIND or FINETUNED_KIND
    # --- what it is and where its inputs came from (both kinds)
    dataset: str
    base: str  # the base's registered name
    base_tag: str  # its cache folder: the base, or <base>-random, <base>-<variant>
    weights: str  # the base's weights identity (WeightsRef as a string)
    layer: str  # the tap key, or featurecache.train.MULTI_TAP_LAYER
    tap: Mapping[str, Any]  # the cached tap's attrs (TapSpec.to_attrs), or the multi-tap marker
    head: str  # the folder name: logreg, mlp+aug, finetuned-mlp, ...
    dense: bool  # a torch head
    class_names: tuple[str, ...]
    features: Mapping[str, Mapping[str, str]]  # split -> {file, fingerprint} the head was trained on
    # --- what was chosen and how it scored (both kinds)
    params: Mapping[str, Any]
    selection_val_accuracy: float
    val: Mapping[str, Any]  # classification_scores + per-image "predictions" of the valid rows
    test: Mapping[str, Any]
    n_train: int
    files: Mapping[str, str] = field(default_factory=dict)  # model file -> sha256 (written by persist)
    timings: Mapping[str, float] | None = None
    alpha: str | None = None  # the background transparent images were composited onto
    orientation: str | None = None  # "exif": photos turned upright by their EXIF tag; None: predates it (ignored)
    decode: str | None = None  # "draft": large JPEGs decoded at a reduced scale; "gpu": by nvjpeg, resized by torch
    feature_dtype: str | None = None  # the cache's storage dtype (predict rounds new rows the same way)
    # --- stage-2 heads only
    head_spec: str | None = None  # the registered head (``mlp`` for ``mlp+aug``)
    taps: tuple[str, ...] | None = None  # a multi-tap head's taps, in concatenation order
    train_views: int | None = None  # augmented views per train image (0: none)
    grid: list[Mapping[str, Any]] | None = None
    sweep: list[Mapping[str, Any]] | None = None
    refit: str | None = None
    seed: int | None = None
    streamed: bool | None = None
    library_versions: Mapping[str, str] | None = None
    # --- fine-tuned models only
    started_from: str | None = None  # the stage-2 head folder it was rebuilt from
    rebuilt_agreement: float | None = None
    best_epoch: int | None = None
    improved_on_val: bool | None = None
    verdict: str | None = None
    history: list[Mapping[str, float]] | None = None
    frozen_test_accuracy: float | None = None
    gain_over_frozen_points: float | None = None
    gain_ci95_points: tuple[float, float] | None = None
    # --- keys this version does not know, and optional keys a sidecar wrote as null (kept: a rewrite loses nothing)
    extra: Mapping[str, Any] = field(default_factory=dict)
    null_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def weights_ref(self) -> WeightsRef:
        return WeightsRef.parse(self.weights)

    def trained_on(self, features: Mapping[str, Mapping[str, str]]) -> bool:
        """Whether the head was trained on ``features`` (split -> {file, fingerprint}). Only the fingerprints count:
        a home that was moved or copied changes every file's path and none of the numbers."""
        fingerprints = {split: dict(f).get("fingerprint") for split, f in self.features.items()}
        return fingerprints == {split: dict(f).get("fingerprint") for split, f in features.items()}

    @property
    def kept_frozen(self) -> bool:
        """A fine-tuned model of which no epoch beat the frozen head on val: it is that frozen head, rebuilt."""
        return self.kind == FINETUNED_KIND and self.best_epoch == 0

    @property
    def model_file(self) -> str:
        """The file that holds the model: ``head.skops`` or ``model.pt``."""
        return FINETUNED_MODEL_FILE if self.kind == FINETUNED_KIND else HEAD_FILE

    def to_json(self) -> dict[str, Any]:
        """The sidecar as plain JSON values (tuples as lists, numpy values as Python ones), without the kind."""
        out: dict[str, Any] = {"version": SIDECAR_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_IN_JSON or (value is None and f.default is None and f.name not in self.null_keys):
                continue
            out[f.name] = value
        out.update(self.extra)
        return json.loads(json.dumps(out, default=_json_default))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "sidecar") -> HeadRecord:
        """Read a version-2 sidecar; another version or a missing key is a one-line error naming the fix."""
        version = data.get("version")
        if version != SIDECAR_VERSION:
            written = f"a version-{version}" if version is not None else "an unversioned"
            raise SidecarVersionError(
                f"{source} is {written} sidecar; this featurecache reads version {SIDECAR_VERSION}. "
                f"Retrain it: `{retrain_command(data)}`"
            )
        names = {f.name for f in dataclasses.fields(cls)} - _NOT_IN_JSON
        required = [f.name for f in dataclasses.fields(cls) if f.name in names and f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise FeaturecacheError(
                f"{source} is not a featurecache sidecar (no {', '.join(missing[:4])}); retrain it: "
                f"`{retrain_command(data)}`"
            )
        values = {k: v for k, v in data.items() if k in names}
        for key in ("class_names", "taps", "gain_ci95_points"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        kind = kind_of(data)
        extra = {k: v for k, v in data.items() if k not in names and k != "version"}
        nulls = frozenset(k for k, v in values.items() if v is None)
        return cls(kind=kind, **values, extra=extra, null_keys=nulls)


def kind_of(data: Mapping[str, Any]) -> str:
    """The kind of folder a sidecar (dict, any version) describes, from the model file it lists."""
    return FINETUNED_KIND if FINETUNED_MODEL_FILE in (data.get("files") or {}) else HEAD_KIND


class SidecarVersionError(FeaturecacheError):
    """A sidecar written by another featurecache version: retrain (train-heads reuse treats it as absent)."""


def retrain_command(data: Mapping[str, Any]) -> str:
    """The command that rewrites the head or fine-tuned model a sidecar (dict) describes."""
    if not all(isinstance(data.get(k), str) for k in ("dataset", "base_tag", "layer", "head")):
        return "featurecache train-heads --dataset ... --bases ... --layers ... --heads ... --overwrite"
    if data["base_tag"] == PIXELS_TAG:  # the raw-pixel baseline is trained by the comparison alone
        return shlex.join(["featurecache", "compare-layers", f"{data['dataset']}=PATH/TO/ITS/FOLDER"])
    if kind_of(data) == FINETUNED_KIND:
        started = str(data.get("started_from", "")).rstrip("/").rsplit("/", 1)[-1] or "mlp"
        return shlex.join(["featurecache", "finetune", "--dataset", data["dataset"], "--base", data["base_tag"],
                           "--layer", data["layer"], "--head", started])  # fmt: skip
    if not isinstance(data.get("head_spec"), str):
        return "featurecache train-heads --dataset ... --bases ... --layers ... --heads ... --overwrite"
    return _train_heads_command(data["dataset"], data["base_tag"], [data["layer"]], [data["head_spec"]],
                                augmented=bool(data.get("train_views")))  # fmt: skip


def retrain_commands(sidecars: Sequence[Mapping[str, Any]]) -> list[str]:
    """The commands that rewrite several heads: one ``train-heads`` per dataset, base and augmentation for the
    single-layer heads (it trains every layer x head it is given, so each head is asked for once), and each other
    head's (multi-tap heads, fine-tuned models, unreadable sidecars) own :func:`retrain_command`."""
    groups: dict[tuple[str, str, bool], tuple[set[str], set[str]]] = {}
    others: list[str] = []
    for data in sidecars:
        command = retrain_command(data)
        if not command.startswith("featurecache train-heads --dataset ") or "..." in command or data.get("taps"):
            others.append(command)
            continue
        layers, heads = groups.setdefault((data["dataset"], data["base_tag"], bool(data.get("train_views"))),
                                          (set(), set()))  # fmt: skip
        layers.add(data["layer"])
        heads.add(data["head_spec"])
    merged = [_train_heads_command(d, b, sorted(layers), sorted(heads), augmented=aug)
              for (d, b, aug), (layers, heads) in groups.items()]  # fmt: skip
    return merged + sorted(set(others))


def _train_heads_command(dataset: str, base_tag: str, layers: Sequence[str], heads: Sequence[str], *,
                         augmented: bool) -> str:  # fmt: skip
    return shlex.join(["featurecache", "train-heads", "--dataset", dataset, "--bases", base_tag, "--layers",
                       ",".join(layers), "--heads", ",".join(heads), *(["--augmented"] if augmented else []),
                       "--overwrite"])  # fmt: skip


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def library_versions(*modules: str) -> dict[str, str]:
    """The versions a cache or a head records of what made it: featurecache, numpy, torch, Python, and the
    ``modules`` (import names: ``sklearn`` is recorded as scikit-learn, ``h5py`` with its HDF5 library)."""
    import importlib
    import platform

    from featurecache import __version__

    out = {"featurecache": __version__}
    for name in ("numpy", "torch", *modules):
        module = importlib.import_module(name)
        out["scikit-learn" if name == "sklearn" else name] = module.__version__
        if name == "h5py":
            out["hdf5"] = module.version.hdf5_version
    return {**out, "python": platform.python_version()}
