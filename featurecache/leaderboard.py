"""The leaderboard of a dataset: every saved head (every base) best first, as ``reports/<dataset>/results.{csv,md}``
and ``best.json``, under the one selection rule (:mod:`featurecache.selection`)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from featurecache import store
from featurecache.config import Paths, default_paths
from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write_text
from featurecache.freshness import current_heads
from featurecache.metrics import pts
from featurecache.records import KEPT_FROZEN_NOTE, HeadRecord
from featurecache.selection import candidate_of_record, ranked
from featurecache.weights import is_control

log = logging.getLogger(__name__)

LEADERBOARD_COLUMNS = [
    "base", "layer", "relative_depth", "head", "params", "val_accuracy", "test_accuracy", "test_ci_low",
    "test_ci_high", "test_balanced_accuracy", "test_macro_f1", "fit_seconds", "n_train", "model_dir", "control",
    "multi_tap", "n_taps",
]  # fmt: skip
# Fractions the rows hold at full precision: the markdown formats them once (metrics.pts), as the compare report does,
# and the CSV rounds them here. Rounding first and formatting after turned 0.99446 into "99.5" beside the report's 99.4.
FRACTION_COLUMNS = ("val_accuracy", "test_accuracy", "test_ci_low", "test_ci_high", "test_balanced_accuracy",
                    "test_macro_f1")  # fmt: skip
CSV_DECIMALS = 4


def leaderboard_rows(dataset: str, paths: Paths) -> list[dict[str, Any]]:
    """One row per saved head of the dataset (every base), best first under the one selection rule
    (:mod:`featurecache.selection`: val accuracy; ties to the simpler head, then the shallower layer)."""
    rows = []
    for r in ranked(_records(paths.head_dirs(dataset), paths), candidate_of_record):
        rows.append(
            {
                "base": r.base_tag,
                "layer": r.layer,
                "relative_depth": r.tap["relative_depth"],
                "multi_tap": bool(r.tap.get("multi_tap", False)),  # a head on several taps at once: no one depth
                **_tap_counts(r, paths),
                "head": r.head,
                "dense": r.dense,
                "params": json.dumps(r.params, sort_keys=True),
                "val_accuracy": r.selection_val_accuracy,
                "test_accuracy": r.test["accuracy"],
                "test_ci_low": r.test["accuracy_ci95"][0],
                "test_ci_high": r.test["accuracy_ci95"][1],
                "test_balanced_accuracy": r.test["balanced_accuracy"],
                "test_macro_f1": r.test["macro_f1"],
                "fit_seconds": (r.timings or {}).get("total_seconds", 0.0),
                "n_train": r.n_train,
                "control": is_control(r.base_tag),
                "kept_frozen": r.kept_frozen,
                "model_dir": str(paths.head_dir(dataset, r.base_tag, r.layer, r.head)),
            }
        )
    return rows


def _tap_counts(record: HeadRecord, paths: Paths) -> dict[str, int | None]:
    """A multi-tap head's ``n_taps`` and the ``stage_taps`` its cache holds (the taps but the ImageNet logits): a
    ``--shortlist 3`` head covers 3 of them, not all. ``None`` for a single-layer head."""
    if not record.taps:
        return {"n_taps": None, "stage_taps": None}
    cached = store.read_metadata(paths.feature_file(record.dataset, record.base_tag, "train"))["taps"]
    stages = [k for k, tap in cached.items() if not store.is_imagenet_logits(tap)]
    return {"n_taps": len(record.taps), "stage_taps": len(stages)}


def _records(directories: Iterable[Path], paths: Paths) -> Iterator[HeadRecord]:
    """The records of the saved heads in ``directories`` trained on the current caches
    (:func:`featurecache.freshness.current_heads`); the rest of the leaderboard stands without the others."""
    for _directory, record in current_heads(directories, paths):
        yield record


def write_leaderboard(
    dataset: str, paths: Paths | None = None, *, rows: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Write ``reports/<dataset>/results.{csv,md}`` and ``best.json`` of every saved head of the dataset (``rows``:
    :func:`leaderboard_rows`, when the caller has them); returns the best.json content."""
    paths = paths or default_paths()
    rows = leaderboard_rows(dataset, paths) if rows is None else rows
    if not rows:
        raise FeaturecacheError(f"no trained heads under {paths.models / dataset}; run `make train-heads` first")
    paths.leaderboard_dir(dataset).mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, **{k: round(r[k], CSV_DECIMALS) for k in FRACTION_COLUMNS}} for r in rows)
    atomic_write_text(paths.leaderboard_file(dataset, ".csv"), buffer.getvalue())
    atomic_write_text(paths.leaderboard_file(dataset, ".md"), format_leaderboard(dataset, rows))
    best = {
        "dataset": dataset,
        "selected_by": "val_accuracy; ties: simpler head, then shallower layer (featurecache.selection); controls "
        "(random-init bases, raw pixels) are ranked but never best; null: only controls are saved",
        "best": best_row(rows),
        "best_dense": best_row(rows, dense=True),
    }
    atomic_write_text(paths.best_file(dataset), json.dumps(best, indent=1))
    return best


def best_row(rows: list[dict[str, Any]], *, bases: Iterable[str] | None = None, dense: bool = False) -> dict | None:
    """The first of ``rows`` (ranked) from a pretrained base, among ``bases`` when given (a command's ``--bases``),
    dense heads only if asked; ``None`` when there is none. The controls (random-init bases, raw pixels) are ranked
    for reference but never named best: they are what a pretrained base is measured against (and predict cannot run
    the raw-pixel one)."""
    allowed = None if bases is None else set(bases)
    return next((r for r in rows if not r["control"] and (allowed is None or r["base"] in allowed)
                 and (r["dense"] or not dense)), None)  # fmt: skip


def format_leaderboard(dataset: str, rows: list[dict[str, Any]]) -> str:
    """The markdown leaderboard: the pretrained heads ranked, then the controls in a table of their own (ranked by
    the same rule; a control above every pretrained head is a finding, not the answer)."""
    pretrained = [r for r in rows if not r["control"]]
    controls = [r for r in rows if r["control"]]
    bases = ", ".join(dict.fromkeys(r["base"] for r in pretrained)) or "none: only controls are saved"
    lines = [
        f"# {dataset}: heads on cached features",
        "",
        # The files are the dataset's, rewritten by every train-heads and finetune: say whose heads they rank.
        f"Every head saved for {dataset} on its current caches, whichever command trained it; pretrained bases: "
        f"{bases}. Selected on val (ties: the simpler head, then the shallower layer); test scored once after "
        "selection, with a 95% Wilson interval; `fit s` is the seconds the head took to sweep and fit. best.json "
        "holds the first row.",
        "",
        *_table(pretrained),
    ]
    if controls:
        lines += ["", "## Controls, ranked by the same rule", "",
                  "What the pretrained heads are measured against (a random-init base, raw pixels); never named best.",
                  "", *_table(controls)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| rank | base | layer | depth | head | val % | test % [95% Wilson] | bal. acc % | macro-F1 % | fit s |",
        "|---:|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        head = f"{r['head']} ({KEPT_FROZEN_NOTE})" if r.get("kept_frozen") else r["head"]
        lines.append(
            f"| {i} | {r['base']} | {r['layer']} | {_depth(r)} | {head} | {pts(r['val_accuracy'])} "
            f"| {pts(r['test_accuracy'])} [{pts(r['test_ci_low'])}, {pts(r['test_ci_high'])}] "
            f"| {pts(r['test_balanced_accuracy'])} | {pts(r['test_macro_f1'])} | {r['fit_seconds']:.1f} |"
        )
    return lines


def _depth(row: dict[str, Any]) -> str:
    """A single layer's relative depth; a multi-tap head's taps, "all N taps" only where it reads every stage tap."""
    if not row.get("multi_tap"):
        return f"{row['relative_depth']:.2f}"
    n, stages = row["n_taps"], row["stage_taps"]
    return f"all {n} taps" if n == stages else f"{n} of {stages} taps"
