"""make bench: featurecache against its physical ceilings and naive peers, each a ratio measured in one run.

Sections (``--only NAME[,NAME]``): answer (make-demo pipeline wall time, and the caches the others reuse),
extraction (end-to-end vs the eager and the same-runtime bare forward, every runtime's bare forward and error
vs eager, the naive per-layer peer, all stage taps vs one), sweep (logreg C path vs naive loop), io (HDF5 vs
np.load; dtype x compression), memory (peak RSS at 1x and 10x), scaleout (torchrun with 2 gloo ranks vs 1
process), stage2 (the default head sweep, from benchmarks/stage2.py when present), int8 (ONNX Runtime's int8
graphs of the extractor vs f32: speed and error), gpu (resnet50 end to end vs its bare forward on a CUDA device,
decoded by PIL and with --decode gpu: benchmarks/gpu.py; one line saying it was skipped where there is none),
coverage (how often the paired 95% interval of a gain covers the true gain, against a paired bootstrap:
benchmarks/paired_interval.py).
Prints each figure with its goal and writes results.json under $FEATURECACHE_HOME/reports/bench (else a
temporary folder it prints), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.extraction import BASE, bench_extraction, make_photos, runner_for
from benchmarks.gpu import bench_gpu

REPO = Path(__file__).resolve().parents[1]
RESULTS: list[dict] = []


def report(section: str, name: str, value: float, goal: str, ok: bool | None, detail: str = "") -> None:
    RESULTS.append({"section": section, "figure": name, "value": value, "goal": goal, "met": ok, "detail": detail})
    mark = {True: "ok  ", False: "MISS", None: "    "}[ok]
    print(f"[{mark}] {section:10s} {name:44s} {value:10.3f}   goal {goal:10s} {detail}", flush=True)


def fc(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATURECACHE_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip


# ------------------------------------------------------------------------------------------- 6. time to answer


def bench_answer(home: Path) -> None:
    t0 = time.perf_counter()
    fc(home, "data", "--datasets", "digits")
    fc(home, "extract", str(home / "data/raw/digits"), "--base", BASE, "--no-progress")
    t_extract = time.perf_counter() - t0
    fc(home, "train-heads", "--dataset", "digits", "--bases", BASE, "--n-jobs", "2", "--no-progress")
    total = time.perf_counter() - t0
    report("answer", "demo pipeline wall time (s), venv excluded", total, "minutes", None,
           f"extract {t_extract:.0f}s + 35 heads {total - t_extract:.0f}s")  # fmt: skip


# ------------------------------------------------------------------------------------------- 3. head sweep


def bench_sweep(home: Path) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from featurecache import load_features, read_metadata
    from featurecache.heads import LOGREG_C_GRID
    from featurecache.heads.classic import logreg_warm_path

    grid = [{"C": c} for c in LOGREG_C_GRID]
    files = {s: home / f"data/features/digits/{BASE}/{s}.h5" for s in ("train", "val", "test")}
    t_ours = t_naive = 0.0
    same_c, worst_diff, rows = 0, 0.0, []
    layers = list(read_metadata(files["train"])["taps"])
    for layer in layers:
        (Xtr, ytr, _), (Xv, yv, _), (Xte, yte, _) = (load_features(files[s], layer) for s in ("train", "val", "test"))
        t0 = time.perf_counter()
        path = logreg_warm_path(Xtr, ytr, Xv, yv, grid, seed=0)
        t_ours += time.perf_counter() - t0
        best = max(range(len(path)), key=lambda i: (path[i][2], -i))
        acc_ours = float((path[best][1].predict(Xte) == yte).mean())

        t0 = time.perf_counter()
        scaler = StandardScaler().fit(Xtr.astype(np.float64))
        A, V, T = (scaler.transform(x.astype(np.float64)) for x in (Xtr, Xv, Xte))
        naive = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for point in grid:
                model = LogisticRegression(C=point["C"]).fit(A, ytr)
                naive.append((float((model.predict(V) == yv).mean()), model))
        t_naive += time.perf_counter() - t0
        nbest = max(range(len(naive)), key=lambda i: (naive[i][0], -i))
        acc_naive = float((naive[nbest][1].predict(T) == yte).mean())
        same_c += best == nbest
        worst_diff = max(worst_diff, abs(acc_ours - acc_naive) * 100)
        rows.append(
            f"{layer}: C {grid[best]['C']:g}/{grid[nbest]['C']:g}, test {100 * acc_ours:.1f}/{100 * acc_naive:.1f}"
        )
    report("sweep", "naive C loop time / ours (7 layers x 7 C)", t_naive / t_ours, ">= 3", t_naive / t_ours >= 3,
           f"{t_naive:.1f}s vs {t_ours:.1f}s")  # fmt: skip
    report("sweep", "layers where the chosen C is the same", same_c, f"{len(layers)}", same_c == len(layers),
           "; ".join(rows))  # fmt: skip
    report("sweep", "largest test-accuracy difference (points)", worst_diff, "<= 0.5", worst_diff <= 0.5)


# ------------------------------------------------------------------------------------------- 4. cache I/O


def bench_io(home: Path, work: Path) -> None:
    import h5py

    from featurecache import load_features
    from featurecache.store import _compression_kwargs, chunk_rows

    X, _, _ = load_features(home / f"data/features/digits/{BASE}/train.h5", "view")
    X = np.tile(X.astype(np.float32), (20, 1))  # ~21.6k real rows of the 1280-d head
    n, d = X.shape

    def timed_read(read) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
        return best

    out = {}
    for dtype in ("float16", "float32"):
        arr = X.astype(dtype)
        npy = work / f"x_{dtype}.npy"
        np.save(npy, arr)
        t_npy = timed_read(lambda npy=npy: np.load(npy))
        for comp in ("gzip", "lzf", "none"):
            path = work / f"x_{dtype}_{comp}.h5"
            t0 = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=arr, chunks=(chunk_rows(d * arr.itemsize, n), d), fletcher32=True,
                                 **_compression_kwargs(comp))  # fmt: skip
            t_write = time.perf_counter() - t0

            def read(path=path):
                with h5py.File(path, "r") as f:
                    return f["x"][:]

            t_read = timed_read(read)
            size = path.stat().st_size / n * 1000 / 2**20
            out[(dtype, comp)] = (t_read / t_npy, size)
            detail = f"{size:.2f} MiB per 1000 rows x {d}, read {n / t_read / 1e3:.0f}k rows/s, write {t_write:.2f}s"
            report("io", f"HDF5 read / np.load ({dtype}, {comp})", t_read / t_npy, "report", None, detail)


# ------------------------------------------------------------------------------------------- 5. memory

EXTRACT_RSS = """
import json, resource, sys
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
options = ExtractOptions(progress=False)
extract(ExtractRequest(sys.argv[1], base=sys.argv[2], splits=["train"]), paths=Paths(sys.argv[3]), options=options)
print(peak_rss_kib())
"""

STREAM_RSS = """
import json, resource, sys
import h5py, numpy as np
from featurecache.heads.dense import DenseClassifier
path, dim = sys.argv[1], int(sys.argv[2])
with h5py.File(path, "r") as f:
    X, y = f["x"], f["y"]
    step = 8192
    loaders = [lambda a=a: (X[a:a + step].astype(np.float32), y[a:a + step]) for a in range(0, X.shape[0], step)]
    DenseClassifier(max_epochs=1, hidden_units=(256,)).fit_stream(loaders, classes=np.arange(10), n_features=dim)
print(peak_rss_kib())
"""

# getrusage's ru_maxrss survives exec, so a child forked from a large parent reports the parent's peak;
# VmHWM is the child's own high-water mark.
PEAK_RSS = """
def peak_rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""


def bench_memory(work: Path) -> None:
    import h5py

    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def rss(script: str, *args: str) -> float:
        code = PEAK_RSS + script
        out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1]) / 1024  # MiB

    small, large = (make_photos(work / f"mem{n}", n) for n in (24, 240))
    r1 = rss(EXTRACT_RSS, str(small), BASE, str(work / "m1"))
    r10 = rss(EXTRACT_RSS, str(large), BASE, str(work / "m10"))
    report("memory", "extraction peak RSS 10x / 1x images", r10 / r1, "<= 1.2", r10 / r1 <= 1.2,
           f"{r1:.0f} -> {r10:.0f} MiB (24 -> 240 images)")  # fmt: skip
    dim = 512
    rng = np.random.default_rng(0)
    for rows in (25_000, 250_000):
        with h5py.File(work / f"stream{rows}.h5", "w") as f:
            dset = f.create_dataset("x", shape=(rows, dim), dtype="float16", chunks=(512, dim))
            for a in range(0, rows, 25_000):
                dset[a : a + 25_000] = rng.normal(size=(min(25_000, rows - a), dim)).astype(np.float16)
            f.create_dataset("y", data=rng.integers(0, 10, rows))
    s1 = rss(STREAM_RSS, str(work / "stream25000.h5"), str(dim))
    s10 = rss(STREAM_RSS, str(work / "stream250000.h5"), str(dim))
    full = 250_000 * dim * 4 / 2**20
    report("memory", "streamed dense-head fit peak RSS 10x / 1x rows", s10 / s1, "<= 1.2", s10 / s1 <= 1.2,
           f"{s1:.0f} -> {s10:.0f} MiB (25k -> 250k rows x {dim}, {full:.0f} MiB as float32)")  # fmt: skip


# ------------------------------------------------------------------------------------------- 8. scale-out


def bench_scaleout(work: Path, ranks: int = 2) -> None:
    """Wall time of one process vs ``torchrun --nproc-per-node ranks`` on the same JPEGs, same batches."""
    import re

    root = make_photos(work / "scaleout", 320)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["-m", "pipelines.extract", str(root), "--base", BASE, "--splits", "train", "--no-progress"]
    timings = {}
    for name, cmd in (
        ("1 process", [sys.executable, *common]),
        (f"{ranks} ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={ranks}", *common]),
    ):  # fmt: skip
        # torchrun gives each rank 1 thread by default; give the ranks the machine's cores between them instead.
        threads = str(max(1, (os.cpu_count() or 1) // (ranks if "ranks" in name else 1)))
        home = work / f"scaleout-{name.split()[0]}"
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env={**env, "FEATURECACHE_HOME": str(home), "OMP_NUM_THREADS": threads},
                             capture_output=True, text=True, check=True)  # fmt: skip
        wall = time.perf_counter() - t0
        speed = float(re.search(r"([\d.]+) img/s", out.stdout).group(1))
        timings[name] = (wall, speed, threads)
    (w1, s1, t1), (wn, sn, tn) = timings.values()
    report("scaleout", f"{ranks} ranks / 1 process, extraction img/s", sn / s1, "report", None,
           f"{s1:.1f} -> {sn:.1f} img/s over 320 JPEGs ({t1} vs {tn} threads per process)")  # fmt: skip
    report("scaleout", f"{ranks} ranks / 1 process, wall time with start-up", w1 / wn, "report", None,
           f"{w1:.1f}s -> {wn:.1f}s")  # fmt: skip


# ------------------------------------------------------------------------------------------- 9. stage 2


def bench_stage2() -> None:
    """The default stage-2 sweep (every per-layer head x 7 Lite0-shaped layers, 2.6k rows, two classes), today's
    dense-head configuration against the old one, interleaved job by job (benchmarks/stage2.py)."""
    from benchmarks import stage2

    rows = {r["config"]: r for r in stage2.run()}
    old, new = rows["old"], rows["new"]
    report("stage2", "default sweep wall s (2.6k rows, 7 layers)", new["wall_s"], "<= 120", new["wall_s"] <= 120,
           f"CPU {new['cpu_s']:.0f} s; mlp {new['per_head']['mlp']['cpu_s']:.0f} s")  # fmt: skip
    report("stage2", "sweep CPU new / old", new["cpu_s"] / old["cpu_s"], "< 1", new["cpu_s"] < old["cpu_s"],
           f"old {old['cpu_s']:.0f} s, new {new['cpu_s']:.0f} s, 1 torch thread")  # fmt: skip


# ------------------------------------------------------------------------------------------- int8


def _quantized(f32: Path, work: Path, calibration: list[dict[str, np.ndarray]]) -> tuple[Path, Path]:
    """ONNX Runtime's static QDQ (calibrated on ``calibration``) and dynamic int8 graphs of the ``f32`` export."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    batches = iter(calibration)

    class Calibration(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(batches, None)

    static, dynamic = work / "int8-static.onnx", work / "int8-dynamic.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a multi-line warning per tensor it leaves in float
    try:
        quantize_static(str(f32), str(static), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        quantize_dynamic(str(f32), str(dynamic), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    return static, dynamic


def bench_int8(work: Path, rounds: int = 3) -> None:
    """Why featurecache offers no int8 mode: ONNX Runtime's int8 graphs of the extractor, side by side with f32.

    Static QDQ quantization (int8 weights per channel, uint8 activations, calibrated on the bench's own images) and
    dynamic quantization (weights only), against the f32 export, on the same 32 preprocessed images; the error is
    max |int8 - f32| / max |f32| over the stage taps, as the first-batch check measures it.
    """
    from featurecache import runtime
    from featurecache.bases import load_base
    from featurecache.data import ImageFiles, discover_splits
    from featurecache.layers import parse_taps, trace_base

    root = make_photos(work / "int8-photos", 32)
    taps = parse_taps("all-stages", trace_base(load_base(BASE)))
    runner = runner_for("onnxruntime", work / "int8", taps)
    index = discover_splits(root)["train"]
    data = ImageFiles(index, runner.transform, input_size=224, rows=range(32))
    images = np.stack([data[i][0].numpy() for i in range(32)]).astype(np.float32)
    runner.prepare(index)  # writes and checks the f32 export
    f32 = runner._choice.export_file
    static, dynamic = _quantized(f32, work, [{runtime.INPUT_NAME: images[i : i + 8]} for i in range(0, 32, 8)])
    keys = [t.key for t in taps]
    graphs = {name: runtime.load_export("onnxruntime", path, keys) for name, path in
              (("f32", f32), ("static", static), ("dynamic", dynamic))}  # fmt: skip
    reference = graphs["f32"](images)
    seconds = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            t0 = time.perf_counter()
            graph(images)
            seconds[name].append(time.perf_counter() - t0)
    for name in ("static", "dynamic"):
        speed = float(np.median(seconds["f32"]) / np.median(seconds[name]))
        error = max(runtime.relative_errors(graphs[name](images), reference).values())
        report("int8", f"onnxruntime int8 ({name}) / f32 bare forward", speed, "report", None,
               f"max relative error vs f32 {error:.2g}")  # fmt: skip


def bench_coverage() -> None:
    from benchmarks.paired_interval import SETTINGS, coverage

    for n, p_a, p_b, rho in SETTINGS:
        c = coverage(n, p_a, p_b, rho)
        name = f"paired 95% interval coverage, n={n}, p={p_a}/{p_b}, rho={rho}"
        report("coverage", name, c["newcombe_coverage"], ">= 0.93", c["newcombe_coverage"] >= 0.93,
               f"bootstrap {c['bootstrap_coverage']:.3f} (zero-width {c['bootstrap_zero']:.3f}); "
               f"Newcombe zero-width {c['newcombe_zero']:.3f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser("make bench", description=__doc__)
    parser.add_argument("--only", default="answer,extraction,sweep,io,memory,scaleout,stage2,int8,gpu,coverage")
    args = parser.parse_args()
    only = set(args.only.split(","))
    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    print(f"# featurecache bench on {platform.node()}: {machine}, python {platform.python_version()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        if "answer" in only or {"sweep", "io"} & only:
            bench_answer(home)
        if "extraction" in only or "multitap" in only:
            bench_extraction(work, report)
        if "sweep" in only:
            bench_sweep(home)
        if "io" in only:
            bench_io(home, work)
        if "memory" in only:
            bench_memory(work)
        if "scaleout" in only:
            bench_scaleout(work)
        if "stage2" in only:
            bench_stage2()
        if "int8" in only:
            bench_int8(work)
        if "gpu" in only:
            bench_gpu(work, report)
        if "coverage" in only:
            bench_coverage()
    from featurecache.config import Paths

    home = os.environ.get("FEATURECACHE_HOME")
    out = Paths(home).bench_dir() if home else Path(tempfile.mkdtemp(prefix="fc-bench-results-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"# {len(RESULTS)} figures in {time.perf_counter() - t0:.0f}s -> {out / 'results.json'}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# bench process peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
