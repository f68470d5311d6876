"""Run (or reuse) everything the layer comparison needs, then write the report.

For each dataset x base: prepare the data, extract every stage tap (plus the ImageNet logits of the reference
base, which measure the dataset's distance from ImageNet), extract the same taps from the random-init control
(float32: its activations underflow float16), sweep the heads on every stage tap of both, and build
``reports/compare/``. Every step is cached, so a re-run only does what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from featurecache.bases import get_base_spec
from featurecache.config import Paths, default_paths
from featurecache.datasets import get_dataset_spec, prepare_dataset
from featurecache.extract import ExtractOptions, extract
from featurecache.report import REFERENCE_BASE, build_report
from featurecache.train import TrainOptions, train_heads

log = logging.getLogger(__name__)

COMPARE_HEADS = ("logreg", "linear_svm", "rbf_svm")  # fast on CPU; --heads adds mlp/knn


def run_comparison(
    *,
    datasets: Sequence[str],
    bases: Sequence[str],
    heads: Sequence[str] = COMPARE_HEADS,
    controls: bool = True,
    extract_options: ExtractOptions | None = None,
    train_options: TrainOptions | None = None,
    paths: Paths | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Extract, train and report for ``datasets`` x ``bases``; returns ``summary.json``'s content plus timings."""
    paths = paths or default_paths()
    extract_options = extract_options or ExtractOptions()
    train_options = train_options or TrainOptions()
    timings: dict[str, float] = {}
    for ds in datasets:
        t0 = time.perf_counter()
        root = prepare_dataset(ds, paths.raw, external_dir=paths.external)
        for base in bases:
            spec = get_base_spec(base)
            layers = "all-stages,logits" if base == REFERENCE_BASE and spec.has_imagenet_classifier else "all-stages"
            results = extract(root, base=base, layers=layers, dataset=ds, options=extract_options, paths=paths)
            stage_layers = [k for k in results[0].taps if k != "_fc"]
            train_heads(dataset=ds, base_tag=results[0].path.parent.name, layers=stage_layers, heads=heads,
                        options=train_options, paths=paths)  # fmt: skip
            if controls:
                control_opts = ExtractOptions(**{**extract_options.__dict__, "dtype": "float32"})
                control = extract(root, base=base, layers="all-stages", dataset=ds, weights="none",
                                  options=control_opts, paths=paths)  # fmt: skip
                train_heads(dataset=ds, base_tag=control[0].path.parent.name, heads=heads, options=train_options,
                            paths=paths)  # fmt: skip
        timings[ds] = round(time.perf_counter() - t0, 1)
        log.info("%s done in %.0fs", ds, timings[ds])
    licenses = {ds: get_dataset_spec(ds).license for ds in datasets}
    expected = {ds: get_dataset_spec(ds).expected_distance for ds in datasets}
    summary = build_report(datasets, bases, paths, heads=heads, licenses=licenses, expected=expected, command=command)
    return {**summary, "timings_seconds": timings}
