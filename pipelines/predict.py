"""featurecache predict: classify images with a trained head (base + tap + head, rebuilt from its sidecar)."""

from __future__ import annotations

import argparse
import json
import sys

from featurecache.predict import predict_images
from featurecache.runtime import RUNTIMES
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache predict", description=__doc__, add_help=add_help)
    p.add_argument("--head", required=True,
                   help="models/<dataset>/<base>/<layer>/<head> (or its head.skops), or a fine-tuned model's folder "
                   "(.../finetuned-mlp)")  # fmt: skip
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--weights-file", help="the weights file the base was extracted with, if it was")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--runtime", choices=RUNTIMES,
                   help="default: the runtime the head's training features were made on (a fine-tuned model runs "
                   "in eager torch)")  # fmt: skip
    return p


def main(args: argparse.Namespace) -> int:
    for row in predict_images(args.head, args.images, weights_file=args.weights_file, runtime=args.runtime):
        if args.json:
            print(json.dumps(row))
        else:
            prob = f"  p={row['probability']:.3f}" if "probability" in row else ""
            print(f"{row['path']}\t{row['label']}{prob}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
