"""compare.run_comparison as a library call: the answer it returns, the files it writes, and the re-run that only
reads what the first one cached."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from featurecache.compare import CompareOptions, run_comparison
from featurecache.config import Paths
from featurecache.datasets import DatasetSource
from featurecache.extract import ExtractOptions
from featurecache.train import TrainOptions
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"


def _options() -> CompareOptions:
    return CompareOptions(
        heads=("logreg", "knn"),
        controls=False,  # the controls have their own tests (test_compare_cli, test_report)
        extract=ExtractOptions(workers=0, progress=False),
        train=TrainOptions(progress=False),
    )


def _written(home: Path) -> dict[str, int]:
    """Every cache and saved head under the home, with its modification time in ns."""
    files = [*home.glob("data/features/**/*.h5"), *home.glob("models/**/sidecar.json")]
    return {str(p.relative_to(home)): p.stat().st_mtime_ns for p in files}


@pytest.mark.slow
def test_run_comparison_answers_writes_the_report_and_a_rerun_reuses_every_cache(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class={"train": 6, "val": 3, "test": 3}, seed=3)
    paths = Paths(tmp_path / "home")
    source = DatasetSource("shapes", folder=root)

    (answer,) = run_comparison(datasets=[source], bases=[BASE], options=_options(), paths=paths)

    assert answer.dataset == "shapes" and answer.recommended.base == BASE
    assert answer.recommended.head in ("logreg", "knn")
    tapped = {r.layer for r in answer.heads[BASE]}
    assert len(tapped) >= 4 and answer.recommended.layer in tapped  # every stage tap got heads
    assert len(answer.heads[BASE]) == 2 * len(tapped)  # both heads on every tap
    best_val = max(r.val_accuracy for r in answer.heads[BASE])
    assert answer.recommended.val_accuracy == best_val  # chosen on val (the one rule)
    assert answer.transfer.random_init is None and answer.transfer.pixels is None  # controls were off
    summary = json.loads((paths.compare_dir("shapes") / "summary.json").read_text())
    assert summary["recommended"]["layer"] == answer.recommended.layer
    assert summary["recommended"]["head"] == answer.recommended.head
    # the dataset's leaderboard and best.json are rewritten with the heads this run trained (they were left stale)
    best = json.loads(paths.best_file("shapes").read_text())["best"]
    assert (best["layer"], best["head"]) == (answer.recommended.layer, answer.recommended.head)
    first = _written(paths.root)
    assert any(k.endswith("train.h5") for k in first) and sum(k.endswith("sidecar.json") for k in first) >= 8

    (again,) = run_comparison(datasets=[source], bases=[BASE], options=_options(), paths=paths)

    assert _written(paths.root) == first  # nothing re-extracted, no head retrained
    assert again.recommended.name(with_base=True) == answer.recommended.name(with_base=True)
    assert again.recommended.test_accuracy == answer.recommended.test_accuracy

    # Only what this comparison trained is ranked: the knn heads and the layers a shortlist drops stay saved
    # beside them, and the answer is the one a fresh home would give.
    narrower = dataclasses.replace(_options(), heads=("logreg",), shortlist=2)
    (scoped,) = run_comparison(datasets=[source], bases=[BASE], options=narrower, paths=paths)
    assert {r.head for r in scoped.heads[BASE]} == {"logreg"}
    assert len({r.layer for r in scoped.heads[BASE]}) == 2
    assert _written(paths.root) == first  # it trained nothing new
    # The report's training-free score table ranks the same heads as the answer beside it
    table = scoped.layer_scores
    assert set(table.selected_head.values()) == {"logreg"}
    assert set(table.layers) == {r.layer for r in scoped.heads[BASE]}
    assert table.best_layer == scoped.recommended.layer
