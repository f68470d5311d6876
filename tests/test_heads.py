"""Stage 2: every head is a scikit-learn estimator; selection never reads test; saved heads are faithful."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurecache import FeaturecacheError, load_features, read_metadata
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.heads import get_head_spec, list_heads
from featurecache.heads.classic import RBFSVMClassifier
from featurecache.heads.dense import DenseClassifier
from featurecache.leaderboard import leaderboard_rows, write_leaderboard
from featurecache.metrics import bootstrap_ci
from featurecache.persist import load_head
from featurecache.predict import predict_images
from featurecache.train import TrainOptions, feature_fingerprint, train_heads
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"
LAYERS = "features.6,flatten"
QUIET = TrainOptions(progress=False)


def _check_instances():
    for name in list_heads():
        head = get_head_spec(name).build(0)
        if isinstance(head, DenseClassifier):
            head.set_params(max_epochs=30, hidden_units=(32,))
        yield head
    yield RBFSVMClassifier(exact_max_samples=20, n_components=30)  # the Nystroem route too


@parametrize_with_checks(list(_check_instances()))
def test_heads_pass_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> tuple[Paths, Path]:
    """Features of a small generated dataset, extracted once for this module."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes",
                             per_class={"train": 14, "val": 5, "test": 5})  # fmt: skip
    paths = Paths(tmp_path_factory.mktemp("project"))
    extract(
        ExtractRequest(root, base=BASE, layers=LAYERS), paths=paths, options=ExtractOptions(workers=0, progress=False)
    )
    return paths, root


def fresh_copy(cached, tmp_path) -> Paths:
    paths, _ = cached
    shutil.copytree(paths.features, tmp_path / "data" / "features")
    return Paths(tmp_path)


def test_train_heads_writes_models_sidecars_and_leaderboard(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    sidecars = train_heads(dataset="shapes", base_tag=BASE, options=QUIET, paths=paths)
    # every single-layer head on both layers, plus multilayer once over both taps
    assert len(sidecars) == 2 * (len(list_heads()) - 1) + 1 and {s["status"] for s in sidecars} == {"trained"}
    s = next(x for x in sidecars if x["head"] == "logreg" and x["layer"] == "flatten")
    model_dir = paths.models / "shapes" / BASE / "flatten" / "logreg"
    assert (model_dir / "head.skops").is_file() and (model_dir / "sidecar.json").is_file()
    assert len(s["sweep"]) == 7 and s["params"] in [p["params"] for p in s["sweep"]]
    assert s["selection_val_accuracy"] == max(p["val_accuracy"] for p in s["sweep"])
    assert set(s["test"]) >= {"accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1", "confusion_matrix"}
    assert np.sum(s["test"]["confusion_matrix"]) == 15
    low, high = s["test"]["accuracy_ci95"]
    assert low <= s["test"]["accuracy"] <= high
    test_meta = read_metadata(paths.feature_file("shapes", BASE, "test"))
    assert s["features"]["test"]["fingerprint"] == feature_fingerprint(test_meta, "flatten")
    assert {"scikit-learn", "torch"} <= set(s["library_versions"]) and s["timings"]["total_seconds"] > 0
    mlp_dir = paths.models / "shapes" / BASE / "flatten" / "mlp"
    assert (mlp_dir / "state_dict.pt").is_file()

    best = write_leaderboard("shapes", paths)
    report = paths.reports / "shapes"
    rows = (report / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(sidecars)
    assert best["best"]["val_accuracy"] == max(x["selection_val_accuracy"] for x in sidecars)  # unrounded, as sidecars
    assert best["best_dense"]["head"] == "mlp"
    assert "| rank | base | layer |" in (report / "results.md").read_text()

    again = train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=QUIET, paths=paths)
    assert {x["status"] for x in again} == {"reused"}
    forced = TrainOptions(progress=False, overwrite=True)
    assert {x["status"] for x in train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=forced,
                                             paths=paths)} == {"trained"}  # fmt: skip


def test_heads_trained_on_features_re_extracted_since_are_left_out_naming_their_retrain(cached, tmp_path, caplog):
    from featurecache.finetune import _pick_head

    paths, root = fresh_copy(cached, tmp_path), cached[1]
    train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg", "knn"], options=QUIET,
                paths=paths)  # fmt: skip
    assert len(leaderboard_rows("shapes", paths)) == 2
    # Re-extracted as float32 (the cached features are float16 on every device): other numbers, a new fingerprint.
    extract(ExtractRequest(root, base=BASE, layers=LAYERS), paths=paths,
            options=ExtractOptions(workers=0, progress=False, dtype="float32"))  # fmt: skip
    with caplog.at_level("WARNING"):
        again = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=QUIET,
                            paths=paths)  # fmt: skip
        rows = leaderboard_rows("shapes", paths)
        with pytest.raises(FeaturecacheError, match="no trained 'knn' head"):  # fine-tuning never starts from it
            _pick_head("shapes", BASE, "knn", paths)
        knn = paths.head_dir("shapes", BASE, "flatten", "knn")
        assert len(predict_images(knn, [next((root / "test").rglob("*.png"))])) == 1  # usable, with a warning
    assert [s["status"] for s in again] == ["trained"]  # its old fit was on the old features
    assert [(r["layer"], r["head"]) for r in rows] == [("flatten", "logreg")]  # knn is stale: left out
    assert "was re-extracted after it was trained" in caplog.text
    assert "--layers flatten --heads knn --overwrite" in caplog.text and caplog.text.count("knn (") == 1
    assert "trained on features that changed since" in caplog.text


def test_several_stale_heads_get_one_warning_with_one_retrain_command(cached, tmp_path, caplog):
    paths, root = fresh_copy(cached, tmp_path), cached[1]
    train_heads(dataset="shapes", base_tag=BASE, layers=["features.6", "flatten"], heads=["logreg", "knn"],
                options=QUIET, paths=paths)  # fmt: skip
    extract(ExtractRequest(root, base=BASE, layers=LAYERS), paths=paths,
            options=ExtractOptions(workers=0, progress=False, dtype="float32"))  # fmt: skip
    with caplog.at_level("WARNING", logger="featurecache.freshness"):
        assert leaderboard_rows("shapes", paths) == []
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "featurecache.freshness"]
    assert warning.startswith("left out 4 heads trained on features that changed since (the first: ")
    assert warning.endswith(f"retrain them: featurecache train-heads --dataset shapes --bases {BASE} --layers "
                            "features.6,flatten --heads knn,logreg --overwrite")  # fmt: skip


def test_a_sidecar_of_another_version_is_left_to_its_reader_not_to_the_freshness_check(tmp_path):
    from featurecache.freshness import stale_reason

    assert stale_reason({"version": 1, "head": "logreg"}, Paths(tmp_path)) is None  # no KeyError before the refusal


def scores(sidecar: dict) -> list[tuple[str, float]]:
    """The sweep without its wall-clock timings."""
    return [(json.dumps(p["params"], sort_keys=True), p["val_accuracy"]) for p in sidecar["sweep"]]


def test_selection_never_reads_test(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    clean = train_heads(dataset="shapes", base_tag=BASE, heads=["logreg", "mlp", "knn"], options=QUIET, paths=paths)
    with h5py.File(paths.feature_file("shapes", BASE, "test"), "r+") as f:
        labels = f["labels"][:]
        f["labels"][:] = (labels + 1) % 3  # every test label is now wrong
    poisoned = train_heads(dataset="shapes", base_tag=BASE, heads=["logreg", "mlp", "knn"],
                           options=TrainOptions(progress=False, overwrite=True), paths=paths)  # fmt: skip
    for a, b in zip(clean, poisoned, strict=True):
        assert scores(a) == scores(b) and a["params"] == b["params"]
        assert a["selection_val_accuracy"] == b["selection_val_accuracy"]
        assert a["test"]["accuracy"] != b["test"]["accuracy"]  # test was used, but only after selection


def test_training_is_deterministic_with_a_seed(cached, tmp_path):
    runs = []
    for i in range(2):
        paths = fresh_copy(cached, tmp_path / str(i))
        runs.append(train_heads(dataset="shapes", base_tag=BASE, layers=["features.6"], heads=["mlp", "rbf_svm"],
                                options=QUIET, paths=paths))  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert scores(a) == scores(b) and a["params"] == b["params"]
        assert a["test"]["confusion_matrix"] == b["test"]["confusion_matrix"]


def test_saved_head_reloads_and_predicts_the_same(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    _, root = cached
    (s,) = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["mlp"], options=QUIET, paths=paths)
    model_dir = paths.models / "shapes" / BASE / "flatten" / "mlp"
    head, record = load_head(model_dir)
    X, y, meta = load_features(paths.feature_file("shapes", BASE, "test"), "flatten")
    cached_pred = head.predict(X.astype(np.float32))
    assert float((cached_pred == y).mean()) == s["test"]["accuracy"]
    # End to end: base + tap + head on the image files agrees with the head on the cached features.
    rows = predict_images(model_dir, [root / p for p in meta["paths"]])
    assert [r["label"] for r in rows] == [record.class_names[i] for i in cached_pred]
    assert all(0 < r["probability"] <= 1 for r in rows)


def test_predict_classifies_a_folder_and_reports_unreadable_files_without_losing_the_others(
    cached, tmp_path, monkeypatch, capsys
):  # fmt: skip
    from pipelines.cli import run

    paths = fresh_copy(cached, tmp_path / "home")
    _, root = cached
    train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=QUIET, paths=paths)
    model_dir = paths.models / "shapes" / BASE / "flatten" / "logreg"
    new = tmp_path / "new"
    shutil.copytree(root / "test", new)
    (new / "circle" / "notes.jpg").write_text("not a photo")
    images = sorted(p for p in new.rglob("*") if p.is_file())
    rows = predict_images(model_dir, images)
    assert [r["path"] for r in rows] == [str(p) for p in images]  # input order, the unreadable one in its place
    (bad,) = [r for r in rows if "error" in r]
    assert bad["path"].endswith("notes.jpg") and bad["error"].startswith("UnidentifiedImageError")
    assert all("label" in r for r in rows if r is not bad)
    monkeypatch.setenv("FEATURECACHE_HOME", str(paths.root))
    assert run(["predict", "--head", str(model_dir), str(new)]) == 1  # a folder: every file below it
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(images) - 1 and "notes.jpg\tunreadable: UnidentifiedImageError" in err
    (tmp_path / "empty").mkdir()
    assert run(["predict", "--head", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "holds no files to classify" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would wait for a writer for ever
    assert run(["predict", "--head", str(model_dir), str(tmp_path / "pipe.jpg")]) == 2
    assert "pipe.jpg is not a file (a pipe, socket or device)" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "empty")  # the README's relative --head, run outside the home
    assert predict_images(model_dir.relative_to(paths.root), images) == rows
    with pytest.raises(FeaturecacheError, match=r"no folder models/shapes/nope .*under FEATURECACHE_HOME"):
        predict_images("models/shapes/nope", images)


def test_a_knn_head_reports_its_neighbours_vote_share_not_a_probability(cached, tmp_path, monkeypatch, capsys):
    """k-NN's predict_proba is a vote share: with k = 1 it printed p=1.000 for every image, unseen classes too."""
    from pipelines.cli import run

    paths, root = fresh_copy(cached, tmp_path), cached[1]
    (s,) = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["knn"], options=QUIET, paths=paths)
    images = sorted(p for p in (root / "test").rglob("*.png"))[:3]
    rows = predict_images(paths.models / "shapes" / BASE / "flatten" / "knn", images)
    k = s["params"]["n_neighbors"]
    assert all("probability" not in r and 0 < r["vote_share"] <= 1 and r["neighbours"] == k for r in rows)
    monkeypatch.setenv("FEATURECACHE_HOME", str(paths.root))
    assert run(["predict", "--head", str(paths.models / "shapes" / BASE / "flatten" / "knn"), str(images[0])]) == 0
    assert f" of {k} neighbour" in capsys.readouterr().out


def test_foreign_or_stale_heads_are_refused(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=QUIET, paths=paths)
    model_dir = paths.models / "shapes" / BASE / "flatten" / "logreg"
    with pytest.raises(FeaturecacheError, match=r"trained on other features.*\(test changed\)"):
        load_head(model_dir, expect_features={"test": "something-else"})
    (model_dir / "head.skops").write_bytes(b"not ours")
    with pytest.raises(FeaturecacheError, match="does not match the sha256"):
        load_head(model_dir)
    with pytest.raises(FeaturecacheError, match="not a head saved by featurecache"):
        load_head(tmp_path)


def test_missing_cache_says_run_extract(tmp_path):
    with pytest.raises(
        FeaturecacheError, match=r"extract it first: `featurecache extract path/to/shapes --base resnet18`"
    ):
        train_heads(dataset="shapes", base_tag="resnet18", options=QUIET, paths=Paths(tmp_path))
    with pytest.raises(
        FeaturecacheError, match=r"first: `featurecache extract path/to/shapes --base resnet18 --weights none`"
    ):
        train_heads(dataset="shapes", base_tag="resnet18-random", options=QUIET, paths=Paths(tmp_path))


def test_larger_than_memory_streams_the_dense_head_and_refuses_the_rest(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    tiny_budget = TrainOptions(progress=False, max_memory_gb=1e-6)
    (s,) = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["mlp"], options=tiny_budget,
                       paths=paths)  # fmt: skip
    assert s["streamed"] and s["test"]["accuracy"] > 0.5
    with pytest.raises(FeaturecacheError, match=r"needs about .* GiB in memory for head 'logreg'.*--heads mlp"):
        train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=tiny_budget,
                    paths=paths)  # fmt: skip


def test_a_streamed_split_refits_on_train_plus_val_and_releases_the_cache(cached, tmp_path):
    """Streamed train rows are read whole for the train+val refit (every train and val row), then the HDF5 files
    the chunk loaders held are closed: the caches can be opened for writing again."""
    paths = fresh_copy(cached, tmp_path)
    options = TrainOptions(progress=False, max_memory_gb=1e-6, refit="train+val")
    (s,) = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["mlp"], options=options,
                       paths=paths)  # fmt: skip
    assert s["streamed"] and s["refit"] == "train+val" and s["test"]["accuracy"] > 0.5
    train_file = paths.feature_file("shapes", BASE, "train")
    assert s["n_train"] == read_metadata(train_file)["num_valid"]
    with h5py.File(train_file, "r+"):  # refused while any reader still holds the file
        pass


def test_streamed_fit_matches_in_memory_statistics():
    rng = np.random.default_rng(0)
    X = rng.normal(3, 2, (300, 5)).astype(np.float32)
    y = (X[:, 0] > 3).astype(int)
    chunks = [lambda a=a: (X[a : a + 64], y[a : a + 64]) for a in range(0, 300, 64)]
    streamed = DenseClassifier(max_epochs=5).fit_stream(chunks, classes=np.array([0, 1]), n_features=5)
    np.testing.assert_allclose(streamed.mean_, X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(streamed.scale_, X.std(0), rtol=1e-4)


def test_rbf_svm_switches_to_nystroem_for_large_n():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8))
    y = (np.linalg.norm(X, axis=1) > 2.7).astype(int)  # not linearly separable
    exact = RBFSVMClassifier(C=10).fit(X, y)
    approx = RBFSVMClassifier(C=10, exact_max_samples=100, n_components=200).fit(X, y)
    assert exact.route_ == "exact" and approx.route_ == "nystroem"
    assert (approx.predict(X) == y).mean() > 0.9


def test_bootstrap_interval_matches_the_normal_approximation():
    correct = np.r_[np.ones(320), np.zeros(80)]  # accuracy 0.8 on 400 items
    low, high = bootstrap_ci(correct, n_resamples=4000, seed=1)
    half_width = 1.96 * np.sqrt(0.8 * 0.2 / 400)  # 0.0392
    assert abs(low - (0.8 - half_width)) < 0.006 and abs(high - (0.8 + half_width)) < 0.006
    assert bootstrap_ci(correct, seed=3) == bootstrap_ci(correct, seed=3)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_warm_path_matches_cold_scikit_learn_fits(n_classes):
    from featurecache.heads import LOGREG_C_GRID
    from featurecache.heads.classic import LogisticRegressionHead, logreg_warm_path

    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, 400)
    X = (rng.normal(size=(n_classes, 300))[y] + rng.normal(scale=3.0, size=(400, 300))).astype(np.float32)
    grid = [{"C": c} for c in LOGREG_C_GRID]
    path = logreg_warm_path(X[:300], y[:300], X[300:], y[300:], grid, seed=0)
    for (params, head, val_accuracy, _), point in zip(path, grid, strict=True):
        assert params == point and isinstance(head, LogisticRegressionHead)
        cold = LogisticRegressionHead(C=point["C"], max_iter=5000).fit(X[:300], y[:300])
        agree = (head.predict(X[300:]) == cold.predict(X[300:])).mean()
        assert agree >= 0.98, (point, agree)
        assert abs(val_accuracy - (cold.predict(X[300:]) == y[300:]).mean()) <= 0.02
        np.testing.assert_allclose(head.predict_proba(X[300:]).sum(1), 1, rtol=1e-5)


def test_grid_points_tied_on_val_accuracy_go_to_the_lower_val_log_loss():
    """On an easy split every C reaches 100% val; the first (C = 1e-4) gave ~1/K probabilities to images it got
    right, so predict printed p = 0.26 for a 5-class head that never erred."""
    from featurecache.heads import LOGREG_C_GRID
    from featurecache.heads.classic import logreg_warm_path
    from featurecache.selection import best_grid_point, sweep_record

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 36)
    X = (rng.normal(size=(5, 256))[y] + rng.normal(size=(180, 256))).astype(np.float32)
    train, val = np.arange(180) % 6 != 0, np.arange(180) % 6 == 0
    fitted = logreg_warm_path(X[train], y[train], X[val], y[val], [{"C": c} for c in LOGREG_C_GRID], seed=0)
    sweep = sweep_record(fitted, X[val], y[val])
    assert {p["val_accuracy"] for p in sweep} == {1.0}  # every point ties on accuracy
    losses = [p["val_log_loss"] for p in sweep]
    kept = best_grid_point(sweep)
    assert losses[kept] == min(losses) and sweep[kept]["params"]["C"] >= 1.0
    assert fitted[kept][1].predict_proba(X[val]).max(axis=1).mean() > 0.9
    # accuracy still decides first; without probabilities (the SVMs) the earlier of equal points stays
    assert best_grid_point([{"val_accuracy": 0.9, "val_log_loss": 0.1}, {"val_accuracy": 0.95, "val_log_loss": 2}]) == 1
    assert best_grid_point([{"val_accuracy": 0.9}, {"val_accuracy": 0.9}]) == 0
    nan = float("nan")  # a diverged fit's loss never wins a tie, in either order
    assert best_grid_point([{"val_accuracy": 0.9, "val_log_loss": nan}, {"val_accuracy": 0.9, "val_log_loss": 5}]) == 1
    assert best_grid_point([{"val_accuracy": 0.9, "val_log_loss": 5}, {"val_accuracy": 0.9, "val_log_loss": nan}]) == 0
    assert str(sweep_record(fitted[:1], X[train][:5], y[train][:5])[0]["val_log_loss"])[0] != "-"  # never -0.0


def test_a_trained_head_keeps_the_tied_grid_point_with_the_lowest_val_log_loss(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    for s in train_heads(dataset="shapes", base_tag=BASE, heads=["logreg", "knn"], options=QUIET, paths=paths):
        top = max(p["val_accuracy"] for p in s["sweep"])
        tied = [p for p in s["sweep"] if p["val_accuracy"] == top]
        if s["head"] == "knn":  # a vote share is no probability: no log loss, the earlier of equal points
            assert all("val_log_loss" not in p for p in s["sweep"]) and s["params"] == tied[0]["params"]
        else:
            assert s["params"] == min(tied, key=lambda p: p["val_log_loss"])["params"]


def leaderboard_without_timings(paths: Paths) -> list[dict]:
    rows = leaderboard_rows("shapes", paths)
    return [{k: v for k, v in r.items() if k not in ("fit_seconds", "model_dir")} for r in rows]


@pytest.mark.slow
def test_dask_backend_gives_the_loky_leaderboard(cached, tmp_path):
    pytest.importorskip("dask.distributed")
    boards = {}
    for backend in ("loky", "dask"):
        paths = fresh_copy(cached, tmp_path / backend)
        options = TrainOptions(progress=False, n_jobs=2, backend=backend)
        sidecars = train_heads(dataset="shapes", base_tag=BASE, options=options, paths=paths)
        assert len(sidecars) == 2 * (len(list_heads()) - 1) + 1  # multilayer: once over both taps
        best = write_leaderboard("shapes", paths)
        boards[backend] = (leaderboard_without_timings(paths), {k: v for k, v in best["best"].items() if k not in
                                                                ("fit_seconds", "model_dir")})  # fmt: skip
    assert boards["dask"] == boards["loky"]


def test_unknown_or_missing_backend_says_what_to_install(cached, tmp_path, monkeypatch):
    paths = fresh_copy(cached, tmp_path)
    with pytest.raises(FeaturecacheError, match="choose one of: loky, dask, ray"):
        train_heads(dataset="shapes", base_tag=BASE, options=TrainOptions(backend="spark"), paths=paths)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if ray were not installed
    with pytest.raises(FeaturecacheError, match=r"pip install 'featurecache\[ray\]'"):
        train_heads(dataset="shapes", base_tag=BASE, heads=["knn"], options=TrainOptions(backend="ray",
                    progress=False), paths=paths)  # fmt: skip


def test_dense_head_restores_the_epoch_of_lowest_val_loss_among_equally_accurate_ones():
    """Easy data: val accuracy reaches 100% in an early epoch and stays. Keeping the first such epoch restored tiny
    logits (a 4-class head right on 94% of test printed p = 0.39 on average); the lower val loss now decides."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    X = (rng.normal(size=(4, 64))[y] * 3 + rng.normal(size=(200, 64))).astype(np.float32)
    head = DenseClassifier(hidden_units=(32,), max_epochs=30, patience=10).fit(
        X[:160], y[:160], eval_set=(X[160:], y[160:])
    )
    history = head.history_
    top = max(h["val_accuracy"] for h in history)
    tied = [h for h in history if h["val_accuracy"] == top]
    assert len(tied) > 1 and head.best_epoch_ == min(tied, key=lambda h: h["val_loss"])["epoch"]
    assert head.best_epoch_ != tied[0]["epoch"]  # not simply the first epoch to reach it
    assert head.predict_proba(X[160:]).max(axis=1).mean() > 0.9


def test_dense_head_fits_on_its_own_thread_count_and_restores_the_process_setting():
    import torch

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 64)).astype(np.float32)
    y = (X[:, :3].sum(1) > 0).astype(int)
    before = torch.get_num_threads()
    fits = []
    try:
        for process_threads in (1, 2):
            torch.set_num_threads(process_threads)
            head = DenseClassifier(hidden_units=(32,), max_epochs=5).fit(X[:150], y[:150], eval_set=(X[150:], y[150:]))
            assert torch.get_num_threads() == process_threads  # restored after the fit
            fits.append(head)
    finally:
        torch.set_num_threads(before)
    # Fitted on one thread whatever the process allows, so the numbers do not depend on the job layout.
    assert fits[0].history_ == fits[1].history_
    np.testing.assert_array_equal(fits[0].predict_proba(X), fits[1].predict_proba(X))


def test_refit_on_train_plus_val_keeps_the_dense_heads_device(cached, tmp_path, monkeypatch):
    """The train+val refit of the dense head runs on --device like the sweep (it used to drop it)."""
    from featurecache.heads.dense import DenseClassifier

    devices = []
    fit = DenseClassifier.fit

    def recording_fit(self, X, y, **kwargs):
        devices.append(self.device)
        return fit(self, X, y, **kwargs)

    monkeypatch.setattr(DenseClassifier, "fit", recording_fit)
    options = TrainOptions(progress=False, refit="train+val", device="cpu:0")
    train_heads(dataset="shapes", base_tag=BASE, heads=["mlp"], layers=["flatten"], options=options,
                paths=fresh_copy(cached, tmp_path))  # fmt: skip
    assert devices and set(devices) == {"cpu:0"}  # every fit, the refit included, got the requested device


@pytest.mark.parametrize(
    "base, weights, layers, stage, logits",
    [
        ("efficientnet_lite0", "default", "_blocks.2.add,logits", "_blocks.2.add", "_fc"),  # the spec names _fc
        ("resnet18", "none", "layer1,fc", "layer1", "fc"),  # torchvision: the last node, asked for by its name
    ],
)
def test_the_imagenet_logits_get_heads_only_when_asked(tmp_path, caplog, base, weights, layers, stage, logits):
    root = make_image_folder(tmp_path / "shapes", per_class={"train": 4, "val": 2, "test": 2})
    paths = Paths(tmp_path / "home")
    request = ExtractRequest(root, base=base, weights=weights, layers=layers)
    tag = extract(request, paths=paths, options=ExtractOptions(progress=False, runtime="eager"))[0].path.parent.name
    assert read_metadata(paths.feature_file("shapes", tag, "train"))["taps"][logits]["imagenet_logits"] is True
    with caplog.at_level("INFO", logger="featurecache.train"):
        default = train_heads(dataset="shapes", base_tag=tag, heads=["logreg"], options=QUIET, paths=paths)
    assert [s["layer"] for s in default] == [stage]
    assert f"leaving out the ImageNet logits tap {logits}" in caplog.text
    asked = train_heads(dataset="shapes", base_tag=tag, layers=[logits], heads=["logreg"], options=QUIET, paths=paths)
    assert [s["layer"] for s in asked] == [logits]


def test_the_imagenet_logits_are_what_the_cache_records_or_for_an_older_cache_the_1000_wide_last_tap():
    from featurecache.store import imagenet_logits_key, is_imagenet_logits
    from featurecache.train import _multi_tap_jobs

    stage = {"relative_depth": 0.5, "out_dim": 64}
    headless_last = {"relative_depth": 1.0, "out_dim": 1280}  # a headless base's pooled output: every op done
    old_logits = {"relative_depth": 1.0, "out_dim": 1000}  # written before caches recorded the logits
    assert [is_imagenet_logits(t) for t in (stage, headless_last, old_logits)] == [False, False, True]
    assert is_imagenet_logits({**headless_last, "imagenet_logits": True})  # the record wins over the shape
    assert not is_imagenet_logits({**old_logits, "imagenet_logits": False})
    assert imagenet_logits_key({"taps": {"a": stage, "fc": old_logits}}) == "fc"
    assert imagenet_logits_key({"taps": {"a": stage, "pool": headless_last}}) is None
    # a multi-tap head reads every stage: the headless base's last one too, never the logits
    meta = {"taps": {"a": stage, "pool": headless_last, "fc": old_logits}}
    jobs = _multi_tap_jobs(["a", "pool", "fc"], ["multilayer"], meta, lambda layer, head, taps: taps)
    assert jobs == [("a", "pool")]


def test_a_moved_home_keeps_its_heads_and_predict_writes_only_into_the_home_it_runs_in(cached, tmp_path, monkeypatch):
    old = fresh_copy(cached, tmp_path / "old")
    _, root = cached
    first = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=QUIET,
                        paths=old)  # fmt: skip
    images = sorted((root / "test").rglob("*.png"))[:3]
    new = Paths(tmp_path / "new")
    shutil.move(old.root, new.root)
    monkeypatch.setenv("FEATURECACHE_HOME", str(new.root))
    again = train_heads(dataset="shapes", base_tag=BASE, layers=["flatten"], heads=["logreg"], options=QUIET,
                        paths=new)  # fmt: skip
    assert [s["status"] for s in again] == ["reused"] and again[0]["test"] == first[0]["test"]
    from featurecache.answer import head_results

    (result,) = head_results("shapes", BASE, new)  # scored against the labels of the caches where they are now
    assert result.test_accuracy == first[0]["test"]["accuracy"]
    rows = predict_images(new.head_dir("shapes", BASE, "flatten", "logreg"), images)
    assert all("label" in r for r in rows)
    assert not old.root.exists()  # nothing re-created where the sidecar says the home used to be
    assert list((new.features / "shapes" / BASE / "exports").glob("*.onnx"))  # the export sits in the new home


def test_a_mistyped_dataset_base_or_layer_is_answered_with_what_is_cached(cached, tmp_path):
    paths = fresh_copy(cached, tmp_path)
    with pytest.raises(FeaturecacheError, match=r"no caches of a dataset 'shapez'.*did you mean: shapes\?"):
        train_heads(dataset="shapez", base_tag=BASE, options=QUIET, paths=paths)
    typo = "mobilenet_v2_ofline"
    with pytest.raises(FeaturecacheError, match=rf"no caches of '{typo}' for shapes; did you mean: {BASE}"):
        train_heads(dataset="shapes", base_tag=typo, options=QUIET, paths=paths)
    with pytest.raises(FeaturecacheError, match=r"layer flaten is cached in no split .*; did you mean: flatten\?"):
        train_heads(dataset="shapes", base_tag=BASE, layers=["flaten"], options=QUIET, paths=paths)


def test_a_seed_numpy_cannot_take_is_refused_by_train_heads_and_compare_before_any_work(cached, tmp_path):
    """A library call with seed -1: logreg saved a head recording it, linear_svm failed inside scikit-learn."""
    from featurecache.compare import CompareOptions

    paths = fresh_copy(cached, tmp_path)
    with pytest.raises(FeaturecacheError, match=r"--seed -1 is out of range"):
        train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=TrainOptions(seed=-1), paths=paths)
    assert not paths.models.exists()
    with pytest.raises(FeaturecacheError, match=r"--seed 4294967296 is out of range"):
        CompareOptions(seed=2**32).check()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TrainOptions(n_jobs=0), r"--n-jobs 0: give a number of parallel jobs"),
        (TrainOptions(max_memory_gb=-1), r"--max-memory-gb -1: must be above 0"),
    ],
)
def test_sweep_options_no_run_can_use_are_refused_in_one_line(cached, tmp_path, options, message):
    """--n-jobs 0 ended in a joblib traceback; --max-memory-gb -1 refused every head for needing 0.0 GiB."""
    from featurecache.compare import CompareOptions

    paths = fresh_copy(cached, tmp_path)
    with pytest.raises(FeaturecacheError, match=message):
        train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=options, paths=paths)
    with pytest.raises(FeaturecacheError, match=message):
        CompareOptions(train=options).check()
