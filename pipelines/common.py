"""What every entry point shares: logging setup and turning user errors into one clear line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from featurecache import distributed
from featurecache.config import default_paths
from featurecache.errors import FeaturecacheError, check_seed


def setup_logging(verbose: bool = False) -> None:
    # Under torchrun every rank logs to the same terminal: say which rank speaks.
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.captureWarnings(True)  # Python warnings too, so that they also print clear of a progress bar


def run_main(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``main``; a FeaturecacheError becomes ``featurecache: error: ...`` and exit status 2. A torchrun rank
    ends here (``featurecache.distributed.exit_rank``), an unexpected error with its traceback and status 1."""
    setup_logging(getattr(args, "verbose", False))
    if not distributed.launched_by_torchrun():
        return _reported(main, args)
    try:
        status = _reported(main, args)
    except Exception:  # e.g. gloo's "connection closed by peer" once another rank failed
        traceback.print_exc()
        status = 1
    distributed.exit_rank(status)
    return status  # not reached


def _reported(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # a warning during a progress bar gets a line of its own, not the bar's
            return main(args)
    except FeaturecacheError as exc:
        print(f"featurecache: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = filesystem_error(exc)
        if message is None:
            raise  # not the user's environment: a bug, and its traceback is what a report needs
        print(f"featurecache: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featurecache: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def filesystem_error(exc: OSError) -> str | None:
    """One line for the filesystem refusing a write (read-only, no permission, full), naming the path; else None."""
    where = exc.filename or "FEATURECACHE_HOME"
    if exc.errno == errno.EROFS:
        return f"cannot write to {where} (read-only file system); set FEATURECACHE_HOME to a writable folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {where}; make it accessible, or set FEATURECACHE_HOME to a folder you own"
    if exc.errno == errno.ENOTDIR:
        return (
            f"cannot create {where}: a file stands where a folder of its path should be; set FEATURECACHE_HOME to a "
            f"folder"
        )
    if exc.errno == errno.ENOENT and not default_paths().root.is_dir():  # the home itself could not be made
        return f"cannot create {where}; set FEATURECACHE_HOME to a folder that exists or can be made"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left writing {where}; free space there (or set FEATURECACHE_HOME to a larger disk) and re-run: "
            f"finished work is kept"
        )
    return None


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def seed(text: str) -> int:
    """``--seed``: an integer :func:`featurecache.errors.check_seed` accepts, refused by argparse's usage line."""
    value = int(text)
    try:
        check_seed(value)
    except FeaturecacheError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seed ")) from None
    return value


def add_image_options(p: argparse.ArgumentParser) -> None:
    """The extraction options that say how a user's images are read and run, shared by ``extract`` and
    ``compare-layers`` (which extracts too): one definition, one help text, one default each."""
    from featurecache.data import (
        ALPHA_MODES,
        DECODE_MODES,
        DEFAULT_ALPHA,
        DEFAULT_DECODE,
        DEFAULT_ORIENTATION,
        ORIENTATION_MODES,
    )
    from featurecache.extract import DECODE_HELP, ORIENTATION_HELP
    from featurecache.runtime import RUNTIMES

    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 8 on the CPU, 32 on a GPU)")
    p.add_argument(
        "--runtime", default="auto", choices=RUNTIMES,
        help="where the base runs: auto = ONNX Runtime on the CPU (5-6x eager here, same numbers within 1e-5; "
        "checked against eager on the first batch), eager PyTorch with bf16 autocast on CUDA",
    )  # fmt: skip
    p.add_argument(
        "--alpha", default=DEFAULT_ALPHA, choices=list(ALPHA_MODES),
        help="background for transparent pixels (RGBA, LA, palette): white, black or mean (ImageNet's mean colour)",
    )  # fmt: skip
    p.add_argument("--orientation", default=DEFAULT_ORIENTATION, choices=ORIENTATION_MODES, help=ORIENTATION_HELP)
    p.add_argument("--decode", default=DEFAULT_DECODE, choices=DECODE_MODES, help=DECODE_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def extract_options(args: argparse.Namespace) -> Any:
    """The :class:`featurecache.extract.ExtractOptions` of the options an entry point defines (the others keep
    their defaults): each field is read from the argument of the same name."""
    import dataclasses

    from featurecache.extract import ExtractOptions

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractOptions) if hasattr(args, f.name)}
    return ExtractOptions(**given)
