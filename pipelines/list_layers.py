"""featurecache list-layers BASE: every tappable node with its output shape; '*' marks the default taps."""

from __future__ import annotations

import argparse
import sys

from featurecache.bases import load_base
from featurecache.layers import trace_base
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache list-layers", description=__doc__, add_help=add_help)
    p.add_argument("base", help="base name (see list-bases)")
    p.add_argument("--defaults-only", action="store_true", help="print only the default taps")
    return p


def main(args: argparse.Namespace) -> int:
    # Shapes do not depend on the weights; random init avoids needing weight files just to look.
    loaded = load_base(args.base, weights="none")
    traced = trace_base(loaded)
    defaults = set(traced.default_taps)
    kind = "FX graph nodes" if traced.graph == "fx" else "module outputs (FX cannot trace this model)"
    print(f"# {args.base}: {len(traced.nodes)} {kind} at {traced.input_size}x{traced.input_size}; * = default tap")
    print(f"  {'node':48s} {'shape':>18s} {'depth':>6s}")
    for node in traced.nodes:
        if args.defaults_only and node.name not in defaults:
            continue
        mark = "*" if node.name in defaults else " "
        shape = "x".join(str(s) for s in node.shape)
        print(f"{mark} {node.name:48s} {shape:>18s} {node.relative_depth:6.2f}")
    print(f"default taps (--layers all-stages): {','.join(traced.default_taps)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
