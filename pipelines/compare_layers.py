"""featurecache compare-layers: accuracy versus layer depth across datasets near and far from ImageNet."""

from __future__ import annotations

import argparse
import sys
import time

from featurecache.compare import COMPARE_HEADS, run_comparison
from featurecache.config import default_paths
from featurecache.datasets import list_datasets
from featurecache.extract import ExtractOptions
from featurecache.train import TrainOptions
from pipelines.common import comma_list, run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache compare-layers", description=__doc__, add_help=add_help)
    p.add_argument("--datasets", type=comma_list, default=list_datasets(default_only=True),
                   help=f"comma-separated (default: {','.join(list_datasets(default_only=True))})")  # fmt: skip
    p.add_argument("--bases", type=comma_list, default=["efficientnet_lite0"], help="several bases compare bases too")
    p.add_argument("--heads", type=comma_list, default=list(COMPARE_HEADS), help="heads swept per layer")
    p.add_argument("--no-controls", dest="controls", action="store_false", help="skip the random-init control")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    command = "featurecache compare-layers " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    summary = run_comparison(
        datasets=args.datasets,
        bases=args.bases,
        heads=args.heads,
        controls=args.controls,
        extract_options=ExtractOptions(device=args.device, batch_size=args.batch_size, progress=args.progress),
        train_options=TrainOptions(n_jobs=args.n_jobs, progress=args.progress),
        command=command.strip(),
    )
    out = default_paths().reports / "compare"
    print(f"{'dataset':14s} {'base':20s} {'recommended (val)':26s} {'test %':>7s} {'oracle (test)':26s} {'gap':>5s}")
    for c in summary["curves"]:
        r, o = c["recommended"], c["oracle"]
        recommended = f"{r['layer']} ({r['depth']:.2f})"
        oracle = f"{o['layer']} ({o['depth']:.2f})"
        print(f"{c['dataset']:14s} {c['base']:20s} {recommended:26s} {100 * r['test_accuracy']:7.1f} {oracle:26s} "
              f"{c['gap_points']:5.1f}")  # fmt: skip
    print(f"wrote {out}/accuracy_vs_depth.png, report.md, report.html, results.csv, summary.json "
          f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
