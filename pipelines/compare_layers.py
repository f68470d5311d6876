"""featurecache compare-layers: for your images, which layer of which base with which head, and how sure that is."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from featurecache.compare import COMPARE_HEADS, CompareOptions, run_comparison
from featurecache.config import default_paths
from featurecache.datasets import list_datasets
from featurecache.errors import FeaturecacheError
from featurecache.layer_scores import DEFAULT_SHORTLIST_SCORE, SCORES
from featurecache.report import terminal_lines
from featurecache.train import TrainOptions
from featurecache.weights import is_control
from pipelines.common import add_image_options, comma_list, extract_options, run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache compare-layers", description=__doc__, add_help=add_help)
    p.add_argument("data", nargs="*", metavar="PATH",
                   help="image folders (ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>), NAME=PATH, "
                        "or built-in dataset names")  # fmt: skip
    p.add_argument("--datasets", type=comma_list, default=[],
                   help=f"comma-separated NAME=PATH, folders or built-in names (with no PATH and no --datasets: "
                        f"{','.join(list_datasets(default_only=True))})")  # fmt: skip
    p.add_argument("--bases", type=comma_list, default=["efficientnet_lite0"], help="several bases compare bases too")
    p.add_argument("--heads", type=comma_list, default=list(COMPARE_HEADS), help="heads swept per layer")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the random-init base and the raw-pixel baseline")  # fmt: skip
    p.add_argument("--finetune", action="store_true", help="fine-tune from the recommended head and report its gain")
    p.add_argument("--finetune-epochs", type=int,
                   help=f"epochs of --finetune (default {CompareOptions.finetune_epochs}); needs it")  # fmt: skip
    p.add_argument("--shortlist", type=int, metavar="K",
                   help="score every stage tap without training (seconds), train heads only on the K best")  # fmt: skip
    p.add_argument("--shortlist-score", default=DEFAULT_SHORTLIST_SCORE, choices=SCORES,
                   help="training-free score that ranks the layers for --shortlist")  # fmt: skip
    p.add_argument("--n-jobs", type=int, default=2)
    add_image_options(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _curves_in_words(curves: dict) -> str:
    bases = sum(not is_control(tag) for tag in curves)
    controls = len(curves) - bases
    return f"{bases} base{'s' * (bases != 1)}" + (f" and {controls} control{'s' * (controls != 1)}" if controls else "")


def _finetune_epochs(args: argparse.Namespace) -> int:
    """--finetune-epochs without --finetune was silently ignored: a user who typed it meant to fine-tune."""
    if args.finetune_epochs is not None and not args.finetune:
        raise FeaturecacheError("--finetune-epochs needs --finetune (it sets how long fine-tuning runs)")
    return CompareOptions.finetune_epochs if args.finetune_epochs is None else args.finetune_epochs


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    datasets = [*args.data, *args.datasets] or list_datasets(default_only=True)
    options = CompareOptions(
        heads=args.heads,
        controls=args.controls,
        finetune=args.finetune,
        finetune_epochs=_finetune_epochs(args),
        shortlist=args.shortlist,
        shortlist_score=args.shortlist_score,
        extract=extract_options(args),
        train=TrainOptions(n_jobs=args.n_jobs, progress=args.progress),
    )
    command = shlex.join(["featurecache", "compare-layers", *sys.argv[2:]])
    answers = run_comparison(datasets=datasets, bases=args.bases, options=options, command=command.strip())
    paths = default_paths()
    for answer in answers:
        print("\n".join(terminal_lines(answer)))
        print(f"-> {paths.compare_report(answer.dataset)} (and report.md; accuracy vs depth: "
              f"{_curves_in_words(answer.curves)})\n")  # fmt: skip
    if len(answers) > 1:
        print(f"cross-dataset page: {paths.compare_report()}")
    print(f"compare-layers took {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
