"""Training-free layer scores on real caches: the tau table, shortlisting, multilayer vs best single layer, and
scoring time against training time.

Reads the caches and heads of a finished ``compare-layers`` run (``--home``, never written) and writes only
under ``--work``: the multilayer heads (the home's layer folders are linked in, so the best single layer is
read from the same heads) and the timing run's retrained heads.

    python -m benchmarks.bench_layer_scores --home /work/fc --work /tmp/scores-bench --timing-dataset animal_mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from featurecache.compare import COMPARE_HEADS
from featurecache.config import Paths
from featurecache.layer_scores import (
    SCORES,
    cross_dataset_summary,
    layer_tau_table,
    multilayer_vs_best_single,
    score_layers,
    selected_heads,
)
from featurecache.train import MULTI_TAP_LAYER, TrainOptions, train_heads

SHORTLIST_K = 3


def linked_home(home: Paths, work: Paths, dataset: str, base: str, *, with_heads: bool) -> None:
    """``work`` sees ``home``'s caches (and, with_heads, its single-layer head folders) through symlinks."""
    features = work.features / dataset
    if not features.exists():
        features.parent.mkdir(parents=True, exist_ok=True)
        features.symlink_to(home.features / dataset)
    models = work.models / dataset / base
    models.mkdir(parents=True, exist_ok=True)
    if with_heads:
        for layer in (home.models / dataset / base).iterdir():
            if layer.name != MULTI_TAP_LAYER and not (models / layer.name).exists():
                (models / layer.name).symlink_to(layer)


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def shortlist_savings(table: Any, heads: dict) -> dict[str, dict[str, Any]]:
    """Per score: the share of the full run's training seconds a top-K shortlist would have skipped, and
    whether the layer the full run selected survives."""
    total = sum(h.seconds for h in heads.values())
    out = {}
    for name, a in table.agreement.items():
        kept = sum(heads[k].seconds for k in a.top[:SHORTLIST_K])
        out[name] = {"saved_fraction": round(1 - kept / total, 3), "best_survives": a.best_in_top, "top": a.top}
    return out


def timing_run(home: Paths, work: Paths, dataset: str, base: str, repeats: int) -> dict[str, Any]:
    """Score every layer (all scores) and retrain the compare heads on every layer, alternately, same process."""
    scratch = Paths(work.root / "timing")
    linked_home(home, scratch, dataset, base, with_heads=False)
    layers = list(score_layers(dataset, base, scratch, scores=["knn"]).layers)
    samples: dict[str, list[tuple[float, float]]] = {"score": [], "train": []}
    per_score: list[dict[str, float]] = []
    options = TrainOptions(overwrite=True, progress=False)
    for _ in range(repeats):
        result, wall, cpu = timed(lambda: score_layers(dataset, base, scratch, scores=SCORES, layers=layers))
        samples["score"].append((wall, cpu))
        per_score.append(result.seconds)
        _, wall, cpu = timed(lambda: train_heads(dataset=dataset, base_tag=base, layers=layers, heads=COMPARE_HEADS,
                                                 options=options, paths=scratch))  # fmt: skip
        samples["train"].append((wall, cpu))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in samples.items()}
    return {
        "dataset": dataset, "repeats": repeats, "heads": list(COMPARE_HEADS), "layers": layers,
        "score_wall_s": round(med["score"][0], 2), "score_cpu_s": round(med["score"][1], 2),
        "train_wall_s": round(med["train"][0], 2), "train_cpu_s": round(med["train"][1], 2),
        "ratio_wall": round(med["score"][0] / med["train"][0], 3),
        "ratio_cpu": round(med["score"][1] / med["train"][1], 3),
        "per_score_wall_s": {s: round(statistics.median(p[s] for p in per_score), 2) for s in SCORES},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="FEATURECACHE_HOME of a finished compare-layers run (read only)")
    p.add_argument("--work", required=True, help="writable folder for the multilayer heads and the timing run")
    p.add_argument("--datasets", default="digits,mnist5k,animal_mnist,fashion_mnist,openclipart,tuxpaint")
    p.add_argument("--base", default="efficientnet_lite0")
    p.add_argument("--timing-dataset", help="also time scoring vs training side by side on this dataset")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-multilayer", dest="multilayer", action="store_false")
    args = p.parse_args(argv)
    home, work = Paths(args.home), Paths(args.work)
    tables, report = [], {"datasets": {}}
    for ds in args.datasets.split(","):
        heads = selected_heads(ds, args.base, home) if (home.models / ds / args.base).is_dir() else {}
        if not heads:
            print(f"{ds}: no trained heads under {home.models / ds / args.base}; skipped", file=sys.stderr)
            continue
        table, wall, cpu = timed(lambda ds=ds: layer_tau_table(ds, args.base, home))
        tables.append(table)
        entry = {
            "n_train": table.n_train, "best_layer": table.best_layer, "test_accuracy": table.test_accuracy,
            "scores": table.scores, "scoring_seconds": table.scoring_seconds, "scoring_wall_s": round(wall, 2),
            "scoring_cpu_s": round(cpu, 2), "training_seconds_in_sidecars": table.training_seconds,
            "agreement": {s: {"kendall_tau": a.kendall_tau, "weighted_tau": a.weighted_tau, "top": a.top,
                              "best_in_top": a.best_in_top} for s, a in table.agreement.items()},
            "shortlist": shortlist_savings(table, heads),
        }  # fmt: skip
        if args.multilayer:
            linked_home(home, work, ds, args.base, with_heads=True)
            _, wall, _ = timed(lambda ds=ds, t=table: train_heads(dataset=ds, base_tag=args.base, layers=t.layers,
                                                                 heads=["multilayer"], paths=work,
                                                                 options=TrainOptions(progress=False)))  # fmt: skip
            diff = multilayer_vs_best_single(ds, args.base, work)
            sidecar = json.loads(
                (work.models / ds / args.base / MULTI_TAP_LAYER / "multilayer/sidecar.json").read_text()
            )
            entry["multilayer"] = {**diff.__dict__, "train_wall_s": round(wall, 2), "params": sidecar["params"]}
        report["datasets"][ds] = entry
        shown = {k: entry.get(k) for k in ("agreement", "shortlist", "multilayer")}
        print(json.dumps({ds: shown}, default=str), flush=True)
    report["summary"] = {s: v.__dict__ for s, v in cross_dataset_summary(tables).items()}
    if args.timing_dataset:
        report["timing"] = timing_run(home, work, args.timing_dataset, args.base, args.repeats)
    (work.root / "bench_layer_scores.json").parent.mkdir(parents=True, exist_ok=True)
    (work.root / "bench_layer_scores.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"summary": report["summary"], "timing": report.get("timing")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
