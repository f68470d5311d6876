"""make bench, extraction: every figure measured in a fresh process of its own, as a user's ``featurecache extract``.

Timed inside the bench's own process, a runtime's bare forward ran ~20% slower than in a fresh one (169 vs 206
img/s for ONNX Runtime on EfficientNet-Lite0, 2 cores): that process holds every runtime's sessions and thread
pools and several GiB, which flattered end-to-end / bare. So each measurement here is one child process
(``python -m benchmarks.extraction MODE ...``) that loads what it needs, warms up untimed, times one thing and
prints it as one ``RESULT {json}`` line. The parent runs a warm-up round (it exports the graphs), then the same
children round after round, in a seeded shuffled order each round (the VM's drift hits every figure alike, and no
child always runs after the same one), and reports medians.

Children:
  split  one ``extract`` of a folder's train split into a home that keeps its exported graphs (the cache file
         itself is removed afterwards, so the next run extracts again): whole split and forward loop img/s.
  bare   the bare forward: the first ``--images`` images decoded and normalized in memory, through the runtime
         as the extraction loop drives it (its lanes), after one untimed pass; and its error vs eager.
  peer   the hand-written peer: one eager pass per layer, images decoded in the loop, each layer saved to .npy.
  decode the decode worker's share (PIL decode + resize + crop to uint8, one thread) and the batched normalize.
  draft  that share for 12 MP JPEGs decoded in full and with ``--decode draft``, alternating, and how far apart
         the pixels end up; the ``split`` child with ``--decode`` gives the same comparison end to end.
  tensor that share by PIL and by ``--decode gpu``'s path run on the CPU (libjpeg-turbo, torch's resize),
         alternating, and how far apart the pixels end up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
PEER_IMAGES = 128  # the peer is slow (one pass per layer): fewer images, but several batches per layer
HEAVY = {"base": "resnet50", "weights": "none"}  # speed needs no pretrained weights
CHILD_TIMEOUT_S = 600
BIG_IMAGES, BIG_SIZE = 48, (4032, 3024)  # a phone camera's 12 MP photos, for --decode draft
EXPORTING = ("split", "split-peer-taps", "bare-pooled-head", "heavy-split", "big-split")  # the warm-up round
RESULT = "RESULT "


def make_photos(
    root: Path, n: int, *, size: tuple[int, int] = (320, 240), grid: tuple[int, int] = (30, 40), held_out: int = 4,
    seed: int = 0,
) -> Path:  # fmt: skip
    """JPEGs of ``size`` smooth noise (a ``grid`` of random colours upscaled: photo-like and photo-compressible),
    two classes; ``n`` in train, ``held_out`` in val and in test."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", held_out), ("test", held_out)):
        for i in range(count):
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (*grid, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def runner_for(
    name: str, work: Path, taps: list, loaded: Any = None, batch_size: int | None = None, dataset: str = "bench",
    device: str = "cpu",
) -> Any:  # fmt: skip
    """A runner of ``name`` over ``taps``; ``prepare`` checks it against eager. Its export is where ``featurecache
    extract`` with home ``work`` keeps the export of ``dataset`` (so a bare child reuses the split child's)."""
    from featurecache.bases import load_base
    from featurecache.config import Paths
    from featurecache.extract import ExtractOptions, _export_file, _Runner

    loaded = loaded or load_base(BASE)
    options = ExtractOptions(progress=False, runtime=name, batch_size=batch_size)
    return _Runner(loaded, device, options, taps=taps, export_file=_export_file(loaded, taps, dataset, Paths(work)))


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
    options = ExtractOptions(progress=False, runtime=args.runtime, batch_size=args.batch_size, decode=args.decode,
                             device=args.device)  # fmt: skip
    (result,) = extract(request, paths=Paths(args.work), options=options)
    used = store.read_metadata(result.path)["runtime"]
    result.path.unlink()  # the next run extracts again; the exported graph stays
    return {"whole": result.num_samples / result.seconds, "loop": result.images_per_second, "runtime": used,
            "seconds": result.seconds}  # fmt: skip


def _bare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from featurecache import runtime
    from featurecache.bases import load_base
    from featurecache.data import discover_splits
    from featurecache.layers import parse_taps, trace_base

    loaded = load_base(args.base, weights=args.weights)
    taps = parse_taps(args.layers, trace_base(loaded))
    requested = runtime.resolve_runtime(args.runtime, args.device)
    runner = runner_for(requested, args.work, taps, loaded, args.batch_size, dataset=args.root.resolve().name,
                        device=args.device)  # fmt: skip
    index = discover_splits(args.root)["train"]
    data = runner.image_files(index, range(args.images))
    pixels = torch.stack([data[i][0] for i in range(args.images)]).to(args.device)  # on a GPU: there already
    images = runner.preprocessing.normalize(pixels)
    runner.prepare(index)  # loads the export (written by the warm-up round) and checks it against eager
    if runner.runtime != requested:
        raise SystemExit(f"{requested} was refused against eager; no bare forward to time")
    module = runner.extractor(taps)
    probe = images[:8]
    error = max(runtime.relative_errors(module(probe), runner._eager(taps)(probe)).values())
    batch = runner.options.batch_size  # --batch-size, else the extraction's default on this device
    forward_seconds(runner, module, images, batch)  # untimed: the sessions' memory at the batch shape, the kernels
    seconds = forward_seconds(runner, module, images, batch)
    return {"img_s": args.images / seconds, "error": error, "batch": batch, "taps": len(taps),
            "threads": torch.get_num_threads()}  # fmt: skip


def _peer(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from featurecache.bases import load_base
    from featurecache.extract import default_batch_size
    from featurecache.layers import build_extractor, parse_taps, trace_base

    loaded = load_base(args.base, weights=args.weights)
    taps = parse_taps(args.layers, trace_base(loaded))
    files = sorted((args.root / "train").rglob("*.jpg"))[: args.images]
    transform = loaded.spec.transforms()
    step = args.batch_size or default_batch_size("cpu")  # eager's fastest on the CPU too: no handicap
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for tap in taps:
        extractor = build_extractor(loaded, [tap])
        rows = []
        for start in range(0, len(files), step):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start : start + step]])
            with torch.inference_mode():
                rows.append(extractor(batch)[tap.key].numpy())
        np.save(args.work / f"peer-{tap.key}.npy", np.concatenate(rows))
    return {"img_s": len(files) / (time.perf_counter() - t0)}


def _decode(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from featurecache.bases import load_base
    from featurecache.data import ImageFiles, discover_splits
    from featurecache.extract import default_batch_size
    from featurecache.preprocess import Preprocessing

    loaded = load_base(args.base, weights=args.weights)
    preprocessing = Preprocessing(loaded.spec.transforms())
    data = ImageFiles(discover_splits(args.root)["train"], preprocessing.per_image,
                      input_size=loaded.spec.input_size, rows=range(args.images))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0 = time.perf_counter()
    pixels = torch.stack([data[i][0] for i in range(args.images)])
    decode = time.perf_counter() - t0
    torch.set_num_threads(threads)
    step = args.batch_size or default_batch_size("cpu")
    t0 = time.perf_counter()
    for start in range(0, args.images, step):
        preprocessing.normalize(pixels[start : start + step], reuse=True)
    normalize = time.perf_counter() - t0
    return {"decode_ms": 1000 * decode / args.images, "normalize_ms": 1000 * normalize / args.images}


def _alternated(
    decoders: dict[str, Callable[[], list[np.ndarray]]], images: int, rounds: int
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Each decoder's median ms per image over ``rounds`` rounds run in alternating order, and the pixels the first
    and the second gave, as (images, C, H, W) int16 arrays."""
    spent: dict[str, list[float]] = {name: [] for name in decoders}
    pixels: dict[str, list[np.ndarray]] = {}
    for r in range(rounds):
        for name in decoders if r % 2 == 0 else reversed(decoders):
            t0 = time.perf_counter()
            pixels[name] = decoders[name]()
            spent[name].append(1000 * (time.perf_counter() - t0) / images)
    first, second = (np.stack(pixels[name]).astype(np.int16) for name in decoders)
    return {name: float(np.median(ms)) for name, ms in spent.items()}, first, second


def _preprocessing_and_jpegs(args: argparse.Namespace) -> tuple[Any, list[Path]]:
    """The base's preprocessing and the first ``--images`` train JPEGs: what the decode-path children compare."""
    from featurecache.bases import load_base
    from featurecache.preprocess import Preprocessing

    preprocessing = Preprocessing(load_base(args.base, weights=args.weights).spec.transforms())
    return preprocessing, sorted((args.root / "train").rglob("*.jpg"))[: args.images]


def _draft(args: argparse.Namespace) -> dict[str, Any]:
    from featurecache.data import load_image

    preprocessing, files = _preprocessing_and_jpegs(args)
    modes = {"full": None, "draft": preprocessing.draft_size()}
    decoders = {mode: (lambda draft=draft: [preprocessing.per_image(load_image(f, draft=draft)).numpy()
                                            for f in files]) for mode, draft in modes.items()}  # fmt: skip
    ms, full, draft = _alternated(decoders, len(files), rounds=3)
    diff = np.abs(full - draft)
    return {
        "full_ms": ms["full"],
        "draft_ms": ms["draft"],
        "mean_diff": float(diff.mean()),
        "max_diff": int(diff.max()),
    }


def _tensor(args: argparse.Namespace) -> dict[str, Any]:
    """PIL's decode + resize + crop against ``--decode gpu``'s path run on the CPU (libjpeg-turbo + torch's float32
    resize, one thread), alternating, and how far apart the pixels end up: why that path is not offered on the CPU."""
    import torch

    from featurecache import gpu_decode
    from featurecache.data import Decoding, load_image, read_encoded
    from featurecache.preprocess import device_geometry_for

    torch.set_num_threads(1)  # as one decoder
    preprocessing, files = _preprocessing_and_jpegs(args)
    geometry = device_geometry_for(preprocessing, "gpu")

    def tensor_path() -> list[np.ndarray]:
        items = [read_encoded(f, Decoding(), geometry) for f in files]
        return list(gpu_decode.decode_batch(items, [""] * len(items), geometry, "cpu")[0].numpy())

    decoders = {"pil": lambda: [preprocessing.per_image(load_image(f)).numpy() for f in files], "tensor": tensor_path}
    ms, pil, tensor = _alternated(decoders, len(files), rounds=5)
    diff = np.abs(pil - tensor)
    return {
        "pil_ms": ms["pil"],
        "tensor_ms": ms["tensor"],
        "max_diff": int(diff.max()),
        "differ": float((diff > 0).mean()),
    }


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "split": _split, "bare": _bare, "peer": _peer, "decode": _decode, "draft": _draft, "tensor": _tensor,
}  # fmt: skip


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
    parser.add_argument("--decode", default="full", help="featurecache extract --decode")
    parser.add_argument("--device", default="cpu", help="split and bare: featurecache extract --device")
    return parser


def main(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore")
    print(RESULT + json.dumps(CHILDREN[args.mode](args)), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent


def _child(mode: str, flags: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.extraction", mode]
    for key, value in flags.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(command)} ran past {CHILD_TIMEOUT_S} s") from exc
    results = [line[len(RESULT) :] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not results:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(results[-1])


def _jobs(work: Path, names: list[str], default: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every child of one round, by name: (mode, flags)."""
    from featurecache.bases import load_base
    from featurecache.layers import parse_taps, trace_base

    root = make_photos(work / "photos", SPLIT_IMAGES)
    big_root = make_photos(work / "big", BIG_IMAGES, size=BIG_SIZE, grid=(60, 80), held_out=2, seed=1)
    big = {"root": big_root, "work": work / "home"}
    taps = parse_taps("all-stages", trace_base(load_base(BASE)))
    peer_layers = ",".join(t.query for t in taps[:PEER_TAPS])
    lite = {"root": root, "work": work / "home"}
    heavy = {**lite, **HEAVY}
    return {
        "split": ("split", {**lite, "runtime": default}),
        "split-peer-taps": ("split", {**lite, "runtime": default, "layers": peer_layers}),
        **{f"bare-{name}": ("bare", {**lite, "runtime": name}) for name in names},
        "bare-pooled-head": ("bare", {**lite, "runtime": default, "layers": "view"}),
        # The CPU default batch size (extract.default_batch_size) against the GPU's, for eager and the default runtime.
        "bare-eager-32": ("bare", {**lite, "runtime": "eager", "batch-size": 32}),
        f"bare-{default}-32": ("bare", {**lite, "runtime": default, "batch-size": 32}),
        "peer": ("peer", {**lite, "work": work, "layers": peer_layers, "images": PEER_IMAGES}),
        "decode": ("decode", lite),
        "heavy-split": ("split", {**heavy, "runtime": default}),
        "heavy-bare": ("bare", {**heavy, "runtime": default}),
        "big-split": ("split", {**big, "runtime": default}),
        "big-split-draft": ("split", {**big, "runtime": default, "decode": "draft"}),
        "draft": ("draft", {**big, "images": 8}),
        "tensor": ("tensor", {**lite, "images": 64}),
    }


def bench_extraction(work: Path, report: Callable[..., None], rounds: int = 3) -> dict[str, Any]:
    """Run every child once to warm up (exports), then ``rounds`` times interleaved; report the medians."""
    from featurecache import runtime

    names = [r for r in ("eager", "onnxruntime", "openvino") if runtime.available(r)]
    default = runtime.resolve_runtime("auto", "cpu")
    jobs = _jobs(work, names, default)
    # Warm-up: the children that export a graph (each base x taps once), so no timed child pays for an export.
    first = {key: _child(*jobs[key]) for key in EXPORTING}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in jobs}
    for r in range(rounds):
        order = list(jobs)
        random.Random(r).shuffle(order)  # seeded: no child always runs after the same one
        for key in order:
            runs[key].append(_child(*jobs[key]))
    for key in ("split", "split-peer-taps", "heavy-split"):
        if {r["runtime"] for r in runs[key]} != {default}:
            raise RuntimeError(f"{key}: {default} was refused against eager in a timed run")
    median = {key: {field: float(np.median([r[field] for r in rs])) for field in rs[0] if field != "runtime"}
              for key, rs in runs.items()}  # fmt: skip
    # The first-batch check runs in every split, so what the first split adds is the export (and cold caches).
    median["export_s"] = first["split"]["seconds"] - median["split"]["seconds"]
    _report(report, median, names, default)
    return median


def _report(report: Callable[..., None], m: dict[str, Any], names: list[str], default: str) -> None:
    eager, same = m["bare-eager"]["img_s"], m[f"bare-{default}"]["img_s"]
    whole, loop = m["split"]["whole"], m["split"]["loop"]
    batch, threads, taps = (int(m["bare-eager"][k]) for k in ("batch", "threads", "taps"))
    setting = f"Lite0, {taps} stage taps, batch {batch}, {threads} threads, {SPLIT_IMAGES} JPEGs 320x240"
    report("extraction", "end-to-end / eager bare forward", whole / eager, ">= 2.0", whole / eager >= 2.0,
           f"{whole:.1f} vs {eager:.1f} img/s ({default}; {setting}; each in a fresh process)")  # fmt: skip
    for name in names:
        bare = m[f"bare-{name}"]
        report("runtimes", f"{name} bare forward / eager", bare["img_s"] / eager, "report", None,
               f"{bare['img_s']:.1f} img/s, max relative error vs eager {bare['error']:.1e} (bound 1e-4)")  # fmt: skip
    for name in ("eager", default):
        at8, at32 = m[f"bare-{name}"]["img_s"], m[f"bare-{name}-32"]["img_s"]
        report("runtimes", f"{name} bare forward, batch {batch} / batch 32", at8 / at32, "report", None,
               f"{at8:.1f} vs {at32:.1f} img/s: why the CPU default is {batch}")  # fmt: skip
    report("extraction", f"end-to-end / {default} bare forward", whole / same, ">= 0.9", whole / same >= 0.9,
           f"{whole:.1f} vs {same:.1f} img/s, the whole split: planning, first-batch check, loop, HDF5")  # fmt: skip
    report("extraction", f"forward loop alone / {default} bare forward", loop / same, "report", None,
           f"{loop:.1f} img/s: decode beside the forward, forward in lanes, journal on a writer thread")  # fmt: skip
    decode = m["decode"]
    report("extraction", "PIL decode + resize + crop to uint8, ms per image", decode["decode_ms"], "report", None,
           f"1 thread, as one decoder; + {decode['normalize_ms']:.2f} ms batched normalize on the main side; vs "
           f"{1000 * threads / same:.1f} ms of CPU per image in the {default} forward, {threads} threads")  # fmt: skip
    report("runtimes", "one-off export (s)", m["export_s"], "report", None,
           "the first split's extra seconds (export, cold caches); once per base x weights x taps x size")  # fmt: skip
    heavy_whole, heavy_bare = m["heavy-split"]["whole"], m["heavy-bare"]["img_s"]
    report("extraction", f"{HEAVY['base']} (random init) end-to-end / bare", heavy_whole / heavy_bare, ">= 0.9",
           heavy_whole / heavy_bare >= 0.9, f"{heavy_whole:.1f} vs {heavy_bare:.1f} img/s on {default}, "
           f"{SPLIT_IMAGES} JPEGs; loop alone {m['heavy-split']['loop'] / heavy_bare:.2f}")  # fmt: skip
    ours, peer = m["split-peer-taps"]["whole"], m["peer"]["img_s"]
    report("peer", f"ours end-to-end / naive per-layer eager loop ({PEER_TAPS} taps)", ours / peer, ">= 3",
           ours / peer >= 3, f"{ours:.1f} vs {peer:.2f} img/s ({default} vs eager, one pass per layer)")  # fmt: skip
    full, draft, pixels = m["big-split"]["whole"], m["big-split-draft"]["whole"], m["draft"]
    big = f"{BIG_IMAGES} JPEGs {BIG_SIZE[0]}x{BIG_SIZE[1]}"
    report("extraction", "12 MP photos, end-to-end: --decode draft / full", draft / full, "report", None,
           f"{draft:.1f} vs {full:.1f} img/s, whole split of {big} on {default}")  # fmt: skip
    report("extraction", "12 MP photo decode + resize + crop: full / draft ms", pixels["full_ms"] / pixels["draft_ms"],
           "report", None, f"{pixels['full_ms']:.1f} vs {pixels['draft_ms']:.1f} ms per image, 1 thread; pixels "
           f"differ by {pixels['mean_diff']:.2f} of 255 on average, at most {pixels['max_diff']:.0f}")  # fmt: skip
    tensor = m["tensor"]
    report("extraction", "decode + resize + crop: PIL / the --decode gpu path on the CPU", tensor["pil_ms"] /
           tensor["tensor_ms"], "report", None, f"{tensor['pil_ms']:.2f} vs {tensor['tensor_ms']:.2f} ms per 320x240 "
           f"JPEG, 1 thread (libjpeg-turbo + torch's float32 resize); {100 * tensor['differ']:.1f}% of pixels differ, "
           f"at most {tensor['max_diff']:.0f} of 255")  # fmt: skip
    pooled = m["bare-pooled-head"]["img_s"]
    report("multitap", f"time of all {taps} stage taps / pooled head only", pooled / same, "<= 1.10",
           pooled / same <= 1.10, f"{same:.1f} vs {pooled:.1f} img/s on {default} (a pass each: {taps}x)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
