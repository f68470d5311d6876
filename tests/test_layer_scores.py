"""Per-layer scores, the tau table against trained heads, and shortlisting the layers to train."""

from __future__ import annotations

import json
import math

import pytest

from featurecache.config import Paths
from featurecache.errors import FeaturecacheError
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.layer_scores import (
    SCORES,
    SelectedHead,
    agreement,
    best_layer,
    cross_dataset_summary,
    layer_tau_table,
    rank_layers,
    score_layers,
    selected_heads,
    shortlist_layers,
)
from featurecache.store import read_metadata
from featurecache.train import TrainOptions, train_heads
from pipelines.cli import run as cli_main
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"


def head(layer: str, depth: float, val: float, test: float, name: str = "logreg") -> SelectedHead:
    return SelectedHead(layer, name, depth, val, test, 1.0, f"/models/{layer}/{name}")


FOUR = {
    "a": head("a", 0.2, 0.70, 0.60),
    "b": head("b", 0.4, 0.80, 0.75),
    "c": head("c", 0.6, 0.90, 0.85),
    "d": head("d", 0.8, 0.85, 0.80),
}


def test_agreement_hand_checked():
    # accuracy order c > d > b > a; the score swaps c and d: 5 of 6 pairs concordant -> tau = (5 - 1) / 6
    scores = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    result = agreement("x", scores, FOUR)
    assert result.kendall_tau == pytest.approx(4 / 6)
    assert result.top == ["d", "c", "b"] and result.best_in_top
    worst = agreement("x", {"a": 0.4, "b": 0.3, "c": 0.0, "d": 0.2}, FOUR)
    assert worst.top == ["a", "b", "d"] and not worst.best_in_top
    assert -1.0 <= worst.kendall_tau < 0 and -1.0 <= worst.weighted_tau < 0


def test_best_layer_is_selected_on_val_with_ties_to_the_simpler_head_then_the_shallower_layer():
    assert best_layer(FOUR) == "c"
    tied = {**FOUR, "e": head("e", 0.7, 0.90, 0.99, name="rbf_svm"), "f": head("f", 0.9, 0.90, 0.99)}
    assert best_layer(tied) == "c"  # same val: logreg beats rbf_svm, and c is shallower than f


def test_a_top_3_holding_a_layer_tied_on_val_with_the_selected_one_is_a_hit():
    """Six layers at 100% val: the rule's tie-break picks the shallowest, and a score whose top 3 is three of the
    other five was reported as a miss ("best layer in top 3: no" for every score)."""
    tied = {k: head(k, 0.1 * (i + 1), 1.0, 0.95) for i, k in enumerate("abcdef")} | {"g": head("g", 0.9, 0.8, 0.8)}
    assert best_layer(tied) == "a"
    result = agreement("x", {"a": 0.0, "b": 0.6, "c": 0.5, "d": 0.4, "e": 0.1, "f": 0.2, "g": 0.3}, tied)
    assert result.top == ["b", "c", "d"] and result.best_in_top  # the old rule: "a" not in the top 3, a miss


def test_rank_layers_puts_nan_last_and_ties_to_the_shallower():
    depth = {"a": 0.1, "b": 0.2, "c": 0.3}
    assert rank_layers({"a": 1.0, "b": float("nan"), "c": 1.0}, depth) == ["a", "c", "b"]


def test_cross_dataset_summary_averages():
    class Table:  # the three fields the summary reads
        def __init__(self, dataset, name, values):
            self.dataset, self.scores = dataset, {name: values}
            self.agreement = {name: agreement(name, values, FOUR)}

    first, second = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, {"a": 0.4, "b": 0.3, "c": 0.0, "d": 0.2}
    one, two = Table("x", "logme", first), Table("y", "logme", second)
    summary = cross_dataset_summary([one, two])["logme"]
    taus = one.agreement["logme"].kendall_tau, two.agreement["logme"].kendall_tau
    assert summary.mean_kendall_tau == pytest.approx(sum(taus) / 2)
    assert (summary.top_hits, summary.n_datasets) == (1, 2)
    assert summary.per_dataset_tau == {"x": taus[0], "y": taus[1]}
    # A score undefined on a dataset (SFDA with one train image per class) is no miss there: it is left out.
    undefined = Table("z", "sfda", dict.fromkeys(first, float("nan")))
    sfda = cross_dataset_summary([Table("x", "sfda", first), undefined])["sfda"]
    assert sfda.n_datasets == 1 and "z" not in sfda.per_dataset_tau


# --------------------------------------------------------------------------------- on a real (tiny) cache


def shapes_home(tmp_path_factory: pytest.TempPathFactory, heads: list[str]) -> Paths:
    """A tiny generated dataset with every stage tap of a real offline base cached and ``heads`` trained."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 12, "val": 5, "test": 5})
    paths = Paths(tmp_path_factory.mktemp("project"))
    extract(
        ExtractRequest(root, base=BASE, layers="all-stages"),
        paths=paths,
        options=ExtractOptions(workers=0, progress=False),
    )
    train_heads(dataset="shapes", base_tag=BASE, heads=heads, options=TrainOptions(progress=False), paths=paths)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Paths:
    return shapes_home(tmp_path_factory, ["logreg", "knn"])


@pytest.mark.slow
def test_score_layers_scores_every_stage_tap(trained):
    result = score_layers("shapes", BASE, trained)
    assert set(result.scores) == set(SCORES) and result.n_train == 36
    # A base without ImageNet logits: every cached tap, its last stage and pooled output (depth 1.0) included
    cached = read_metadata(trained.feature_file("shapes", BASE, "train"))["taps"]
    assert result.layers == list(cached) and result.relative_depth[result.layers[-1]] == 1.0
    for name, values in result.scores.items():
        assert set(values) == set(result.layers) and all(math.isfinite(v) for v in values.values()), name
        assert result.seconds[name] >= 0
    assert all(0 <= v <= 1 for v in result.scores["knn"].values())


@pytest.mark.slow
def test_tau_table_reads_the_val_selected_head_of_each_layer(trained):
    table = layer_tau_table("shapes", BASE, trained, scores=["knn", "logme"])
    for layer in table.layers:
        folder = trained.models / "shapes" / BASE / layer
        sidecars = [json.loads(p.read_text()) for p in folder.glob("*/sidecar.json")]
        best = max(sidecars, key=lambda s: (s["selection_val_accuracy"], s["head"] == "logreg"))
        assert table.selected_head[layer] == best["head"]
        assert table.test_accuracy[layer] == pytest.approx(best["test"]["accuracy"])
    assert table.best_layer == best_layer(selected_heads("shapes", BASE, trained))
    assert set(table.agreement) == {"knn", "logme"} and table.training_seconds > 0


@pytest.mark.slow
def test_shortlist_is_the_top_k_by_the_score(trained):
    result = score_layers("shapes", BASE, trained, scores=["knn"])
    assert (
        shortlist_layers("shapes", BASE, 2, "knn", trained)
        == rank_layers(result.scores["knn"], result.relative_depth)[:2]
    )
    with pytest.raises(FeaturecacheError, match="unknown score"):
        shortlist_layers("shapes", BASE, 2, "nope", trained)
    with pytest.raises(FeaturecacheError, match="at least 1"):
        shortlist_layers("shapes", BASE, 0, "knn", trained)


@pytest.mark.slow
def test_train_heads_shortlist_trains_only_the_k_best_layers(trained, monkeypatch, capsys):
    monkeypatch.setenv("FEATURECACHE_HOME", str(trained.root))
    expected = shortlist_layers("shapes", BASE, 2, "knn", trained)
    rc = cli_main(["train-heads", "--dataset", "shapes", "--bases", BASE, "--heads", "linear_svm", "--shortlist", "2",
                   "--shortlist-score", "knn", "--no-progress"])  # fmt: skip
    assert rc == 0
    trained_layers = sorted(p.parent.name for p in (trained.models / "shapes" / BASE).glob("*/linear_svm"))
    assert trained_layers == sorted(expected)
    assert "shortlist" in capsys.readouterr().out


def test_scores_that_need_spread_within_classes_are_undefined_with_one_image_per_class(caplog):
    """Three classes of one train image each (a 3-images-per-class folder): SFDA divided by zero and NCTI's LDA
    refused, which took compare-layers down after its heads were trained. They read n/a; LogME and k-NN still score."""
    import numpy as np

    from featurecache.layer_scores import _scored

    rng = np.random.default_rng(0)
    features, y = {"a": rng.normal(size=(3, 8)), "b": rng.normal(size=(3, 8))}, np.array([0, 1, 2])
    with caplog.at_level("WARNING"):
        for name in ("sfda", "ncti"):
            assert all(np.isnan(v) for v in _scored(name, features, y, ["a", "b"]).values())
    assert "sfda is undefined here: it needs a class with at least two train images" in caplog.text
    assert np.isfinite(list(_scored("logme", features, y, ["a", "b"]).values())).all()
