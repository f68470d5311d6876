"""Stage 2 sweep benchmark: the default train-heads sweep (every head x every layer), new defaults against the old.

For every layer x head it runs the sweep exactly as ``featurecache.train.run_job`` does (each grid point fitted on
train and scored on val, or the head's whole-grid ``sweep`` when it has one) and records wall and CPU seconds,
the selected grid point and its val and test accuracy. The old configuration (the dense head's grid and epoch
budget before the stage-2 speed-up) is expressed by parameters, so both run side by side in one process,
interleaved A, B, A, B. CPU seconds with torch held to one thread are the figure that survives a shared machine;
wall seconds are only comparable within one run.

    python -m benchmarks.stage2                                 # generated features, 2.6k rows, two classes
    python -m benchmarks.stage2 --home /work/fc --dataset digits  # a cached dataset (read only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BASE = "efficientnet_lite0"
# Widths of efficientnet_lite0's seven stage taps (avg-pooled): the generated data has the same shapes.
LITE0_STAGE_WIDTHS = (24, 40, 80, 112, 192, 320, 1280)


@dataclass(frozen=True)
class Config:
    """How each head is swept: overrides of a registered head's grid and parameters (absent: the registry's)."""

    name: str
    grids: dict[str, dict[str, list]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_sweep: tuple[str, ...] = ()  # heads fitted point by point even if they register a whole-grid sweep


# The dense head before the stage-2 speed-up: 4 grid points, 100 epochs, patience 10, two torch threads
# allowed (it followed the job's thread count).
OLD = Config(
    "old",
    grids={"mlp": {"hidden_units": [(256,), (512, 256)], "dropout": [0.2, 0.5]}},
    params={"mlp": {"max_epochs": 100, "patience": 10, "threads": None}},
)
NEW = Config("new")
CONFIGS = {c.name: c for c in (OLD, NEW)}


def generated_splits(
    *, n_per_class: int = 1300, seed: int = 0, widths: tuple[int, ...] = LITE0_STAGE_WIDTHS
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Two-class features shaped like efficientnet_lite0's stage taps: ``{layer: {split: (X, y)}}``, 60/20/20.

    Each layer is a noisy non-negative (post-ReLU-like) projection of a shared latent with a class shift, so
    deeper (wider) layers separate the classes better, as real taps do, and no head reaches 100%.
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    y = np.repeat([0, 1], n_per_class)
    latent = rng.normal(size=(n, 32)) + 0.6 * y[:, None] * rng.normal(size=32)
    order = rng.permutation(n)
    cut = [int(0.6 * n), int(0.8 * n)]
    parts = dict(zip(("train", "val", "test"), np.split(order, cut), strict=True))
    data = {}
    for depth, width in enumerate(widths):
        mix = rng.normal(size=(32, width)) / np.sqrt(32)
        X = np.maximum(latent @ mix * (0.5 + depth / len(widths)) + rng.normal(size=(n, width)), 0)
        data[f"stage{depth}"] = {s: (X[idx].astype(np.float32), y[idx]) for s, idx in parts.items()}
    return data


def cached_splits(home: Path, dataset: str, base_tag: str = BASE) -> dict[str, dict[str, tuple[np.ndarray, ...]]]:
    """The cached layers of ``home/data/features/<dataset>/<base_tag>`` as ``{layer: {split: (X, y)}}``."""
    from featurecache.config import Paths
    from featurecache.store import load_features, read_metadata
    from featurecache.train import cache_files

    files = cache_files(dataset, base_tag, Paths(home))
    layers = list(read_metadata(files["train"])["taps"])
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for layer in layers:
        out[layer] = {}
        for split, path in files.items():
            X, y, _ = load_features(path, layer)
            out[layer][split] = (X.astype(np.float32), y)
    return out


def _grid(config: Config, head: str) -> list[dict[str, Any]]:
    from sklearn.model_selection import ParameterGrid

    from featurecache.heads import get_head_spec

    return list(ParameterGrid(config.grids.get(head, get_head_spec(head).grid)))


def sweep_one(config: Config, head: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """One layer x head swept as ``run_job`` does; returns timings, the selection and its test accuracy."""
    from featurecache.heads import get_head_spec

    spec = get_head_spec(head)
    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = splits["train"], splits["val"], splits["test"]
    grid = _grid(config, head)
    overrides = config.params.get(head, {})
    wall, cpu = time.perf_counter(), time.process_time()
    if spec.sweep is not None and head not in config.no_sweep and not overrides:
        fitted = spec.sweep(X_tr, y_tr, X_val, y_val, grid, seed=seed)
    else:
        fitted = []
        for params in grid:
            estimator = spec.build(seed).set_params(**params, **overrides)
            if spec.dense:
                estimator.fit(X_tr, y_tr, eval_set=(X_val, y_val))
            else:
                estimator.fit(X_tr, y_tr)
            fitted.append((params, estimator, float((estimator.predict(X_val) == y_val).mean()), 0.0))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    best = max(range(len(fitted)), key=lambda i: (fitted[i][2], -i))  # ties keep the earlier point, as train.py
    params, estimator, val_accuracy, _ = fitted[best]
    correct = estimator.predict(X_te) == y_te
    return {"config": config.name, "head": head, "grid_points": len(grid), "wall_s": wall, "cpu_s": cpu,
            "params": params, "val_accuracy": val_accuracy, "test_accuracy": float(correct.mean()),
            "test_correct": correct}  # fmt: skip


def run(
    *,
    home: Path | None = None,
    dataset: str | None = None,
    base_tag: str = BASE,
    n_per_class: int = 1300,
    heads: list[str] | None = None,
    configs: tuple[Config, ...] = (OLD, NEW),
    repeats: int = 1,
    threads: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time the default stage-2 sweep per config, side by side, one row per config x repeat.

    Args:
        home, dataset: a cached dataset (``home/data/features/<dataset>/<base_tag>``); without them, generated
            two-class features of ``2 * n_per_class`` rows shaped like efficientnet_lite0's stage taps.
        heads: default: every registered head (the default sweep).
        configs: the configurations to compare (default: the old dense-head grid and budget, then today's).
        repeats: rounds of all configs; report medians.
        threads: torch intra-op threads (CPU seconds are only a quiet-machine proxy at 1).
        progress: called with each layer x head record as it finishes.

    Returns:
        One dict per config x repeat: ``config``, ``repeat``, ``wall_s``, ``cpu_s``, ``per_head`` (head ->
        wall/cpu seconds), ``layers`` and ``records`` (per layer x head: selection, val/test accuracy, the test
        items' correctness for paired comparisons).
    """
    import torch

    from featurecache.heads import get_head_spec, list_heads

    torch.set_num_threads(threads)
    data = cached_splits(home, dataset, base_tag) if dataset else generated_splits(n_per_class=n_per_class)
    # The per-layer heads; a multi-tap head (reads every tap at once, trained once per base) is not a layer x head job.
    heads = heads or [h for h in list_heads() if not getattr(get_head_spec(h), "multi_tap", False)]
    rows = []
    for repeat in range(repeats):
        # Interleaved per layer x head (A, B, A, B, ...): the VM's speed drifts over minutes, so configs whose
        # jobs run back to back see the same machine.
        records: dict[str, list[dict]] = {config.name: [] for config in configs}
        for layer, splits in data.items():
            for head in heads:
                for config in configs:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # ConvergenceWarnings of the liblinear grid edges
                        record = {"layer": layer, **sweep_one(config, head, splits)}
                    torch.set_num_threads(threads)  # a head may change it; the next one starts equal
                    records[config.name].append(record)
                    if progress:
                        progress(record)
        for config in configs:
            mine = records[config.name]
            per_head = {h: {k: sum(r[k] for r in mine if r["head"] == h) for k in ("wall_s", "cpu_s")} for h in heads}
            rows.append({"config": config.name, "repeat": repeat, "dataset": dataset or f"generated-{2 * n_per_class}",
                         "threads": threads, "wall_s": sum(r["wall_s"] for r in mine),
                         "cpu_s": sum(r["cpu_s"] for r in mine), "per_head": per_head, "layers": list(data),
                         "records": mine})  # fmt: skip
    return rows


def paired_differences(rows: list[dict], *, a: str = "old", b: str = "new") -> list[dict]:
    """Per layer x head: test accuracy of config ``b`` minus ``a`` (first repeat), with a paired bootstrap
    interval over test items (per-item correctness difference)."""
    from featurecache.metrics import bootstrap_ci

    first = {r["config"]: r for r in rows if r["repeat"] == 0}
    out = []
    for ra, rb in zip(first[a]["records"], first[b]["records"], strict=True):
        diff = rb["test_correct"].astype(float) - ra["test_correct"].astype(float)
        low, high = bootstrap_ci(diff, seed=0)
        out.append({"layer": ra["layer"], "head": ra["head"], "test_a": ra["test_accuracy"],
                    "test_b": rb["test_accuracy"], "diff": float(diff.mean()), "ci95": (low, high),
                    "params_a": ra["params"], "params_b": rb["params"]})  # fmt: skip
    return out


def _print_record(r: dict) -> None:
    print(
        f"  {r['config']:4s} {r['layer']:>16s} {r['head']:10s} CPU {r['cpu_s']:6.2f} s wall {r['wall_s']:7.2f} s "
        f"val {r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} {r['params']}",
        flush=True,
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmarks.stage2", description=__doc__.splitlines()[0], add_help=add_help)
    p.add_argument("--home", type=Path, help="FEATURECACHE_HOME holding the cache (read only)")
    p.add_argument("--dataset", help="cached dataset name; default: generated features")
    p.add_argument("--base", default=BASE, help="base cache folder")
    p.add_argument("--n-per-class", type=int, default=1300, help="rows per class of the generated data")
    p.add_argument("--heads", type=lambda v: v.split(","), help="comma-separated heads (default: all registered)")
    p.add_argument("--configs", type=lambda v: v.split(","), default=["old", "new"], help="old,new or one of them")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows (without per-item correctness) here")
    return p


def main(args: argparse.Namespace) -> int:
    home = args.home or (Path(os.environ["FEATURECACHE_HOME"]) if "FEATURECACHE_HOME" in os.environ else None)
    rows = run(home=home, dataset=args.dataset, base_tag=args.base, n_per_class=args.n_per_class,
               heads=args.heads, configs=tuple(CONFIGS[c] for c in args.configs), repeats=args.repeats,
               threads=args.threads, progress=_print_record)  # fmt: skip
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        cpu, wall = (float(np.median([r[k] for r in mine])) for k in ("cpu_s", "wall_s"))
        shares = ", ".join(f"{h} {float(np.median([r['per_head'][h]['cpu_s'] for r in mine])) / cpu:.0%}"
                           for h in mine[0]["per_head"])  # fmt: skip
        print(f"{config:4s} sweep of {len(mine[0]['records'])} layer x head jobs: CPU {cpu:7.1f} s, wall {wall:7.1f} s "
              f"(median of {len(mine)}); CPU share: {shares}")  # fmt: skip
    if {"old", "new"} <= {r["config"] for r in rows}:
        for d in paired_differences(rows):
            print(f"  {d['layer']:>16s} {d['head']:10s} test {d['test_a']:.3f} -> {d['test_b']:.3f}  "
                  f"diff {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")  # fmt: skip
    if args.json:
        plain = [{**r, "records": [{k: v for k, v in x.items() if k != "test_correct"} for x in r["records"]]}
                 for r in rows]  # fmt: skip
        args.json.write_text(json.dumps(plain, indent=1, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
