"""Saved heads: every head round-trips, and nothing in a models/ folder can make loading run code."""

from __future__ import annotations

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

SIDECAR = {"dataset": "shapes", "base_tag": "efficientnet_lite0", "layer": "_blocks.2.add", "head_spec": "logreg"}


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
    persist.save_head(tmp_path / name, estimator, dict(SIDECAR))
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
        [persist.HEAD_FILE, persist.SIDECAR_FILE] + ([persist.STATE_DICT_FILE] if name == "mlp" else [])
    )
    loaded, sidecar = persist.load_head(tmp_path / name)
    assert type(loaded) is type(estimator) and sidecar["layer"] == SIDECAR["layer"]
    np.testing.assert_array_equal(loaded.predict(X), estimator.predict(X))


def test_a_pickle_under_the_head_name_is_refused_unrun(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, dict(SIDECAR))
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.HEAD_FILE, pickle.dumps(Plant(marker)))
    with pytest.raises(FeaturecacheError, match=r"not a readable skops head.*--overwrite"):
        persist.load_head(tmp_path)
    assert not marker.exists()


def test_a_skops_file_naming_a_foreign_function_is_refused_unbuilt(tmp_path):
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, dict(SIDECAR))
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.HEAD_FILE, skops.io.dumps(FunctionTransformer(func=plant, kw_args={"marker": 1})))
    with pytest.raises(
        FeaturecacheError, match=r"names types featurecache does not trust \(tests\.test_persist\.plant"
    ):
        persist.load_head(tmp_path)
    assert not marker.exists()


def test_old_joblib_heads_are_refused_with_the_retrain_command(tmp_path):
    estimator, _ = fitted("logreg")
    persist.save_head(tmp_path, estimator, dict(SIDECAR))
    (tmp_path / persist.HEAD_FILE).unlink()
    marker = tmp_path.parent / "code-ran"
    replace_head(tmp_path, persist.LEGACY_HEAD_FILE, pickle.dumps(Plant(marker)))
    retrain = (
        "featurecache train-heads --dataset shapes --bases efficientnet_lite0 --layers _blocks.2.add --heads logreg "
        "--overwrite"
    )
    with pytest.raises(FeaturecacheError, match="pickled head from an older featurecache") as info:
        persist.load_head(tmp_path / persist.LEGACY_HEAD_FILE)
    assert retrain in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_damaged_sidecar_is_one_line(tmp_path):
    (tmp_path / persist.SIDECAR_FILE).write_text("{not json")
    with pytest.raises(FeaturecacheError, match="not readable JSON"):
        persist.load_head(tmp_path)


def test_save_head_never_leaves_the_models_folder(tmp_path):
    estimator, _ = fitted("logreg")
    with pytest.raises(FeaturecacheError, match="'..' would leave the models folder"):
        persist.save_head(tmp_path / "models" / "d" / ".." / ".." / "x", estimator, dict(SIDECAR))
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
