"""featurecache train-heads: sweep heads per cached layer, select on val, test once, save, rank."""

from __future__ import annotations

import argparse
import sys
import time

from featurecache.answer import MIN_IMAGES_PER_CLASS, class_counts
from featurecache.config import default_paths
from featurecache.heads import list_heads
from featurecache.layer_scores import DEFAULT_SHORTLIST_SCORE, SCORES
from featurecache.leaderboard import best_row, leaderboard_rows, write_leaderboard
from featurecache.metrics import pts
from featurecache.train import TrainOptions, train_heads
from pipelines.common import comma_list, run_main, seed


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache train-heads", description=__doc__, add_help=add_help)
    p.add_argument("--dataset", default="digits", help="dataset name under data/features/")
    p.add_argument(
        "--bases",
        type=comma_list,
        default=["efficientnet_lite0"],
        help="comma-separated base cache folders (e.g. efficientnet_lite0,efficientnet_lite0-random)",
    )
    p.add_argument("--layers", type=comma_list, help="layers to use (default: every cached layer)")
    p.add_argument("--shortlist", type=int, metavar="K",
                   help="score every cached layer without training (seconds), train only the K best")  # fmt: skip
    p.add_argument("--shortlist-score", default=DEFAULT_SHORTLIST_SCORE, choices=SCORES,
                   help="training-free score that ranks the layers for --shortlist")  # fmt: skip
    p.add_argument("--heads", type=comma_list, help=f"heads (default: all of {', '.join(list_heads())})")
    p.add_argument("--refit", default="train", choices=["train", "train+val"], help="data for the final fit")
    p.add_argument("--n-jobs", type=int, default=1, help="parallel jobs (joblib); -1 for all cores")
    p.add_argument("--backend", default="loky", choices=["loky", "dask", "ray"],
                   help="where jobs run: local processes, or a Dask/Ray cluster (extras [dask], [ray])")  # fmt: skip
    p.add_argument("--cluster-address",
                   help="dask scheduler (tcp://host:8786) or ray head address; default: a local cluster")  # fmt: skip
    p.add_argument(
        "--augmented", action="store_true",
        help="train on train + its cached augmented views (extract --train-views K); saved as <head>+aug",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="retrain even when a matching saved head exists")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--max-memory-gb", type=float, help="memory budget per split (default: half of available)")
    p.add_argument("--device", default="cpu", help="device of the dense head: cpu|cuda|auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    options = TrainOptions(refit=args.refit, n_jobs=args.n_jobs, backend=args.backend, augmented=args.augmented,
                           cluster_address=args.cluster_address, overwrite=args.overwrite, seed=args.seed,
                           max_memory_gb=args.max_memory_gb, device=args.device, progress=args.progress)  # fmt: skip
    counts, replaced = {"trained": 0, "reused": 0}, []
    for base in args.bases:
        layers = args.layers
        if args.shortlist is not None:
            from featurecache.layer_scores import shortlist_layers

            t0 = time.perf_counter()
            layers = shortlist_layers(args.dataset, base, args.shortlist, args.shortlist_score)
            print(f"shortlist of {base} by {args.shortlist_score} ({time.perf_counter() - t0:.1f}s to score every "
                  f"cached layer): {', '.join(layers)}")  # fmt: skip
        for sidecar in train_heads(dataset=args.dataset, base_tag=base, layers=layers, heads=args.heads,
                                   options=options):  # fmt: skip
            counts[sidecar["status"]] += 1
            if sidecar.get("replaced"):  # a saved head of other inputs (a --shortlist multilayer head, say) is gone
                replaced.append(f"{base} / {sidecar['layer']} / {sidecar['head']} ({', '.join(sidecar['replaced'])})")
    paths = default_paths()
    rows = leaderboard_rows(args.dataset, paths)
    write_leaderboard(args.dataset, paths, rows=rows)
    table = paths.leaderboard_file(args.dataset, ".md")
    print(table.read_text())
    trained = counts["trained"]
    print(f"{trained} head{'s' * (trained != 1)} trained, {counts['reused']} reused (--overwrite retrains)")
    if replaced:
        print(
            f"{len(replaced)} of them replaced a saved head trained on other inputs: {'; '.join(replaced[:4])}"
            + (f" and {len(replaced) - 4} more" if len(replaced) > 4 else "")
        )
    print(*best_lines(rows, args.bases, args.dataset), sep="\n")
    print(f"wrote {paths.leaderboard_file(args.dataset, '.csv')}, {table}, {paths.best_file(args.dataset)}")
    smallest = {split: min(c.values()) for split, c in class_counts(args.dataset, args.bases[0], paths).items()}
    small = {s: n for s, n in smallest.items() if s != "train" and n < MIN_IMAGES_PER_CLASS}
    if small:
        where = ", ".join(f"{s}: {n} image(s) in the smallest class" for s, n in small.items())
        print(f"WARNING: small sample ({where}; fewer than {MIN_IMAGES_PER_CLASS}): the ranking above is within "
              f"noise. `featurecache compare-layers` says which heads are statistically tied.")  # fmt: skip
    return 0


def best_lines(rows: list[dict], bases: list[str], dataset: str) -> list[str]:
    """The command's answer: the best head on val among the pretrained bases it was given (the leaderboard above
    ranks every saved base of the dataset; its first row is named too when it is another base's). Controls given in
    --bases are a reference, never the answer."""
    asked = ",".join(bases)
    best, overall = best_row(rows, bases=bases), best_row(rows)
    if best is not None:
        lines = [f"best on val of the saved heads of --bases {asked}: {_head_text(best)}"]
    else:  # only controls were asked (or every pretrained head was left out as stale)
        lines = [f"no pretrained head among --bases {asked} to name best: controls (random-init bases, raw pixels) "
                 f"are what a pretrained base is measured against, never the answer"]  # fmt: skip
    if overall is not None and overall["base"] not in bases:
        lines.append(f"first of every saved base of {dataset} (not asked here): {_head_text(overall)}")
    return lines


def _head_text(row: dict) -> str:
    return (f"{row['base']} / {row['layer']} / {row['head']}: val {pts(row['val_accuracy'])}%, test "
            f"{pts(row['test_accuracy'])}% [{pts(row['test_ci_low'])}, {pts(row['test_ci_high'])}]")  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
