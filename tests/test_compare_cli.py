"""compare-layers on the user's own folders, through the CLI: the answer, its files, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.cli import run
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"
FAST = ["--bases", BASE, "--heads", "logreg,knn", "--n-jobs", "1", "--no-progress"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def final_files(home: Path) -> list[Path]:
    """Everything under a final name: caches, heads, reports (temporary and journal names excluded)."""
    return [p for p in home.rglob("*") if p.is_file() and ".partial" not in str(p) and ".tmp" not in p.name]


@pytest.mark.slow
def test_compare_layers_on_folders_without_and_with_splits(tmp_path, home, capsys):
    flat = make_image_folder(tmp_path / "my_shapes", per_class={"all": 10}, splits=False, seed=1)
    split = make_image_folder(tmp_path / "elsewhere", per_class={"train": 6, "val": 3, "test": 3}, seed=2)
    shutil.copy(sorted((split / "train" / "circle").iterdir())[0], split / "test" / "circle" / "copy.png")
    assert run(["compare-layers", str(flat), "--datasets", f"my second={split}", *FAST]) == 0
    out = capsys.readouterr().out

    for name in ("my_shapes", "my second"):
        folder = home / "reports" / "compare" / name
        assert {p.name for p in folder.iterdir()} >= {"report.md", "report.html", "accuracy_vs_depth.png",
                                                       "results.csv", "summary.json"}  # fmt: skip
        summary = json.loads((folder / "summary.json").read_text())
        rec = summary["recommended"]
        assert rec["base"] == BASE and rec["head"] in ("logreg", "knn")
        assert f"== {name} ==" in out and f"Recommended: {BASE} / {rec['layer']} / {rec['head']}" in out
        assert all(t["base"] == BASE for t in summary["ties"])  # controls are never candidates
        assert summary["transfer"]["random_init"] is not None and summary["transfer"]["pixels"] is not None
        assert any("Small sample" in w for w in summary["warnings"]), summary["warnings"]
        md = (folder / "report.md").read_text()
        assert "## The answer" in md and "Tied with it" in md and "two-sided exact McNemar, Holm-adjusted" in md
    assert (home / "data" / "features" / "my_shapes" / "splits.json").is_file()  # the seeded split of a flat folder
    assert not (flat / "train").exists()  # the user's folder is never touched
    index = home / "reports" / "compare"
    assert (index / "report.html").is_file() and len(json.loads((index / "summary.json").read_text())["datasets"]) == 2
    assert "<a href='my%20second/report.html'>report</a>" in (index / "report.html").read_text()  # a name with a space
    assert "WARNING: Small sample" in out and "cross-dataset page" in out
    # A test image copied from train is in the answer, not only in the extract log.
    second = json.loads((home / "reports" / "compare" / "my second" / "summary.json").read_text())
    assert second["copies_of_train"] == {"test": 1}
    assert any(w.startswith("1 test image is byte-identical to train images") for w in second["warnings"])


def one_class(root: Path) -> Path:
    make_image_folder(root, per_class={"all": 6}, splits=False)
    for extra in ("square", "stripes"):
        for f in (root / extra).iterdir():
            f.unlink()
        (root / extra).rmdir()
    return root


def tiny_class(root: Path) -> Path:
    make_image_folder(root, per_class={"all": 6}, splits=False)
    for f in sorted((root / "square").iterdir())[2:]:
        f.unlink()
    return root


def no_images(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "README.txt").write_text("nothing here")
    return root


def empty_class(root: Path) -> Path:
    make_image_folder(root, per_class={"all": 6}, splits=False)
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (one_class, "only one class"),
        (tiny_class, "needs at least 3"),
        (no_images, "no class folders with images"),
        (empty_class, "has no image files"),
    ],
)
def test_bad_folders_get_one_clear_line_and_nothing_under_a_final_name(make, message, tmp_path, home, capsys):
    folder = make(tmp_path / "bad")
    assert run(["compare-layers", str(folder), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featurecache: error:") and message in err[0], err
    assert final_files(home) == []


def test_a_fine_tuning_of_no_epoch_is_refused_before_anything_runs(tmp_path, home, capsys):
    """--finetune --finetune-epochs 0 extracted and trained everything, then saved the frozen head as fine-tuned."""
    folder = make_image_folder(tmp_path / "shapes", per_class={"all": 4}, splits=False)
    assert run(["compare-layers", str(folder), *FAST, "--no-controls", "--finetune", "--finetune-epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featurecache: error: --finetune-epochs 0: must be at least 1 (epochs to run)"], err
    assert final_files(home) == []
    # without --finetune the epochs were silently ignored
    assert run(["compare-layers", str(folder), *FAST, "--no-controls", "--finetune-epochs", "3"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "featurecache: error: --finetune-epochs needs --finetune (it sets how long fine-tuning runs)"
    )
    assert final_files(home) == []


def test_unknown_name_says_what_is_accepted(home, capsys):
    assert run(["compare-layers", "no_such_dataset_or_folder", *FAST]) == 2
    err = capsys.readouterr().err
    assert "neither a folder (here or under FEATURECACHE_HOME" in err and "nor a built-in dataset" in err
    assert "NAME=PATH" in err and "digits" in err
