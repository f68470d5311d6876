"""The ``featurecache`` console script: one subcommand per entry point module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in pipelines/ (each has get_args_parser(add_help) and main(args) -> int)
COMMANDS = {
    "data": "pipelines.prepare_data",
    "extract": "pipelines.extract",
    "list-bases": "pipelines.list_bases",
    "list-layers": "pipelines.list_layers",
    "info": "pipelines.info",
    "verify": "pipelines.verify",
    "list-heads": "pipelines.list_heads",
    "train-heads": "pipelines.train_heads",
    "predict": "pipelines.predict",
    "compare-layers": "pipelines.compare_layers",
    "finetune": "pipelines.finetune",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("featurecache", description="Frozen-base feature caches and layer comparison.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        child = module.get_args_parser(add_help=False)
        sub.add_parser(
            name, parents=[child], help=(module.__doc__ or "").split(":", 1)[-1].strip(), description=module.__doc__
        )
    return parser


def run(argv: list[str] | None = None) -> int:
    from pipelines.common import run_main

    args = get_args_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    return run_main(module.main, args)


if __name__ == "__main__":
    sys.exit(run())
