"""make bench, extraction: every figure measured in a fresh process of its own, as a user's ``featurecache extract``.

Timed inside the bench's own process, a runtime's bare forward ran ~20% slower than in a fresh one (206 vs 169
img/s for ONNX Runtime on EfficientNet-Lite0, 2 cores): that process holds every runtime's sessions and thread
pools and several GiB, which flattered end-to-end / bare. So each measurement here is one child process
(``python -m benchmarks.extraction MODE ...``) that loads what it needs, warms up untimed, times one thing and
prints it as one line of JSON. The parent runs a warm-up round (it exports the graphs), then the same children
round after round (A, B, C, A, B, C ...: the VM's drift hits every figure alike) and reports medians.

Children:
  split  one ``extract`` of a folder's train split into a home that keeps its exported graphs (the cache file
         itself is removed afterwards, so the next run extracts again): whole split and forward loop img/s.
  bare   the bare forward: the first ``--images`` images decoded and normalized in memory, through the runtime
         as the extraction loop drives it (its lanes), after one untimed pass; and its error vs eager.
  peer   the hand-written peer: one eager pass per layer, images decoded in the loop, each layer saved to .npy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE = "efficientnet_lite0"
SPLIT_IMAGES = 640  # enough that a split's one-off costs (planning, first-batch check) weigh as on real data
BARE_IMAGES = 192  # several batches for each of ONNX Runtime's lanes (two batches at once)
PEER_TAPS = 4  # the naive peer extracts this many stage taps, one eager pass per layer
PEER_IMAGES = 32
HEAVY = {"base": "resnet50", "weights": "none", "images": 192}  # speed needs no pretrained weights


def make_photos(root: Path, n: int) -> Path:
    """JPEGs of 320x240 smooth noise (photo-sized and photo-compressible), two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 4), ("test", 4)):
        for i in range(count):
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def runner_for(name: str, work: Path, taps: list, loaded: Any = None, batch_size: int | None = None) -> Any:
    """A runner of ``name`` over ``taps``, its export (if any) under ``work``; ``prepare`` checks it against eager."""
    from featurecache import runtime
    from featurecache.bases import load_base
    from featurecache.config import Paths
    from featurecache.extract import ExtractOptions, _Runner

    loaded = loaded or load_base(BASE)
    identity = runtime.export_identity(
        base=loaded.spec.name, weights=loaded.weights_id, input_size=loaded.spec.input_size, taps=taps
    )
    export = Paths(work / "exports").export_file("bench", loaded.spec.name, runtime.export_digest(identity))
    options = ExtractOptions(progress=False, runtime=name, batch_size=batch_size)
    return _Runner(loaded, "cpu", options, taps=taps, export_file=export)


def forward_seconds(runner: Any, module: Any, images: Any, batch_size: int) -> float:
    """The bare forward: in-memory batches through the runtime as the extraction loop drives it (its lanes)."""
    batches = ((images[start : start + batch_size],) for start in range(0, len(images), batch_size))
    t0 = time.perf_counter()
    for _ in runner.forward_batches(module, batches):
        pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- children


def _split(args: argparse.Namespace) -> dict[str, Any]:
    from featurecache import store
    from featurecache.config import Paths
    from featurecache.extract import ExtractOptions, ExtractRequest, extract

    request = ExtractRequest(args.root, base=args.base, weights=args.weights, layers=args.layers, splits=["train"])
    options = ExtractOptions(progress=False, runtime=args.runtime, batch_size=args.batch_size)
    (result,) = extract(request, paths=Paths(args.work), options=options)
    used = store.read_metadata(result.path)["runtime"]
    result.path.unlink()  # the next run extracts again; the exported graph stays
    return {"whole": result.num_samples / result.seconds, "loop": result.images_per_second, "runtime": used,
            "seconds": result.seconds}  # fmt: skip


def _bare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from featurecache import runtime
    from featurecache.bases import load_base
    from featurecache.data import ImageFiles, discover_splits
    from featurecache.layers import parse_taps, trace_base

    loaded = load_base(args.base, weights=args.weights)
    taps = parse_taps(args.layers, trace_base(loaded))
    runner = runner_for(args.runtime, args.work, taps, loaded, args.batch_size)
    index = discover_splits(args.root)["train"]
    data = ImageFiles(index, runner.preprocessing.per_image, input_size=loaded.spec.input_size,
                      rows=range(args.images))  # fmt: skip
    images = runner.preprocessing.normalize(torch.stack([data[i][0] for i in range(args.images)]))
    runner.prepare(index)  # loads the export (written by the warm-up round) and checks it against eager
    if runner.runtime != args.runtime:
        raise SystemExit(f"{args.runtime} was refused against eager; no bare forward to time")
    module = runner.extractor(taps)
    probe = images[:8]
    error = max(runtime.relative_errors(module(probe), runner._eager(taps)(probe)).values())
    batch = runner.options.batch_size  # --batch-size, else the extraction's default on this device
    forward_seconds(runner, module, images, batch)  # untimed: the sessions' memory at the batch shape, the kernels
    return {"img_s": args.images / forward_seconds(runner, module, images, batch), "error": error, "batch": batch}


def _peer(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from featurecache.bases import load_base
    from featurecache.layers import build_extractor, parse_taps, trace_base

    loaded = load_base(args.base, weights=args.weights)
    taps = parse_taps(args.layers, trace_base(loaded))
    files = sorted((args.root / "train").rglob("*.jpg"))[: args.images]
    transform = loaded.spec.transforms()
    t0 = time.perf_counter()
    for tap in taps:
        extractor = build_extractor(loaded, [tap])
        rows = []
        for start in range(0, len(files), 32):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start : start + 32]])
            with torch.inference_mode():
                rows.append(extractor(batch)[tap.key].numpy())
        np.save(args.work / f"peer-{tap.key}.npy", np.concatenate(rows))
    return {"img_s": len(files) / (time.perf_counter() - t0)}


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"split": _split, "bare": _bare, "peer": _peer}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("benchmarks.extraction", description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("mode", choices=sorted(CHILDREN))
    parser.add_argument("--root", type=Path, required=True, help="image folder (train/<class>/*.jpg)")
    parser.add_argument("--work", type=Path, required=True, help="featurecache home / export folder")
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--layers", default="all-stages")
    parser.add_argument("--images", type=int, default=BARE_IMAGES)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the extraction's on the CPU")
    return parser


def main(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore")
    print(json.dumps(CHILDREN[args.mode](args)), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent


def _child(mode: str, **flags: Any) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.extraction", mode]
    for key, value in flags.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _jobs(work: Path, names: list[str], default: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every child of one round, by name: (mode, flags)."""
    from featurecache.bases import load_base
    from featurecache.layers import parse_taps, trace_base

    root, heavy_root = make_photos(work / "photos", SPLIT_IMAGES), make_photos(work / "photos-heavy", HEAVY["images"])
    taps = parse_taps("all-stages", trace_base(load_base(BASE)))
    peer_layers = ",".join(t.query for t in taps[:PEER_TAPS])
    lite = {"root": root, "work": work / "home"}
    heavy = {"root": heavy_root, "work": work / "home", "base": HEAVY["base"], "weights": HEAVY["weights"]}
    return {
        "split": ("split", {**lite, "runtime": default}),
        "split-peer-taps": ("split", {**lite, "runtime": default, "layers": peer_layers}),
        **{f"bare-{name}": ("bare", {**lite, "runtime": name}) for name in names},
        "bare-pooled-head": ("bare", {**lite, "runtime": default, "layers": "view"}),
        "peer": ("peer", {**lite, "work": work, "layers": peer_layers, "images": PEER_IMAGES}),
        "heavy-split": ("split", {**heavy, "runtime": default}),
        "heavy-bare": ("bare", {**heavy, "runtime": default, "images": HEAVY["images"]}),
    }


def bench_extraction(work: Path, report: Callable[..., None], rounds: int = 3) -> dict[str, Any]:
    """Run every child once to warm up (exports), then ``rounds`` times interleaved; report the medians."""
    from featurecache import runtime

    names = [r for r in ("eager", "onnxruntime", "openvino") if runtime.available(r)]
    default = runtime.resolve_runtime("auto", "cpu")
    jobs = _jobs(work, names, default)
    first = {key: _child(mode, **flags) for key, (mode, flags) in jobs.items()}  # exports every graph once
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, (mode, flags) in jobs.items():
            runs[key].append(_child(mode, **flags))
    for key in ("split", "split-peer-taps", "heavy-split"):
        if {r["runtime"] for r in runs[key]} != {default}:
            raise RuntimeError(f"{key}: {default} was refused against eager in a timed run")
    median = {key: {field: float(np.median([r[field] for r in rs])) for field in rs[0] if field != "runtime"}
              for key, rs in runs.items()}  # fmt: skip
    median["export_s"] = first["split"]["seconds"] - median["split"]["seconds"]
    median["decode_ms"] = _decode_costs(jobs["split"][1]["root"])
    _report(report, median, names, default)
    return median


def _decode_costs(root: Path, n: int = BARE_IMAGES) -> tuple[float, float]:
    """ms per image of the decode worker's share (PIL decode + resize + crop to uint8, one thread) and of the
    batched normalize on the main side."""
    import torch

    from featurecache.bases import load_base
    from featurecache.data import ImageFiles, discover_splits
    from featurecache.preprocess import Preprocessing

    preprocessing = Preprocessing(load_base(BASE).spec.transforms())
    data = ImageFiles(discover_splits(root)["train"], preprocessing.per_image, input_size=224, rows=range(n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0 = time.perf_counter()
    pixels = torch.stack([data[i][0] for i in range(n)])
    decode = time.perf_counter() - t0
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for start in range(0, n, 32):
        preprocessing.normalize(pixels[start : start + 32], reuse=True)
    return 1000 * decode / n, 1000 * (time.perf_counter() - t0) / n


def _report(report: Callable[..., None], m: dict[str, Any], names: list[str], default: str) -> None:
    import torch

    eager, same = m["bare-eager"]["img_s"], m[f"bare-{default}"]["img_s"]
    whole, loop = m["split"]["whole"], m["split"]["loop"]
    batch, threads = int(m["bare-eager"]["batch"]), torch.get_num_threads()
    setting = f"Lite0, 7 stage taps, batch {batch}, {threads} threads, {SPLIT_IMAGES} JPEGs 320x240"
    report("extraction", "end-to-end / eager bare forward", whole / eager, ">= 2.0", whole / eager >= 2.0,
           f"{whole:.1f} vs {eager:.1f} img/s ({default}; {setting}; each in a fresh process)")  # fmt: skip
    for name in names:
        bare = m[f"bare-{name}"]
        report("runtimes", f"{name} bare forward / eager", bare["img_s"] / eager, "report", None,
               f"{bare['img_s']:.1f} img/s, max relative error vs eager {bare['error']:.1e} (bound 1e-4)")  # fmt: skip
    report("extraction", f"end-to-end / {default} bare forward", whole / same, ">= 0.9", whole / same >= 0.9,
           f"{whole:.1f} vs {same:.1f} img/s, the whole split: planning, first-batch check, loop, HDF5")  # fmt: skip
    report("extraction", f"forward loop alone / {default} bare forward", loop / same, "report", None,
           f"{loop:.1f} img/s: decode in a worker, forward in lanes, journal on a writer thread")  # fmt: skip
    decode_ms, normalize_ms = m["decode_ms"]
    report("extraction", "PIL decode + resize + crop to uint8, ms per image", decode_ms, "report", None,
           f"1 thread, as in a worker; + {normalize_ms:.2f} ms batched normalize on the main side; vs "
           f"{2000 / same:.1f} ms of CPU per image in the {default} forward on 2 cores")  # fmt: skip
    report("runtimes", "one-off export + first check (s)", m["export_s"], "report", None,
           "the first split's extra seconds; once per base x weights x taps x input size")  # fmt: skip
    heavy_whole, heavy_bare = m["heavy-split"]["whole"], m["heavy-bare"]["img_s"]
    report("extraction", f"{HEAVY['base']} (random init) end-to-end / bare", heavy_whole / heavy_bare, ">= 0.9",
           heavy_whole / heavy_bare >= 0.9, f"{heavy_whole:.1f} vs {heavy_bare:.1f} img/s on {default}, "
           f"{HEAVY['images']} JPEGs; loop alone {m['heavy-split']['loop'] / heavy_bare:.2f}")  # fmt: skip
    ours, peer = m["split-peer-taps"]["whole"], m["peer"]["img_s"]
    report("peer", f"ours end-to-end / naive per-layer eager loop ({PEER_TAPS} taps)", ours / peer, ">= 3",
           ours / peer >= 3, f"{ours:.1f} vs {peer:.2f} img/s ({default} vs eager, one pass per layer)")  # fmt: skip
    pooled = m["bare-pooled-head"]["img_s"]
    report("multitap", "time of all 7 stage taps / pooled head only", pooled / same, "<= 1.10", pooled / same <= 1.10,
           f"{same:.1f} vs {pooled:.1f} img/s on {default} (per-layer passes would cost 7x)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
