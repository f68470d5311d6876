"""featurecache list-heads: the registered heads and the grid each sweeps."""

from __future__ import annotations

import argparse
import sys

from featurecache.heads import get_head_spec, list_heads
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser("featurecache list-heads", description=__doc__, add_help=add_help)


def _value(value: object) -> str:
    """A grid value as a person writes it: 1e-05, not logspace's 9.999999999999999e-06."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def main(args: argparse.Namespace) -> int:
    for name in list_heads():
        spec = get_head_spec(name)
        grid = ", ".join(f"{k}=[{', '.join(_value(x) for x in v)}]" for k, v in spec.grid.items())
        print(f"{name:11s} {spec.summary}\n{'':11s} grid: {grid}{'  (streams from the cache)' if spec.streams else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
