"""The layer-comparison report and the training-free transferability score."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from featurecache.config import Paths
from featurecache.extract import ExtractOptions, extract
from featurecache.report import build_report, imagenet_distance, layer_points, spearman
from featurecache.train import TrainOptions, train_heads
from featurecache.transferability import logme
from tests.helpers import make_image_folder


def logme_example() -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(42)
    y = rng.integers(0, 4, 120)
    centers = rng.normal(size=(4, 16))
    tall = centers[y] + rng.normal(scale=1.5, size=(120, 16))
    wide = np.hstack([tall, rng.normal(size=(120, 200))])
    noise = rng.normal(size=(120, 16))
    return {"tall": tall, "wide": wide, "noise": noise}, y


# LogME of the fixed example above as computed by the authors' reference implementation (thuml/LogME,
# LogME.py, fixed-point solver), run once outside this repository.
REFERENCE_LOGME = {"tall": -0.47443043669323565, "wide": 2.392593536125453, "noise": -0.7150287401825609}


@pytest.mark.parametrize("case", ["tall", "wide", "noise"])
def test_logme_agrees_with_the_reference_implementation(case):
    features, y = logme_example()
    assert logme(features[case], y) == pytest.approx(REFERENCE_LOGME[case], rel=1e-9)


def test_logme_prefers_informative_features():
    features, y = logme_example()
    assert logme(features["tall"], y) > logme(features["noise"], y)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2], [1, 2]))


BASE = "mobilenet_v2_offline"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 10, "val": 4, "test": 4})
    paths = Paths(tmp_path_factory.mktemp("project"))
    opts = ExtractOptions(workers=0, progress=False, dtype="float32")
    layers = "features.3,features.10,flatten"
    extract(root, base=BASE, layers=layers, paths=paths, options=opts)
    extract(root, base=BASE, layers=layers, paths=paths, options=opts, weights="none")
    extract(root, base="efficientnet_lite0", layers="logits", paths=paths, options=opts)
    quiet = TrainOptions(progress=False)
    for tag in (BASE, f"{BASE}-random"):
        train_heads(dataset="shapes", base_tag=tag, heads=["logreg", "knn"], options=quiet, paths=paths)
    return paths


def test_report_files_and_numbers_match_the_sidecars(trained):
    paths = trained
    summary = build_report(["shapes"], [BASE], paths, heads=["logreg", "knn"], licenses={"shapes": "CC0"})
    out = paths.reports / "compare"
    png = (out / "accuracy_vs_depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    md = (out / "report.md").read_text()
    assert "Recommended layer (chosen on val)" in md and "Reading the curves" in md and "shapes × " in md

    (curve,) = summary["curves"]
    assert curve["base"] == BASE
    points = {p["layer"]: p for p in curve["points"]}
    assert set(points) == {"features.3", "features.10", "flatten"}
    for layer, point in points.items():
        sidecars = {
            h: json.loads((paths.models / "shapes" / BASE / layer / h / "sidecar.json").read_text())
            for h in ("logreg", "knn")
        }
        chosen = max(sidecars.values(), key=lambda s: s["selection_val_accuracy"])
        assert point["val_accuracy"] == chosen["selection_val_accuracy"]
        assert point["test_accuracy"] == sidecars[point["head"]]["test"]["accuracy"]
        assert [point["ci_low"], point["ci_high"]] == sidecars[point["head"]]["test"]["accuracy_ci95"]
        assert point["logme"] is not None
    rec = curve["recommended"]
    assert rec["val_accuracy"] == max(p["val_accuracy"] for p in points.values())
    assert curve["oracle"]["test_accuracy"] == max(p["test_accuracy"] for p in points.values())
    assert curve["gap_points"] == pytest.approx(100 * (curve["oracle"]["test_accuracy"] - rec["test_accuracy"]))
    assert curve["random_init"] is not None

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 3 * 2  # (pretrained + control) x layers x heads
    assert sum(r["selected_head_at_layer"] == "True" for r in rows) == 6


def test_imagenet_distance_from_cached_logits(trained):
    d = imagenet_distance("shapes", trained)
    assert 0 < d["confidence"] < 1 and d["distance"] == pytest.approx(1 - d["confidence"])
    assert 1 <= d["classes_used"] <= 1000
    assert imagenet_distance("nothing-here", trained) is None


def test_layer_points_choose_by_val_not_test(trained):
    pts = layer_points("shapes", BASE, trained, heads=["logreg", "knn"], with_logme=False)
    assert sorted(p.layer for p in pts) == ["features.10", "features.3", "flatten"]  # an empty result fails
    for p in pts:
        assert set(p.heads) == {"logreg", "knn"}
        assert p.val_accuracy == max(v for v, _ in p.heads.values())
        assert p.heads[p.head] == (p.val_accuracy, p.test_accuracy)  # the chosen head's own test score
