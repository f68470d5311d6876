"""featurecache list-bases: the registered bases of every installed family (offline ones need no download).

Any timm model, listed or not, is a base as ``timm:<name>`` (with the ``featurecache[timm]`` extra).
"""

from __future__ import annotations

import argparse
import sys

from featurecache.bases import FAMILY_HEADINGS, get_base_spec, list_bases
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache list-bases", description=__doc__, add_help=add_help)
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'resnet*' or 'timm:convnext*'")
    return p


def main(args: argparse.Namespace) -> int:
    specs = [get_base_spec(n) for n in list_bases(args.pattern)]
    for family, heading in FAMILY_HEADINGS.items():
        rows = [spec for spec in specs if spec.family == family]
        if rows:
            print(f"# {family} ({heading})")
            for spec in rows:
                print(f"{spec.name:24s} {spec.input_size:4d}px  {spec.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
