"""Saving and loading heads through persist's API (save_head / load_head / read_sidecar), whatever the file format."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from featurecache import persist
from featurecache.errors import FeaturecacheError
from featurecache.heads import DenseClassifier, LogisticRegressionHead

FEATURES = {"train": {"fingerprint": "abc:layer"}, "val": {"fingerprint": "def:layer"}}


def toy_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(60) % 3
    return (rng.normal(size=(60, 5)) + y[:, None]).astype(np.float32), y


@pytest.mark.parametrize(
    "make", [lambda: LogisticRegressionHead(C=1.0), lambda: DenseClassifier(max_epochs=3, random_state=0)]
)
def test_round_trip_predicts_the_same(tmp_path, make):
    X, y = toy_data()
    head = make().fit(X, y)
    persist.save_head(tmp_path / "h", head, {"head": "toy", "features": FEATURES, "params": {"C": 1.0}})
    sidecar = persist.read_sidecar(tmp_path / "h")
    assert sidecar["head"] == "toy" and sidecar["params"] == {"C": 1.0} and sidecar["features"] == FEATURES
    loaded, sidecar_again = persist.load_head(tmp_path / "h", expect_features={"train": "abc:layer"})
    assert sidecar_again == sidecar
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=0, atol=1e-6)


def test_what_was_not_saved_by_featurecache_is_refused(tmp_path):
    assert persist.read_sidecar(tmp_path) is None
    with pytest.raises(FeaturecacheError, match="not a head saved by featurecache"):
        persist.load_head(tmp_path)
    X, y = toy_data()
    persist.save_head(tmp_path / "h", LogisticRegressionHead().fit(X, y), {"head": "toy", "features": FEATURES})
    with pytest.raises(FeaturecacheError, match="trained on other features .*train changed.*--overwrite"):
        persist.load_head(tmp_path / "h", expect_features={"train": "other:layer"})
    for path in (tmp_path / "h").iterdir():  # change any model file, whatever the format: refused, not loaded
        if path.name != persist.SIDECAR_FILE:
            path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(FeaturecacheError):
        persist.load_head(tmp_path / "h")


def test_head_classes_are_exported_lazily():
    """``from featurecache.heads import DenseClassifier`` works, and importing the registry stays cheap."""
    code = "import sys, featurecache.heads; print(sorted(m for m in ('torch', 'sklearn.base') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
