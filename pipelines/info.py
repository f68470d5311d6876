"""featurecache info FILE: what a feature cache holds (schema, taps, sizes, skipped files)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from featurecache.config import default_paths
from featurecache.data import SPLITS, Decoding
from featurecache.errors import FeaturecacheError
from featurecache.store import read_metadata, read_skipped, recorded
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache info", description=__doc__, add_help=add_help)
    p.add_argument("files", nargs="*", help="cache files (data/features/<dataset>/<base>/<split>.h5)")
    p.add_argument("--dataset", help="instead of files: every split cached for this dataset (with --base)")
    p.add_argument("--base", default="efficientnet_lite0", help="the base (cache folder) of --dataset")
    p.add_argument("--json", action="store_true", help="print the attrs as JSON")
    return p


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(_shown(str(n)) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shown(text: str) -> str:
    """A file name for the terminal: bytes that are not valid UTF-8 shown as \\xNN instead of failing to print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _caches_at(path: Path) -> list[str]:
    """A file as given; a folder (``data/features/<dataset>`` or one base's): every cache below it."""
    if not path.is_dir():
        return [str(path)]
    found = sorted(str(p) for p in path.rglob("*.h5"))
    if not found:
        raise FeaturecacheError(f"no feature cache below {path}; run `featurecache extract` first")
    return found


def main(args: argparse.Namespace) -> int:
    import h5py

    files = [f for arg in args.files for f in _caches_at(default_paths().find(arg))]  # relative to here, else home
    if args.dataset:
        files += [str(p) for s in SPLITS if (p := default_paths().feature_file(args.dataset, args.base, s)).is_file()]
    if not files:
        where = default_paths().features / (args.dataset or "<dataset>") / args.base
        raise FeaturecacheError(f"no cache files given or found under {where}; run `featurecache extract` first")
    for path in files:
        meta = read_metadata(path)
        if args.json:
            print(json.dumps({"file": path, **meta}, indent=1, default=str))
            continue
        print(f"{path}")
        print(
            f"  dataset {meta['dataset']} / split {meta['split']}: {meta['num_samples']} samples, "
            f"{meta['num_samples'] - meta['num_valid']} skipped, {len(meta['class_names'])} classes "
            f"({_listed(meta['class_names'])})"
        )
        print(f"  base {meta['base']}  weights {meta['weights']}  amp {meta['amp']}")
        # What else changes the numbers: where the base ran and how the images were decoded (absent: the defaults).
        decoding = Decoding.recorded(meta)
        print(f"  runtime {recorded(meta, 'runtime')} {recorded(meta, 'precision')}  decode {decoding.decode}  "
              f"orientation {decoding.orientation}  alpha {meta.get('alpha', 'not recorded')}")  # fmt: skip
        print(
            f"  schema v{meta['schema_version']}  dtype {meta['dtype']}  compression {meta['compression']}  "
            f"created {meta['created_utc']}"
        )
        # The config fingerprint decides reuse: a command that adds a layer must leave it unchanged.
        print(f"  data fingerprint {meta['data_fingerprint']}  config fingerprint {meta['config_fingerprint']}")
        if meta.get("views"):
            n, source = meta["source_rows"], meta["source_split"]
            print(
                f"  {meta['views']} {meta['augment']} augmented views of the {n} {source} rows, view-major "
                f"(row r = view r // {n} of {source} row r % {n})"
            )
        if meta.get("world_size", 1) > 1:
            print(f"  extracted by {meta['world_size']} torchrun ranks")
        with h5py.File(path, "r") as f:
            print(f"  {'layer':28s} {'node':28s} {'pool':6s} {'map':>12s} {'dim':>6s} {'depth':>6s} {'stored':>10s}")
            for key, tap in meta["taps"].items():
                dset = f["features"][key]
                stored = dset.id.get_storage_size()
                shape = "x".join(str(s) for s in tap["map_shape"])
                print(
                    f"  {key:28s} {tap['node']:28s} {tap['pool']:6s} {shape:>12s} {tap['out_dim']:6d} "
                    f"{tap['relative_depth']:6.2f} {stored / 1024:8.0f}KiB"
                )
        for row, p, reason in read_skipped(path):
            print(f"  skipped row {row}: {_shown(p)} ({_shown(reason)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
