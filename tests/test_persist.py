"""Saved heads: every head round-trips, and nothing in a models/ folder can make loading run code."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from featurecache import persist
from featurecache.config import check_path_name
from featurecache.errors import FeaturecacheError
from featurecache.fileio import file_sha256
from featurecache.heads import get_head_spec, list_heads
from featurecache.records import HEAD_KIND, HeadRecord

RECORD = HeadRecord(
    kind=HEAD_KIND, dataset="shapes", base="efficientnet_lite0", base_tag="efficientnet_lite0",
    weights="offline:efficientnet_lite0", layer="_blocks.2.add", tap={"key": "_blocks.2.add", "relative_depth": 0.2},
    head="logreg", head_spec="logreg", dense=False, class_names=("a", "b", "c"), features={}, params={},
    selection_val_accuracy=0.5, val={}, test={}, n_train=45,
)  # fmt: skip
RETRAIN = (
    "featurecache train-heads --dataset shapes --bases efficientnet_lite0 --layers _blocks.2.add --heads logreg "
    "--overwrite"
)


def fitted(name: str):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(45, 8)).astype(np.float32)
    y = np.repeat([0, 1, 2], 15)
    X[:, 0] += y  # learnable
    estimator = get_head_spec(name).build(0)
    if name == "mlp":
        estimator.set_params(max_epochs=3)
    return estimator.fit(X, y), X


class Plant:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(marker: Path) -> None:
    marker.touch()


def replace_head(model_dir: Path, name: str, data: bytes) -> None:
    """Put ``data`` in the model folder and make the sidecar's sha256 agree, as someone with write access could."""
    (model_dir / name).write_bytes(data)
    sidecar = json.loads((model_dir / persist.SIDECAR_FILE).read_text())
    sidecar["files"] = {name: file_sha256(model_dir / name)}
    (model_dir / persist.SIDECAR_FILE).write_text(json.dumps(sidecar))


@pytest.mark.parametrize("name", list_heads())
def test_every_head_round_trips_without_pickle(name, tmp_path):
    estimator, X = fitted(name)
    persist.save_head(tmp_path / name, estimator, RECORD)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
        [persist.HEAD_FILE, persist.SIDECAR_FILE] + ([persist.STATE_DICT_FILE] if name == "mlp" else [])
    )
    loaded, record = persist.load_head(tmp_path / name)
    assert type(loaded) is type(estimator) and record == dataclasses.replace(RECORD, files=record.files)
    np.testing.assert_array_equal(loaded.predict(X), estimator.predict(X))


def test_a_pickle_under_the_head_name_is_refused_unrun(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, RECORD)
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.HEAD_FILE, pickle.dumps(Plant(marker)))
    with pytest.raises(FeaturecacheError, match=r"not a readable skops head.*--overwrite"):
        persist.load_head(tmp_path)
    assert not marker.exists()


def test_a_skops_file_naming_a_foreign_function_is_refused_unbuilt(tmp_path):
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, RECORD)
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.HEAD_FILE, skops.io.dumps(FunctionTransformer(func=plant, kw_args={"marker": 1})))
    with pytest.raises(
        FeaturecacheError, match=r"names types featurecache does not trust \(tests\.test_persist\.plant"
    ):
        persist.load_head(tmp_path)
    assert not marker.exists()


def test_old_joblib_heads_are_refused_with_the_retrain_command(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, RECORD)
    (tmp_path / persist.HEAD_FILE).unlink()
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.LEGACY_HEAD_FILE, pickle.dumps(Plant(marker)))
    with pytest.raises(FeaturecacheError, match="pickled head from an older featurecache") as info:
        persist.load_head(tmp_path / persist.LEGACY_HEAD_FILE)
    assert RETRAIN in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_missing_head_says_missing_and_a_changed_one_says_replaced(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, RECORD)
    head = tmp_path / persist.HEAD_FILE
    head.write_bytes(head.read_bytes() + b"x")
    with pytest.raises(FeaturecacheError, match="does not match the sha256 in its sidecar; it was modified") as info:
        persist.load_head(tmp_path)
    assert RETRAIN in str(info.value) and "\n" not in str(info.value)
    head.unlink()
    with pytest.raises(FeaturecacheError) as info:
        persist.load_head(tmp_path)
    assert f"{head} is missing" in str(info.value) and RETRAIN in str(info.value)
    assert "modified or replaced" not in str(info.value) and "\n" not in str(info.value)


def test_a_sidecar_of_another_version_is_refused_with_the_retrain_command(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, RECORD)
    sidecar = json.loads((tmp_path / persist.SIDECAR_FILE).read_text())
    (tmp_path / persist.SIDECAR_FILE).write_text(json.dumps({**sidecar, "version": 1}))
    with pytest.raises(FeaturecacheError, match="is a version-1 sidecar; this featurecache reads version 2") as info:
        persist.load_head(tmp_path)
    assert RETRAIN in str(info.value)


def test_a_damaged_sidecar_is_one_line(tmp_path):
    (tmp_path / persist.SIDECAR_FILE).write_text("{not json")
    with pytest.raises(FeaturecacheError, match="not readable JSON"):
        persist.load_head(tmp_path)


def test_save_head_never_leaves_the_models_folder(tmp_path):
    estimator, _ = fitted("logreg")
    with pytest.raises(FeaturecacheError, match="'..' would leave the models folder"):
        persist.save_head(tmp_path / "models" / "d" / ".." / ".." / "x", estimator, RECORD)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "name", ["..", ".", "", "../../x", "a/b", "a\\b", ".hidden", "nul\0", "bad\udcffname", "x" * 256]
)
def test_names_that_would_become_unsafe_paths_are_refused(name):
    with pytest.raises(FeaturecacheError, match="cannot be used as a folder name"):
        check_path_name(name, what="layer key")


@pytest.mark.parametrize("name", ["_blocks.4.add", "layer3@grid2", "logreg+aug", "finetuned-mlp", "ÉtéDataset", "a b"])
def test_ordinary_names_pass(name):
    assert check_path_name(name) == name


def test_head_classes_are_exported_lazily():
    """``from featurecache.heads import DenseClassifier`` works, and importing the registry stays cheap."""
    import subprocess
    import sys

    from featurecache.heads import DenseClassifier, LogisticRegressionHead

    assert DenseClassifier.__module__ == "featurecache.heads.dense" and LogisticRegressionHead.__name__
    code = "import sys, featurecache.heads; print(sorted(m for m in ('torch', 'sklearn.base') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
