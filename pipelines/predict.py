"""featurecache predict: classify images with a trained head (base + tap + head, rebuilt from its sidecar)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from featurecache.data import files_under
from featurecache.errors import FeaturecacheError
from featurecache.predict import predict_images
from featurecache.runtime import RUNTIMES
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache predict", description=__doc__, add_help=add_help)
    p.add_argument("--head", required=True,
                   help="models/<dataset>/<base>/<layer>/<head> (or its head.skops), or a fine-tuned model's folder "
                   "(.../finetuned-mlp)")  # fmt: skip
    p.add_argument("images", nargs="+", help="image files, or folders (every file below them)")
    p.add_argument("--weights-file", help="the weights file the base was extracted with, if it was")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--runtime", choices=RUNTIMES,
                   help="default: the runtime the head's training features were made on (a fine-tuned model runs "
                   "in eager torch)")  # fmt: skip
    return p


def _files_of(path: Path) -> list[Path]:
    """A file argument as it is; a folder: every file below it (an empty one is a mistake worth a line)."""
    if path.exists() and not path.is_dir() and not path.is_file():  # reading a FIFO would wait for ever
        raise FeaturecacheError(f"{path} is not a file (a pipe, socket or device); pass image files or folders")
    if not path.is_dir():
        return [path]
    files = files_under(path)
    if not files:
        raise FeaturecacheError(f"{path} holds no files to classify; pass image files or a folder of them")
    return files


def _confidence(row: dict) -> str:
    if "vote_share" in row:  # a k-NN head: no probability, the weighted share of its neighbours' votes
        return f"  votes={row['vote_share']:.3f} of {row['neighbours']} neighbour{'s' * (row['neighbours'] != 1)}"
    return f"  p={row['probability']:.3f}" if "probability" in row else ""


def main(args: argparse.Namespace) -> int:
    images = [f for arg in args.images for f in _files_of(Path(arg))]
    rows = predict_images(args.head, images, weights_file=args.weights_file, runtime=args.runtime)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        elif "error" in row:
            print(f"{row['path']}\tunreadable: {row['error']}", file=sys.stderr)
        else:
            print(f"{row['path']}\t{row['label']}{_confidence(row)}")
    return 1 if any("error" in row for row in rows) else 0  # the readable images are classified either way


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
