"""featurecache verify PATH...: read every dataset of feature caches through their checksums; exit 2 if any is corrupt.

A PATH is a cache file or a folder searched for ``*.h5`` (``data/features/<dataset>`` checks every base and split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featurecache.config import default_paths
from featurecache.errors import FeaturecacheError
from featurecache.store import verify_cache
from pipelines.common import run_main


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("featurecache verify", description=__doc__, add_help=add_help)
    p.add_argument("paths", nargs="+", help="cache files or folders of caches (data/features/<dataset>)")
    return p


def _cache_files(paths: list[str]) -> list[Path]:
    files = []
    for given in map(default_paths().find, paths):  # relative to here, else to the home
        if given.is_dir():
            found = sorted(p for p in given.rglob("*.h5") if not p.name.startswith("."))
            if not found:
                raise FeaturecacheError(f"no cache files (*.h5) under {given}; run `featurecache extract` first")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise FeaturecacheError(
                f"{given} does not exist, here or under FEATURECACHE_HOME ({default_paths().root}); pass cache files "
                f"or folders under its data/features"
            )
    return files


def main(args: argparse.Namespace) -> int:
    bad = []
    for path in _cache_files(args.paths):
        try:
            checks = verify_cache(path)
        except FeaturecacheError as exc:
            print(f"CORRUPT {path}: {exc}")
            bad.append(str(path))
            continue
        failed = [c for c in checks if not c.ok]
        print(f"{'CORRUPT' if failed else 'OK':7s} {path} ({len(checks) - len(failed)} of {len(checks)} datasets ok)")
        for check in checks:
            print(f"  {'ok' if check.ok else 'CORRUPT':7s} {check.name}" + (f": {check.error}" if check.error else ""))
        if failed:
            bad.append(str(path))
    if bad:
        raise FeaturecacheError(
            f"{len(bad)} corrupt cache(s): {', '.join(bad)}; delete them and re-run extract (other caches are kept)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
