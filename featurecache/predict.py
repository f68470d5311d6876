"""Use a trained head on new images: rebuild its base and tap, extract, classify."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import store
from featurecache.bases import LoadedBase, load_base_of
from featurecache.config import Paths, default_paths
from featurecache.data import Decoding, bad_image_errors, bad_image_reason, load_image, read_encoded
from featurecache.errors import FeaturecacheError
from featurecache.fileio import writable
from featurecache.freshness import stale_reason
from featurecache.gpu_decode import decode_batch
from featurecache.layers import TapSpec
from featurecache.persist import HEAD_FILE, LEGACY_HEAD_FILE, load_head, read_sidecar
from featurecache.preprocess import Preprocessing, device_geometry_for, draft_for
from featurecache.records import FINETUNED_KIND, FINETUNED_MODEL_FILE, HeadRecord, kind_of, retrain_command
from featurecache.weights import PIXELS_TAG, is_random_tag

log = logging.getLogger(__name__)


def _runtime_for(record: HeadRecord, runtime: str | None) -> tuple[str, str]:
    """The runtime and precision the head's training features were extracted with (``auto``/f32 if unknown)."""
    if runtime is not None:
        return runtime, "f32"
    try:
        meta = store.read_metadata(_home_of(record).feature_file(record.dataset, record.base_tag, "train"))
    except (FeaturecacheError, OSError):
        return "auto", "f32"  # the cache is gone (a head copied to another machine): the device's default
    return store.recorded(meta, "runtime"), store.recorded(meta, "precision")


def _home_of(record: HeadRecord) -> Paths:
    """The project home that holds the head's training cache (its exports live beside it): this home
    (``$FEATURECACHE_HOME``) when it does, which is where a home that was moved or copied now is; else the home the
    sidecar recorded, while that cache is still there; else this home."""
    here = default_paths()
    if here.feature_file(record.dataset, record.base_tag, "train").is_file():
        return here
    with contextlib.suppress(KeyError, TypeError, IndexError):
        train_file = Path(record.features["train"]["file"]).resolve()
        recorded = Paths(train_file.parents[4])  # <home>/data/features/<dataset>/<base_tag>/train.h5
        if recorded.feature_file(record.dataset, record.base_tag, "train") == train_file and train_file.is_file():
            return recorded
    return here


def _export_file(record: HeadRecord, digest: str) -> Path:
    """Where predict keeps the exported extractor: beside the training cache, or, where that folder cannot be
    written (a read-only or shared home), in a folder of this process's own that goes with it."""
    export = _home_of(record).export_file(record.dataset, record.base_tag, digest)
    if export.is_file() or writable(export.parent):
        return export
    return Path(_private_exports().name) / export.name


@functools.cache
def _private_exports() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="featurecache-exports-")


class _HeadOnFeatures:
    """``images -> (labels, probabilities or None)`` for a stage-2 head: base + tap on the runtime the head's
    features came from (built and checked on the first batch), rows rounded to the cache's dtype, then the head."""

    def __init__(self, estimator: Any, loaded: LoadedBase, record: HeadRecord, runtime: str | None) -> None:
        self.estimator, self.loaded, self.record, self.runtime = estimator, loaded, record, runtime
        self.tap = TapSpec.from_attrs(record.tap)
        self.extractor: Any = None
        # What the head's top score is: a probability, or (k-NN) the share of the neighbours' votes.
        self.confidence_name = getattr(estimator, "confidence_name", "probability")

    def __call__(self, batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
        self.extractor = self.extractor or self._build_extractor(batch)
        rows = self.extractor(batch)[self.tap.key]
        # Round-trip through the cache's storage dtype: the head saw exactly such numbers in training.
        rows = rows.astype(self.record.feature_dtype or "float32").astype(np.float32)
        proba = self.estimator.predict_proba(rows).max(axis=1) if hasattr(self.estimator, "predict_proba") else None
        return np.asarray(self.estimator.predict(rows)), proba

    def _build_extractor(self, first: Any) -> Any:
        from featurecache.extract import ExtractOptions, _Runner, export_digest_of

        loaded, record, tap = self.loaded, self.record, self.tap
        name, precision = _runtime_for(record, self.runtime)
        export_file = _export_file(record, export_digest_of(loaded, [tap]))
        options = ExtractOptions(device="cpu", runtime=name, precision=precision)
        runner = _Runner(loaded, "cpu", options, taps=[tap], export_file=export_file)
        runner.check(first)
        return runner.extractor([tap])


def _finetuned_classifier(model: Any) -> Any:
    """``images -> (labels, probabilities)`` through a whole fine-tuned model (eager torch on the CPU)."""
    import torch

    def classify(batch: Any) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            proba = torch.softmax(model(batch).float(), dim=1)
        top, labels = proba.max(dim=1)
        return labels.numpy(), top.numpy()

    return classify


def _alpha_of(record: HeadRecord) -> str:
    """The background the head's training images were composited onto, so new images are decoded the same way.

    Recorded in the sidecar; heads whose sidecar predates it read it from the training cache's attrs.
    """
    if record.alpha:
        return record.alpha
    train_file = _home_of(record).feature_file(record.dataset, record.base_tag, "train")
    alpha = store.read_metadata(train_file).get("alpha") if train_file.is_file() else None
    if alpha is None:
        raise FeaturecacheError(
            f"cannot tell how the training images of this head were decoded (no 'alpha' in its sidecar or in "
            f"{train_file}): it predates --alpha; re-run `featurecache extract` and `featurecache train-heads "
            f"--overwrite`"
        )
    return alpha


def _decoding_of(record: HeadRecord) -> Decoding:
    """How the head's training images were decoded (``--alpha``, ``--orientation``, ``--decode``); a sidecar that
    predates an option was made as before it (its cache may have been re-extracted since; then the head is stale)."""
    return Decoding.recorded({"alpha": _alpha_of(record), "orientation": record.orientation, "decode": record.decode})


def _image_batches(
    images: Sequence[str | os.PathLike], transform: Any, *, decoding: Decoding, batch_size: int
) -> Iterator[tuple[list[Path], Any, list[tuple[Path, str]]]]:
    """``(paths, stacked tensors or None, unreadable (path, reason))`` per batch of ``images``, decoded as the
    training images were. An unreadable file is reported, not fatal: the other images of the call still count."""
    import torch

    preprocessing = Preprocessing(transform)  # the split extract runs: uint8 per image, normalized per batch
    draft = draft_for(preprocessing, decoding.decode)
    # --decode gpu: resized by torch as on the GPU; JPEGs decoded here by libjpeg-turbo (PIL's decoder), not nvjpeg
    geometry = device_geometry_for(preprocessing, decoding.decode)
    for start in range(0, len(images), batch_size):
        paths, decoded, unreadable = [], [], []
        for p in (Path(p) for p in images[start : start + batch_size]):
            try:
                decoded.append(read_encoded(p, decoding, geometry) if geometry else
                               preprocessing.per_image(load_image(p, decoding, draft=draft)))  # fmt: skip
                paths.append(p)
            except bad_image_errors() as exc:  # OSError covers a missing file and a folder
                unreadable.append((p, bad_image_reason(exc)))
        if geometry and decoded:
            pixels, errors = decode_batch(decoded, [""] * len(decoded), geometry, "cpu")
            unreadable += [(p, reason) for p, reason in zip(paths, errors, strict=True) if reason]
            keep = [i for i, reason in enumerate(errors) if not reason]
            paths, decoded = [paths[i] for i in keep], list(pixels[keep])
        yield paths, preprocessing.normalize(torch.stack(decoded)) if decoded else None, unreadable


def _head_folder(given: Path) -> Path:
    """The saved head's folder: a model file names its folder, and a relative path that is not here is looked up
    under the home (heads are saved as ``models/...`` below ``$FEATURECACHE_HOME``, which need not be here)."""
    directory = given.parent if given.name in (HEAD_FILE, LEGACY_HEAD_FILE, FINETUNED_MODEL_FILE) else given
    paths = default_paths()
    if (found := paths.find(directory)).exists():
        return found
    raise FeaturecacheError(
        f"no folder {directory} (here or under FEATURECACHE_HOME, {paths.root}); saved heads are "
        f"{paths.models}/<dataset>/<base>/<layer>/<head>, as train-heads' leaderboard lists them (model_dir)"
    )


def _check_control(record: HeadRecord, directory: Path) -> None:
    """The raw-pixel head is the comparison's floor, with no base to rebuild: say so, and name a head that predicts.
    A random-init control rebuilds its base from the recorded seed and predicts, poorly as it is meant to: it is
    said once, so its labels are not taken for a pretrained head's."""
    if is_random_tag(record.base_tag):
        log.warning("%s is the random-init control (an untrained %s): its predictions are the floor the "
                    "comparison measures pretrained features against, not a classifier to use", directory,
                    record.base)  # fmt: skip
    if record.base_tag != PIXELS_TAG:
        return
    home = _home_of(record)
    best, report = home.best_file(record.dataset), home.compare_report(record.dataset, ".md")
    use = (f"`model_dir` in {best}" if best.is_file() else
           f"the recommended one in {report} (models/{record.dataset}/<base>/<layer>/<head>)" if report.is_file() else
           f"a folder under {home.models / record.dataset} of a pretrained base")  # fmt: skip
    raise FeaturecacheError(
        f"{directory} is the raw-pixel control, the floor the comparison measures pretrained features against; it "
        f"cannot predict. Pass a pretrained base's head instead: {use}"
    )


def predict_images(
    head_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    weights_file: str | os.PathLike | None = None,
    batch_size: int | None = None,
    runtime: str | None = None,
) -> list[dict[str, Any]]:
    """Classify image files with a saved head or fine-tuned model; returns ``[{path, label, probability}]`` in
    input order (a k-NN head: ``vote_share`` and ``neighbours`` instead of ``probability``), ``{path, error}`` for a
    file that could not be read.

    ``runtime`` (stage-2 heads): ``featurecache.runtime.RUNTIMES``; by default the runtime the head's training
    cache records. A fine-tuned model runs whole, in eager torch on the CPU. ``batch_size``: by default the
    extraction's on the CPU (``featurecache.extract.default_batch_size``).
    """
    from featurecache.extract import default_batch_size

    if batch_size is not None and batch_size < 1:
        raise FeaturecacheError("batch_size must be at least 1")
    batch_size = batch_size or default_batch_size("cpu")
    directory = _head_folder(Path(head_dir))
    sidecar = read_sidecar(directory)
    if sidecar is not None and kind_of(sidecar) == FINETUNED_KIND:
        from featurecache.finetune import load_finetuned

        model, record, loaded = load_finetuned(directory, weights_file=weights_file)
        classify = _finetuned_classifier(model)
    else:
        estimator, record = load_head(directory)
        if record.taps:  # the features of several taps, concatenated: predict rebuilds one tap
            raise FeaturecacheError(
                f"{directory} is a multilayer head (taps {', '.join(record.taps)}); predict takes heads trained on "
                f"one layer: pass one of those under {directory.parent.parent}"
            )
        _check_control(record, directory)
        stale = stale_reason(sidecar, _home_of(record)) if sidecar else None
        if stale:  # still usable (the head classifies features as it was trained to), but the user should know
            log.warning("%s was trained on features that changed since (%s); its predictions run the base as the "
                        "cache now does; retrain it: %s", directory, stale, retrain_command(sidecar))  # fmt: skip
        loaded = load_base_of(record, weights_file=weights_file)
        classify = _HeadOnFeatures(estimator, loaded, record, runtime)
    batches = _image_batches(images, loaded.spec.transforms(), decoding=_decoding_of(record), batch_size=batch_size)
    confidence = getattr(classify, "confidence_name", "probability")
    # A k-NN head's vote share is over the neighbours it fitted with: the grid's k, or every train row if fewer.
    extra = {"neighbours": min(int(record.params["n_neighbors"]), record.n_train)} if confidence == "vote_share" else {}
    out: dict[str, dict[str, Any]] = {}
    for batch_paths, batch, unreadable in batches:
        out.update({str(p): {"path": str(p), "error": reason} for p, reason in unreadable})
        if batch is None:
            continue
        labels, proba = classify(batch)
        for i, p in enumerate(batch_paths):
            entry = {"path": str(p), "label": record.class_names[int(labels[i])]}
            if proba is not None:
                entry[confidence] = float(proba[i])
            out[str(p)] = {**entry, **extra}
    return [out[str(Path(p))] for p in images]
