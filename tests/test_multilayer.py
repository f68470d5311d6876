"""The multilayer head: a scikit-learn estimator that selects features across taps; trained by train-heads on
every stage tap of a base and saved under the all-stages pseudo layer."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurecache.config import Paths
from featurecache.heads import get_head_spec
from featurecache.heads.multilayer import MultiLayerHead, multilayer_sweep
from featurecache.layer_scores import multilayer_vs_best_single, selected_heads
from featurecache.leaderboard import leaderboard_rows
from featurecache.persist import load_head
from featurecache.store import load_features, read_metadata
from featurecache.train import MULTI_TAP_LAYER, TrainOptions, train_heads
from tests.test_layer_scores import BASE, shapes_home


@parametrize_with_checks([MultiLayerHead(), MultiLayerHead(selection="group", keep_fraction=0.5)])
def test_multilayer_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def taps_with_signal_in(group: int, *, n: int = 240, sizes: tuple[int, ...] = (6, 10, 8), seed: int = 0) -> tuple:
    """Three taps of noise; the labels are a linear function of two columns of tap ``group``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sum(sizes)))
    start = sum(sizes[:group])
    y = (X[:, start] + X[:, start + 1] > 0).astype(int)
    return X, y, sizes, start


def test_feature_selection_keeps_the_informative_columns():
    X, y, sizes, start = taps_with_signal_in(1)
    head = MultiLayerHead(group_sizes=sizes, keep_fraction=2 / 24).fit(X, y)
    assert list(head.selected_) == [start, start + 1]
    assert list(head.selected_per_group_) == [0, 2, 0]
    assert int(np.argmax(head.group_relevance_)) == 1
    assert head.score(X, y) > 0.95


def test_group_selection_keeps_whole_taps():
    X, y, sizes, start = taps_with_signal_in(2)
    head = MultiLayerHead(group_sizes=sizes, selection="group", keep_fraction=0.1).fit(X, y)
    assert list(head.selected_) == list(range(16, 24))  # the whole third tap, nothing else


def test_group_sizes_must_cover_the_input():
    X, y, _, _ = taps_with_signal_in(0)
    with pytest.raises(ValueError, match="do not add up"):
        MultiLayerHead(group_sizes=(5, 5)).fit(X, y)


def test_sweep_gives_the_heads_of_separate_fits():
    X, y, sizes, _ = taps_with_signal_in(0, n=300)
    grid = [{"keep_fraction": f, "group_sizes": list(sizes)} for f in (0.1, 0.5, 1.0)]
    swept = multilayer_sweep(X[:200], y[:200], X[200:], y[200:], grid, seed=0)
    for (params, head, val_accuracy, _), point in zip(swept, grid, strict=True):
        alone = MultiLayerHead(random_state=0, **point).fit(X[:200], y[:200])
        assert params == point
        np.testing.assert_array_equal(head.selected_, alone.selected_)
        np.testing.assert_allclose(head.predict_proba(X[200:]), alone.predict_proba(X[200:]), rtol=1e-6)
        assert val_accuracy == pytest.approx(float((alone.predict(X[200:]) == y[200:]).mean()))


# ------------------------------------------------------------------------------------- through train-heads


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Paths:
    return shapes_home(tmp_path_factory, ["logreg", "multilayer"])


@pytest.mark.slow
def test_train_heads_saves_multilayer_under_the_all_stages_folder(trained):
    paths = trained
    folder = paths.models / "shapes" / BASE / MULTI_TAP_LAYER / "multilayer"
    head, record = load_head(folder)
    sidecar = record.to_json()
    test_file = paths.feature_file("shapes", BASE, "test")
    taps = sidecar["taps"]
    cached = read_metadata(paths.feature_file("shapes", BASE, "train"))["taps"]
    assert taps == list(cached) and len(taps) > 1  # every stage tap of a base without ImageNet logits, in cache order
    assert (
        sidecar["layer"] == MULTI_TAP_LAYER and sidecar["tap"]["relative_depth"] == 1.0 and sidecar["tap"]["multi_tap"]
    )
    assert sidecar["params"]["group_sizes"] == [load_features(test_file, t)[0].shape[1] for t in taps]
    assert [s["params"]["keep_fraction"] for s in sidecar["sweep"]] == get_head_spec("multilayer").grid["keep_fraction"]
    X = np.concatenate([load_features(test_file, t)[0] for t in taps], axis=1).astype(np.float32)
    y = load_features(test_file, taps[0])[1]
    assert float((head.predict(X) == y).mean()) == pytest.approx(sidecar["test"]["accuracy"])
    rows = [r for r in leaderboard_rows("shapes", paths) if r["head"] == "multilayer"]
    assert [(r["layer"], r["relative_depth"], r["multi_tap"]) for r in rows] == [(MULTI_TAP_LAYER, 1.0, True)]
    from featurecache.leaderboard import format_leaderboard

    assert f"| {MULTI_TAP_LAYER} | all {len(taps)} taps | multilayer |" in format_leaderboard("shapes", rows)


@pytest.mark.slow
def test_a_multilayer_head_on_a_shortlist_reads_as_the_taps_it_uses(trained, tmp_path):
    """train-heads --shortlist 2 (here: --layers of two taps) trains the multilayer head on those two; the leaderboard
    said "all taps"."""
    import shutil

    from featurecache.leaderboard import format_leaderboard

    paths = Paths(tmp_path / "p")
    shutil.copytree(trained.root, paths.root)
    cached = list(read_metadata(paths.feature_file("shapes", BASE, "train"))["taps"])
    train_heads(dataset="shapes", base_tag=BASE, layers=cached[-2:], heads=["multilayer"],
                options=TrainOptions(progress=False), paths=paths)  # fmt: skip
    (row,) = [r for r in leaderboard_rows("shapes", paths) if r["head"] == "multilayer"]
    assert (row["n_taps"], row["stage_taps"]) == (2, len(cached)) and len(cached) > 2
    assert f"| {MULTI_TAP_LAYER} | 2 of {len(cached)} taps | multilayer |" in format_leaderboard("shapes", [row])
    # the compare report, its figure and its sentence say the same, not "every tap"
    from featurecache.answer import head_results
    from featurecache.report import _depth

    (multi,) = [r for r in head_results("shapes", BASE, paths) if r.multi_tap]
    assert multi.n_taps == 2 and _depth(multi) == "2 taps"
    # the README's `train-heads --heads multilayer` afterwards trains it on every tap, in the same folder: it says so
    (every,) = train_heads(dataset="shapes", base_tag=BASE, heads=["multilayer"], options=TrainOptions(progress=False),
                           paths=paths)  # fmt: skip
    assert every["status"] == "trained" and "features" in every["replaced"] and len(every["taps"]) == len(cached)


@pytest.mark.slow
def test_a_second_run_reuses_the_multilayer_head(trained):
    again = train_heads(dataset="shapes", base_tag=BASE, heads=["multilayer"], options=TrainOptions(progress=False),
                        paths=trained)  # fmt: skip
    assert [s["status"] for s in again] == ["reused"]


@pytest.mark.slow
def test_multilayer_vs_best_single_is_a_paired_difference(trained):
    result = multilayer_vs_best_single("shapes", BASE, trained)
    best = selected_heads("shapes", BASE, trained)[result.single_layer]
    assert result.single_accuracy == pytest.approx(best.test_accuracy)
    assert result.difference == pytest.approx(result.multilayer_accuracy - result.single_accuracy)
    assert result.ci95[0] <= result.difference <= result.ci95[1]
    assert result.n_test == 15


@pytest.mark.slow
def test_predict_refuses_a_multilayer_head_in_one_line(trained):
    from featurecache import FeaturecacheError
    from featurecache.predict import predict_images

    folder = trained.models / "shapes" / BASE / MULTI_TAP_LAYER / "multilayer"
    image = read_metadata(trained.feature_file("shapes", BASE, "test"))["dataset_root"]
    with pytest.raises(FeaturecacheError, match=r"is a multilayer head \(taps .*\); predict takes heads trained"):
        predict_images(folder, [image])  # refused before any image is read
