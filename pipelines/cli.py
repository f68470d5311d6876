"""The ``featurecache`` console script: one subcommand per entry point module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from featurecache import __version__

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


class _OneLineErrors(argparse.ArgumentParser):
    """argparse with its usage errors (an unknown choice, a missing argument) on one line that names ``--help``,
    as every other refusal of featurecache is, instead of the whole usage block above the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"featurecache: error: {message} (see `{self.prog} --help`)\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors("featurecache", description="Frozen-base feature caches and layer comparison.")
    parser.add_argument("--version", action="version", version=f"featurecache {__version__}")
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

    args = get_args_parser().parse_args(argv)  # argparse itself ignores a closed pipe on --help
    module = importlib.import_module(COMMANDS[args.command])
    try:
        status = run_main(module.main, args)
        sys.stdout.flush()  # a closed pipe shows up here rather than as a traceback at interpreter exit
        return status
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of stdout closed it (``featurecache list-layers ... | head -1``): stop quietly, as Unix tools do.

    Python would print a BrokenPipeError traceback when it flushes stdout at exit, so stdout is pointed at
    /dev/null first (the recipe in the Python docs, "Note on SIGPIPE"). 141 = 128 + SIGPIPE, the status a shell
    reports for other tools stopped the same way.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(run())
