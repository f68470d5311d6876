"""The layer-comparison report and the training-free transferability score."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from featurecache import store
from featurecache.answer import head_results, layer_curve
from featurecache.baselines import pixel_baseline
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.finetune import _pick_head
from featurecache.leaderboard import leaderboard_rows, write_leaderboard
from featurecache.metrics import holm, mcnemar_p
from featurecache.plots import star_of
from featurecache.report import build_report, imagenet_distance, spearman, spearman_p
from featurecache.selection import pick_best
from featurecache.train import TrainOptions, train_heads
from tests.helpers import make_image_folder


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_the_cross_dataset_trend_carries_an_exact_permutation_p_value():
    # 3 datasets in perfect order: 2 of the 6 pairings reach |rho| = 1, so p = 1/3, far from a trend
    assert spearman_p([1, 2, 3], [1, 2, 3]) == pytest.approx(2 / 6)
    assert spearman_p([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]) == pytest.approx(2 / 5040)
    assert np.isnan(spearman_p([1, 2, 3], [5, 5, 5]))


BASE = "mobilenet_v2_offline"
HEADS = ["logreg", "knn"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 10, "val": 4, "test": 4})
    paths = Paths(tmp_path_factory.mktemp("project"))
    opts = ExtractOptions(workers=0, progress=False)
    layers = "features.3,features.10,flatten"
    extract(ExtractRequest(root, base=BASE, layers=layers), paths=paths, options=opts)
    extract(
        ExtractRequest(root, base=BASE, layers=layers, weights="none"), paths=paths, options=opts
    )  # dtype auto: float32
    extract(ExtractRequest(root, base="efficientnet_lite0", layers="logits"), paths=paths, options=opts)
    quiet = TrainOptions(progress=False)
    for tag in (BASE, f"{BASE}-random"):
        train_heads(dataset="shapes", base_tag=tag, heads=HEADS, options=quiet, paths=paths)
    pixel_baseline("shapes", BASE, paths)
    return paths


def sidecars_of(paths: Paths, base: str = BASE) -> list[dict]:
    return [json.loads(p.read_text()) for p in (paths.models / "shapes" / base).glob("*/*/sidecar.json")]


def test_report_files_and_the_answer_match_the_sidecars(trained):
    paths = trained
    (answer,) = build_report(["shapes"], [BASE], paths, command="featurecache compare-layers shapes")
    out = paths.compare_dir("shapes")
    png = (out / "accuracy_vs_depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "<code>" in html
    assert "`" not in html.replace("`featurecache", "")  # no raw markdown: code spans are rendered
    assert "<td class='num'>" in html  # numbers right-aligned
    md = (out / "report.md").read_text()
    assert md.index("## The answer") < md.index("## Warnings") < md.index("accuracy_vs_depth.png")

    summary = json.loads((out / "summary.json").read_text())
    sidecars = sidecars_of(paths)
    best = pick_best(sidecars)
    assert (summary["recommended"]["layer"], summary["recommended"]["head"]) == (best["layer"], best["head"])
    assert summary["recommended"]["test_accuracy"] == best["test"]["accuracy"]
    low, high = summary["recommended"]["test_ci95"]
    assert low < best["test"]["accuracy"] <= high or best["test"]["accuracy"] == high == 1.0
    assert low < high  # Wilson: never a point, even at 100%

    # The tie set is exactly the heads whose two-sided exact McNemar test, Holm-adjusted over them, finds no difference.
    _, y_test, _ = store.load_features(paths.feature_file("shapes", BASE, "test"), "flatten")
    correct = {(s["layer"], s["head"]): np.asarray(s["test"]["predictions"]) == y_test for s in sidecars}
    ref = correct.pop((best["layer"], best["head"]))
    adjusted = holm([mcnemar_p(ref, c) for c in correct.values()])
    expected = {k for k, p in zip(correct, adjusted, strict=True) if p >= 0.05}
    assert {(t["layer"], t["head"]) for t in summary["ties"]} == expected
    assert len(answer.ties) == len(expected)

    transfer = summary["transfer"]
    assert transfer["random_init"]["base"] == f"{BASE}-random" and transfer["pixels"]["base"] == "raw-pixels"
    assert 0 < transfer["chance"] <= 0.5 and transfer["verdict"] in ("helps", "hurts", "no measurable gain")
    assert any("Small sample" in w for w in summary["warnings"])  # 4 val / 4 test images per class
    assert summary["quadrant"]["size"] == "small" and summary["quadrant"]["similarity"] in ("similar", "different")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 3 * 2 + 1  # (pretrained + control) x layers x heads + raw pixels
    assert sum(r["recommended"] == "True" for r in rows) == 1


def test_layer_curve_chooses_by_val_not_test(trained):
    results = head_results("shapes", BASE, trained)
    curve = layer_curve(results)
    assert [p.layer for p in curve] == ["features.3", "features.10", "flatten"]  # shallow to deep
    for point in curve:
        at_layer = [r for r in results if r.layer == point.layer]
        assert len(at_layer) == len(HEADS)
        assert point.val_accuracy == max(r.val_accuracy for r in at_layer)


def test_one_selection_rule_everywhere_on_an_exact_tie(trained, tmp_path):
    """An exact val tie across two layers and two heads: leaderboard, best.json, the report's recommendation, the
    plot's star and fine-tuning's starting head all name the same head (simpler head, then shallower layer)."""
    shutil.copytree(trained.root, tmp_path / "p")
    paths = Paths(tmp_path / "p")
    for layer, head in [("features.10", "logreg"), ("flatten", "logreg"), ("features.10", "knn"), ("flatten", "knn")]:
        path = paths.head_dir("shapes", BASE, layer, head) / "sidecar.json"
        s = json.loads(path.read_text())
        s["selection_val_accuracy"] = 1.5  # above every real head: an exact four-way tie at the top
        path.write_text(json.dumps(s))
    expected = ("features.10", "logreg")
    rows = leaderboard_rows("shapes", paths)
    assert (rows[0]["layer"], rows[0]["head"]) == expected
    best = write_leaderboard("shapes", paths)["best"]
    assert (best["layer"], best["head"]) == expected
    (answer,) = build_report(["shapes"], [BASE], paths)
    assert (answer.recommended.layer, answer.recommended.head) == expected
    assert star_of(answer, BASE) == answer.recommended
    assert _pick_head("shapes", BASE, "logreg", paths) == paths.head_dir("shapes", BASE, *expected)


def test_imagenet_distance_from_cached_logits(trained):
    d = imagenet_distance("shapes", trained)
    assert 0 < d["confidence"] < 1 and d["distance"] == pytest.approx(1 - d["confidence"])
    assert 1 <= d["classes_used"] <= 1000
    assert imagenet_distance("nothing-here", trained) is None


def test_the_legend_and_the_summary_name_only_what_is_drawn(trained):
    import dataclasses

    from featurecache.plots import _legend_handles
    from featurecache.weights import is_control
    from pipelines.compare_layers import _curves_in_words

    (answer,) = build_report(["shapes"], [BASE], trained, command="featurecache compare-layers shapes")
    bare = dataclasses.replace(answer, curves={b: c for b, c in answer.curves.items() if not is_control(b)})
    controls = {"random-init control", "raw pixels (logreg)"}
    assert controls <= {h.get_label() for h in _legend_handles([answer])}
    assert not controls & {h.get_label() for h in _legend_handles([bare])}  # compare-layers --no-controls
    assert _curves_in_words(answer.curves) == "1 base and 2 controls" and _curves_in_words(bare.curves) == "1 base"
    # Every point drawn fits the shared range: a control far above the curve and a multilayer head far below it.
    from featurecache.plots import _shared_scale

    (control,) = answer.curves[f"{BASE}-random"][:1]
    high = dataclasses.replace(control, test_accuracy=1.0)
    low = dataclasses.replace(control, base=BASE, head="multilayer", test_accuracy=0.02, multi_tap=True)
    spread = dataclasses.replace(answer, curves={**answer.curves, f"{BASE}-random": [high]},
                                 heads={**answer.heads, BASE: [*answer.heads[BASE], low]})  # fmt: skip
    bottom, top = _shared_scale([(spread, BASE)])
    assert bottom <= 2.0 and top >= 100.0
    off_curve = dataclasses.replace(answer.curves[BASE][0], head="other", test_accuracy=0.999)  # a better head
    assert _shared_scale([(dataclasses.replace(answer, better_on_test=[off_curve]), BASE)])[1] >= 99.9
    # A head that beats the recommendation on test is marked (and in the legend) only where there is one.
    better = "significantly better on test (val missed it)"
    missed = dataclasses.replace(answer, better_on_test=[answer.curves[BASE][0]])
    assert better in {h.get_label() for h in _legend_handles([missed])}
    assert better not in {h.get_label() for h in _legend_handles([dataclasses.replace(answer, better_on_test=[])])}
    # Chance is in the legend only where a panel draws its line: far below the data it is a note in the panel.
    far_below = dataclasses.replace(answer, transfer=dataclasses.replace(answer.transfer, chance=0.0))
    assert "chance (largest class)" not in {h.get_label() for h in _legend_handles([far_below])}
    near = dataclasses.replace(
        answer, transfer=dataclasses.replace(answer.transfer, chance=answer.recommended.test_accuracy)
    )
    assert "chance (largest class)" in {h.get_label() for h in _legend_handles([near])}


def test_an_undefined_rank_correlation_reads_as_tied_layers_not_nan():
    from featurecache.report import _tau

    assert _tau(float("nan")) == "n/a (layers tie)" and _tau(0.5) == "+0.50" and _tau(-0.25) == "-0.25"


def test_controls_are_ranked_but_never_best_and_a_stale_pixel_baseline_is_left_out(trained, tmp_path, caplog):
    import csv
    import shutil

    import h5py

    from featurecache.leaderboard import leaderboard_rows, write_leaderboard

    paths = Paths(tmp_path / "p")
    shutil.copytree(trained.root, paths.root)
    pixels = next((paths.models / "shapes" / "raw-pixels").glob("*/*/sidecar.json"))
    sidecar = json.loads(pixels.read_text())
    pixels.write_text(json.dumps({**sidecar, "selection_val_accuracy": 1.01}))  # above every pretrained head
    best = write_leaderboard("shapes", paths)
    rows = list(csv.DictReader(paths.leaderboard_file("shapes", ".csv").open()))
    assert rows[0]["base"] == "raw-pixels" and rows[0]["control"] == "True"
    assert {r["base"] for r in rows if r["control"] == "True"} == {"raw-pixels", f"{BASE}-random"}
    assert best["best"]["base"] == BASE and not best["best"]["control"]
    pretrained, controls = paths.leaderboard_file("shapes", ".md").read_text().split("## Controls")
    assert f"| 1 | {BASE} |" in pretrained and "-random" not in pretrained and "raw-pixels" not in pretrained
    assert "| 1 | raw-pixels |" in controls  # ranked by the same rule, in a table of their own

    with h5py.File(paths.feature_file("shapes", BASE, "test"), "a") as f:
        f.attrs["data_fingerprint"] = "content:other-images"  # what a re-extraction of another folder records
        f.attrs["created_utc"] = "2999-01-01T00:00:00+00:00"
    with caplog.at_level("WARNING"):
        bases = {r["base"] for r in leaderboard_rows("shapes", paths)}
    assert "raw-pixels" not in bases and BASE in bases
    assert "left out" in caplog.text and "featurecache compare-layers shapes=" in caplog.text  # the pixel head's remedy


def test_heads_on_an_older_version_of_the_folder_are_left_out(trained, tmp_path, caplog):
    import shutil

    import h5py

    from featurecache.leaderboard import leaderboard_rows

    paths = Paths(tmp_path / "p")
    shutil.copytree(trained.root, paths.root)
    before = {r["base"] for r in leaderboard_rows("shapes", paths)}
    assert before == {BASE, f"{BASE}-random", "raw-pixels"}
    with h5py.File(paths.feature_file("shapes", BASE, "test"), "a") as f:  # re-extracted after the folder changed
        f.attrs["data_fingerprint"] = "content:the-folder-now"
        f.attrs["created_utc"] = "2999-01-01T00:00:00+00:00"
    with caplog.at_level("WARNING"):
        after = {r["base"] for r in leaderboard_rows("shapes", paths)}
    assert after == {BASE}  # the control left behind, and the pixel baseline of the old images, are out
    assert "holds other images than the newer" in caplog.text and "then retrain" in caplog.text


def test_the_leaderboard_formats_each_interval_once_as_the_compare_report_does(trained, tmp_path):
    """31 of 32 right: Wilson [0.84257, 0.99446]. Rounded to 4 decimals first, results.md printed [84.3, 99.5] beside
    the compare report's and summary.json's [84.3, 99.4]."""
    from featurecache.metrics import pts, wilson_interval

    paths = Paths(tmp_path / "p")
    shutil.copytree(trained.root, paths.root)
    sidecar_file = next((paths.models / "shapes" / BASE).glob("*/logreg/sidecar.json"))
    sidecar = json.loads(sidecar_file.read_text())
    low, high = wilson_interval(31, 32)
    sidecar["test"] = {**sidecar["test"], "accuracy": 31 / 32, "accuracy_ci95": [low, high]}
    sidecar_file.write_text(json.dumps(sidecar))
    write_leaderboard("shapes", paths)
    assert (pts(low), pts(high)) == ("84.3", "99.4")
    assert "| 96.9 [84.3, 99.4] |" in paths.leaderboard_file("shapes", ".md").read_text()
    rows = list(csv.DictReader(paths.leaderboard_file("shapes", ".csv").open()))
    (row,) = [r for r in rows if r["model_dir"] == str(sidecar_file.parent)]
    assert (row["test_ci_low"], row["test_ci_high"]) == ("0.8426", "0.9945")  # the CSV keeps 4 decimals


def test_train_heads_names_best_among_the_bases_it_was_given_never_a_control(trained):
    """The leaderboard ranks every saved base of the dataset; the command's "best on val" line is among its --bases,
    and a control given in --bases is never named best."""
    from featurecache.leaderboard import best_row, format_leaderboard
    from pipelines.train_heads import best_lines

    rows = leaderboard_rows("shapes", trained)
    other = {**best_row(rows), "base": "other_base", "val_accuracy": 1.01}  # another base saved earlier, ranked first
    with_other = [other, *rows]
    asked, also = best_lines(with_other, [BASE], "shapes")
    assert asked.startswith(f"best on val of the saved heads of --bases {BASE}: {BASE} / ")
    assert also.startswith("first of every saved base of shapes (not asked here): other_base / ")
    only_controls, pretrained = best_lines(rows, [f"{BASE}-random"], "shapes")
    assert only_controls.startswith(f"no pretrained head among --bases {BASE}-random to name best: controls")
    assert pretrained.startswith(f"first of every saved base of shapes (not asked here): {BASE} / ")
    controls = [r for r in rows if r["control"]]
    assert controls and best_row(controls) is None  # best.json names no control best, even when only they are saved
    assert f"pretrained bases: other_base, {BASE}." in format_leaderboard("shapes", with_other)  # whose heads it ranks


def test_predict_refuses_the_raw_pixel_control_naming_what_predicts(trained, monkeypatch):
    """The raw-pixel head has no base to rebuild: predict answered "unknown base 'raw-pixels'"."""
    from featurecache.errors import FeaturecacheError
    from featurecache.predict import predict_images

    monkeypatch.setenv("FEATURECACHE_HOME", str(trained.root))
    folder = next((trained.models / "shapes" / "raw-pixels").glob("*/logreg"))
    with pytest.raises(FeaturecacheError, match=r"raw-pixel control, the floor .* cannot predict\. Pass a pretrained"):
        predict_images(folder, ["x.png"])  # refused before any image is read


def test_predict_with_the_random_init_control_says_it_is_a_control(trained, monkeypatch, caplog, tmp_path):
    """It predicts (its base is rebuilt from the recorded seed), but its labels read as any head's did."""
    from PIL import Image

    from featurecache.predict import predict_images

    monkeypatch.setenv("FEATURECACHE_HOME", str(trained.root))
    folder = next((trained.models / "shapes" / f"{BASE}-random").glob("*/logreg"))
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    with caplog.at_level("WARNING"):
        (row,) = predict_images(folder, [image])
    assert "label" in row and "is the random-init control" in caplog.text


def test_the_figure_has_a_row_per_dataset_a_column_per_base_and_readable_text_on_the_page(trained, tmp_path):
    """Two datasets x two bases wrapped 3 panels a row (a dataset's panel in the other's row), 1800 pixels wide, so
    the page showed its 7-point tick labels at 7 pixels; and each panel's title gave the reference classifier's
    confidence on the data as if it were that base's."""
    import dataclasses

    from PIL import Image

    from featurecache.plots import DPI, PAGE_WIDTH_PX, figure, plot_answers

    (answer,) = build_report(["shapes"], [BASE], trained)
    two_bases = dataclasses.replace(answer, curves={**answer.curves, "other_base": answer.curves[BASE]})
    answers = [dataclasses.replace(two_bases, dataset=name) for name in ("first", "second")]
    fig = figure(answers, reference="efficientnet_lite0")
    fig.draw_without_rendering()  # lays the panels out
    rows = {}
    for ax in (ax for ax in fig.get_axes() if ax.get_visible()):  # the panels by their height on the figure
        rows.setdefault(round(ax.get_window_extent().y0), []).append(ax.get_title())
    assert sorted(rows.values()) == [[f"{d} — {BASE}", f"{d} — other_base"] for d in ("first", "second")]
    headings = [row._suptitle.get_text() for row in fig.subfigs]
    assert all("efficientnet_lite0's ImageNet classifier" in h and "one measure for every base" in h for h in headings)
    assert not any("confidence" in title for titles in rows.values() for title in titles)
    plot_answers(answers, tmp_path / "fig.png", reference="efficientnet_lite0")
    width = Image.open(tmp_path / "fig.png").width
    shown = min(1.0, PAGE_WIDTH_PX / width)  # the page shrinks a wider figure, and its text with it
    smallest = min(label.get_fontsize() for ax in fig.get_axes() for label in ax.get_xticklabels())
    assert width <= PAGE_WIDTH_PX and smallest * DPI / 72 * shown >= 12  # pixels on the page
