"""Cached augmented views (extract --train-views K) and heads trained with them (train-heads --augmented)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from featurecache import FeaturecacheError, load_features, read_metadata
from featurecache.augment import SeededPerRow, train_transform
from featurecache.bases import get_base_spec
from featurecache.config import Paths
from featurecache.data import AUGMENTED_TRAIN, ImageFiles, augmented_views, discover_splits
from featurecache.decoders import DecodeThreads
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.leaderboard import leaderboard_rows
from featurecache.report import build_report
from featurecache.selection import pick_best
from featurecache.train import TrainOptions, train_heads
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"
LAYERS = "features.10,flatten"
VIEWS = 2


@pytest.fixture(scope="module")
def with_views(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 6, "val": 3, "test": 3})
    paths = Paths(tmp_path_factory.mktemp("project"))
    opts = ExtractOptions(workers=0, progress=False, dtype="float32", batch_size=8)
    results = extract(ExtractRequest(root, base=BASE, layers=LAYERS, train_views=VIEWS), paths=paths, options=opts)
    return root, paths, results


def test_views_are_cached_view_major_with_their_recipe(with_views):
    root, paths, results = with_views
    assert [r.split for r in results] == ["train", "val", "test", AUGMENTED_TRAIN]
    train_file, views_file = (paths.feature_file("shapes", BASE, s) for s in ("train", AUGMENTED_TRAIN))
    meta = read_metadata(views_file)
    n = read_metadata(train_file)["num_samples"]
    assert meta["num_samples"] == VIEWS * n and meta["views"] == VIEWS and meta["source_rows"] == n
    assert meta["augment"] == "light" and "RandomResizedCrop" in meta["transforms"]
    assert meta["data_fingerprint"] == read_metadata(train_file)["data_fingerprint"]  # the same files
    X, y, m = load_features(train_file, "flatten")
    V, yv, mv = load_features(views_file, "flatten")
    assert (yv == np.tile(y, VIEWS)).all() and mv["paths"].tolist() == m["paths"].tolist() * VIEWS
    first, second = V[:n], V[n:]
    assert not np.allclose(first, X) and not np.allclose(first, second)  # each view is a different augmentation
    # ...of the same image: a view is nearer its own image's plain features than the average other image's.
    dist = np.linalg.norm(first[:, None] - X[None], axis=2)
    assert (np.diag(dist) < dist.mean(axis=1)).mean() > 0.8


def test_views_do_not_depend_on_batching_workers_or_order(with_views, tmp_path):
    root, paths, _ = with_views
    other = Paths(tmp_path)
    opts = ExtractOptions(workers=1, progress=False, dtype="float32", batch_size=3)
    extract(
        ExtractRequest(root, base=BASE, layers="flatten", train_views=VIEWS, splits=["train"]),
        paths=other,
        options=opts,
    )
    a = load_features(paths.feature_file("shapes", BASE, AUGMENTED_TRAIN), "flatten")[0]
    b = load_features(other.feature_file("shapes", BASE, AUGMENTED_TRAIN), "flatten")[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # same pixels; batch size moves float32 by ulps only

    spec = get_base_spec(BASE)
    train = discover_splits(root)["train"]
    views = SeededPerRow(train_transform(spec.transforms(), spec.input_size, "light"), seed=0)
    data = ImageFiles(augmented_views(train, VIEWS), views, input_size=spec.input_size, rows=range(2 * len(train)))
    state = torch.random.get_rng_state()
    again = [data[i][0] for i in reversed(range(len(data)))][::-1]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for i in range(len(data)):
        assert torch.equal(data[i][0], again[i])  # view v of image i is the same pixels in any order
    # ... and from several decode threads at once (extraction's CPU default), which share torch's generator
    threaded = DecodeThreads(data, [(i, i + 1) for i in range(len(data))], threads=4, ahead=2)
    assert all(torch.equal(batch[0][0], again[i]) for i, batch in enumerate(threaded))


def test_views_are_a_cache_hit_and_change_with_their_recipe(with_views):
    root, paths, _ = with_views
    opts = ExtractOptions(workers=0, progress=False, dtype="float32", batch_size=8)
    again = extract(ExtractRequest(root, base=BASE, layers=LAYERS, train_views=VIEWS), paths=paths, options=opts)
    assert {r.status for r in again} == {"cached"}
    views_file = paths.feature_file("shapes", BASE, AUGMENTED_TRAIN)
    with pytest.raises(FeaturecacheError, match="--augment must be one of"):
        extract(
            ExtractRequest(root, base=BASE, layers=LAYERS, train_views=VIEWS, augment="none"), paths=paths, options=opts
        )
    with pytest.raises(FeaturecacheError, match="--train-views must be 0"):
        extract(ExtractRequest(root, base=BASE, layers=LAYERS, train_views=-1), paths=paths, options=opts)
    assert read_metadata(views_file)["views"] == VIEWS


def test_heads_train_with_the_views_and_the_report_compares_them(with_views, tmp_path):
    _, cached, _ = with_views
    paths = Paths(tmp_path)
    import shutil

    shutil.copytree(cached.features, paths.features)
    quiet = TrainOptions(progress=False)
    plain = train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=quiet, paths=paths)
    aug = train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], paths=paths,
                      options=TrainOptions(progress=False, augmented=True))  # fmt: skip
    for p, a in zip(plain, aug, strict=True):
        assert a["head"] == "logreg+aug" and a["head_spec"] == "logreg" and a["train_views"] == VIEWS
        assert a["n_train"] == (1 + VIEWS) * p["n_train"]
        assert AUGMENTED_TRAIN in a["features"] and AUGMENTED_TRAIN not in p["features"]
        assert (paths.models / "shapes" / BASE / a["layer"] / "logreg+aug" / "head.skops").is_file()
    heads = {r["head"] for r in leaderboard_rows("shapes", paths)}
    assert heads == {"logreg", "logreg+aug"}

    build_report(["shapes"], [BASE], paths)
    summary = json.loads((paths.compare_dir("shapes") / "summary.json").read_text())
    assert {p["head"] for p in summary["curves"][BASE]} == {"logreg"}  # curves stay plain frozen heads
    (row,) = summary["beyond_frozen"]
    best = pick_best(aug)
    assert row["route"] == "augmented views" and row["head"] == "logreg+aug" and row["layer"] == best["layer"]
    frozen = next(p for p in plain if p["layer"] == row["layer"])
    gain, low, high = row["gain"]
    assert gain == pytest.approx(best["test"]["accuracy"] - frozen["test"]["accuracy"])
    assert low <= gain <= high and row["frozen"]["head"] == "logreg"
    assert "Beyond frozen features" in (paths.compare_dir("shapes") / "report.md").read_text()


def test_augmented_heads_without_views_say_how_to_make_them(with_views, tmp_path):
    _, cached, _ = with_views
    paths = Paths(tmp_path)
    import shutil

    shutil.copytree(cached.features, paths.features)
    paths.feature_file("shapes", BASE, AUGMENTED_TRAIN).unlink()
    with pytest.raises(FeaturecacheError, match="--train-views 4"):
        train_heads(dataset="shapes", base_tag=BASE, options=TrainOptions(augmented=True), paths=paths)
    with h5py.File(paths.feature_file("shapes", BASE, "train"), "r") as f:
        assert "features" in f  # the plain caches are untouched
