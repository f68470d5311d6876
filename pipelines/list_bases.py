"""featurecache list-bases: the registered bases (offline ones need no download)."""

from __future__ import annotations

import argparse
import sys

from featurecache.bases import get_base_spec, list_bases
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache list-bases", description=__doc__, add_help=add_help)
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'resnet*'")
    return p


def main(args: argparse.Namespace) -> int:
    names = list_bases(args.pattern)
    for family in ("offline", "torchvision"):
        rows = [get_base_spec(n) for n in names if get_base_spec(n).family == family]
        if rows:
            print(f"# {family}" + (" (weights ship in pip packages)" if family == "offline" else ""))
            for spec in rows:
                print(f"{spec.name:24s} {spec.input_size:4d}px  {spec.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
