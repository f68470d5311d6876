"""featurecache data: prepare embedded datasets into data/raw/<name> (ImageFolder layout, recorded split)."""

from __future__ import annotations

import argparse
import sys

from featurecache.config import default_paths
from featurecache.datasets import list_datasets, prepare_dataset
from pipelines.common import comma_list, run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache data", description=__doc__, add_help=add_help)
    p.add_argument(
        "--datasets",
        type=comma_list,
        default=["digits"],
        help=f"'all' (the default comparison set) or any of: {', '.join(list_datasets())}",
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild datasets that are already prepared")
    return p


def main(args: argparse.Namespace) -> int:
    paths = default_paths()
    names = list_datasets(default_only=True) if args.datasets == ["all"] else args.datasets
    for name in names:
        dest = prepare_dataset(name, paths.raw, external_dir=paths.external, overwrite=args.overwrite)
        print(f"{name}: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
