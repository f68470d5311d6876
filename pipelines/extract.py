"""featurecache extract: frozen base -> per-layer HDF5 caches for every split of a dataset.

Also the torchrun entry point: ``torchrun --nproc-per-node N -m pipelines.extract ROOT ...`` splits every split's
batches over N ranks (gloo on CPU, NCCL on GPUs) and writes the same cache one process would.
"""

from __future__ import annotations

import argparse
import sys

from featurecache import distributed
from featurecache.config import default_paths
from featurecache.datasets import parse_dataset
from featurecache.extract import ExtractRequest, extract
from featurecache.runtime import PRECISIONS
from pipelines.common import add_image_options, comma_list, extract_options, run_main, seed


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache extract", description=__doc__, add_help=add_help)
    p.add_argument(
        "dataset_root",
        help="a folder, ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>, "
        "or a built-in dataset name (prepared on first use; see `featurecache data`)",
    )
    p.add_argument("--base", default="efficientnet_lite0", help="base name (see list-bases)")
    p.add_argument(
        "--layers",
        default="all-stages",
        help="'all-stages' or comma-separated node/module names, each optionally ':pool' (see list-layers)",
    )
    p.add_argument("--pool", default="avg", help="pooling for layers without ':pool': avg|max|grid2|grid3|grid4|raw")
    p.add_argument("--dataset", help="name in data/features/ (default: the folder's name)")
    p.add_argument("--splits", type=comma_list, default=["train", "val", "test"], help="comma-separated splits")
    p.add_argument("--weights", default="default", help="default (pretrained), none (random init) or a variant")
    p.add_argument("--weights-file", help="local state_dict file to load instead of the cached weights")
    p.add_argument(
        "--workers",
        type=int,
        help="decode processes (DataLoader workers; 0: decode in the main thread). "
        "Default: decode threads on the CPU (1 on 2 cores), up to 8 worker processes on CUDA",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="storage dtype (auto: float16, float32 for --weights none)")  # fmt: skip
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast on CUDA")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument(
        "--precision", default="f32", choices=PRECISIONS,
        help="bf16: OpenVINO's bf16 hint (~1.8x faster on CPUs with bf16, errors ~5e-2; recorded in the cache)",
    )  # fmt: skip
    p.add_argument("--compression", default="none", choices=["gzip", "lzf", "none"],
                   help="none reads ~12x faster; gzip halves the file (see BENCHMARKS.md)")  # fmt: skip
    p.add_argument("--on-bad-image", default="skip", choices=["skip", "fail"])
    p.add_argument("--fingerprint", default="content", choices=["content", "stat"], help="how input files are hashed")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed of a missing val/test split (default: the recorded split's, 0 for a first one), "
                        "of random init and of the views (default 0)")  # fmt: skip
    p.add_argument(
        "--train-views", type=int, default=0, metavar="K",
        help="also cache K augmented views of every train image (train-aug.h5), for train-heads --augmented",
    )  # fmt: skip
    p.add_argument(
        "--augment", default="light", choices=["light", "standard"],
        help="augmentation of those views: light (crop, small rotation/colour) or standard (+ flips)",
    )  # fmt: skip
    add_image_options(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    options = extract_options(args)
    source = parse_dataset(args.dataset_root)
    paths = default_paths()
    world = distributed.init_from_environment(args.device)  # a world of one unless launched by torchrun
    try:
        results = extract(
            ExtractRequest(
                source.root(paths.raw, paths.external),
                base=args.base,
                layers=args.layers,
                pool=args.pool,
                dataset=args.dataset or source.name,
                splits=args.splits,
                weights=args.weights,
                weights_file=args.weights_file,
                seed=args.seed,
                train_views=args.train_views,
                augment=args.augment,
            ),
            options=options,
            world=world,
        )
    finally:
        distributed.shutdown(world)
    if not world.is_main:
        return 0
    ranks = f" on {world.size} ranks" if world.distributed else ""
    for r in results:
        speed = f", {r.images_per_second:.1f} img/s{ranks}" if r.status != "cached" and r.images_per_second > 0 else ""
        print(
            f"{r.split:9s} {r.status:10s} {r.num_samples:6d} images ({r.num_samples - r.num_skipped} read, "
            f"{r.num_skipped} skipped){speed}, "
            f"{r.file_bytes / 1024:.0f} KiB -> {r.path}"
        )
    if results:
        print(f"layers: {', '.join(results[0].taps)}")
        print(f"inspect with: featurecache info {results[0].path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))  # a torchrun rank leaves inside (see exit_rank)
