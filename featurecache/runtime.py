"""Where the extractor graph runs: eager PyTorch, or an exported ONNX graph under ONNX Runtime or OpenVINO.

Measured on the project's 2-core CPU (EfficientNet-Lite0 and MobileNetV2, all stage taps + pooling as one graph,
batch 32, 2 threads; ``make bench``): ONNX Runtime and OpenVINO (f32 hint) run the same graph 5-6x faster than
eager PyTorch, with per-tap relative errors of 2e-6 to 5e-6; channels_last eager gains nothing there. OpenVINO's
default hint on that CPU is bf16 (another 1.8x, but errors of 3e-2 to 7e-2), so reduced precision is used only
when asked for. ONNX Runtime and OpenVINO tie on speed; ``auto`` takes ONNX Runtime on the CPU because it is a
plain dependency (OpenVINO is an extra) and eager PyTorch with bf16 autocast on CUDA.

The graph is exported once per base x weights x taps x input size into ``Paths.export_file`` beside the
features, with a sidecar holding its sha256 and fingerprint (also the torch/onnx versions and opset): a stale
export is rebuilt, a corrupt one (checksum mismatch, or the runtime cannot load it) is refused and rebuilt. Before
a runtime is used, its outputs on the first batch are compared with eager PyTorch tap by tap; above
``MAX_RELATIVE_ERROR`` the runtime is refused with a warning and extraction falls back to eager.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write, atomic_write_text, file_sha256, temporary_for

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "onnxruntime", "openvino")
EXPORTED_RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
# max |runtime - eager| / max |eager| per tap. f32 runtimes measure 2e-6..5e-6; bf16 3e-2..7e-2, so its bound
# only catches a broken graph, the precision itself being the user's explicit choice.
MAX_RELATIVE_ERROR = {"f32": 1e-4, "bf16": 0.15}
OPSET = 17
INPUT_NAME = "images"
# ORT worker threads spin-wait between ops by default; with decode workers and the journal writer on the same
# cores that spinning steals their CPU (measured: end-to-end +25%, bare forward +10% on the loaded 2-core VM).
SPIN_WAIT = False
# ONNX Runtime runs this many batches at once, each on one intra-op thread of its own, instead of one batch on all
# threads: the threads of one run meet at every operator, so a core taken by a decode worker stalls them all, while
# independent runs only lose that core. Measured on the 2-core VM (BENCHMARKS.md, issue #14): 1.12x the bare
# forward img/s of one 2-thread run. Per-image results do not depend on the thread count (the torchrun test:
# 1-thread ranks write the 2-thread cache bit for bit).
CONCURRENT_BATCHES = True

Features = dict[str, np.ndarray]


def check_choice(runtime: str, precision: str) -> None:
    """Refuse unknown ``--runtime``/``--precision`` values with the valid ones."""
    if runtime not in RUNTIMES:
        raise FeaturecacheError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise FeaturecacheError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def available(runtime: str) -> bool:
    """Whether the runtime's package imports here (eager always does)."""
    import importlib.util

    module = {"eager": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}[runtime]
    if runtime in EXPORTED_RUNTIMES and importlib.util.find_spec("onnx") is None:
        return False  # torch's ONNX exporter needs it
    return importlib.util.find_spec(module) is not None


def resolve_runtime(requested: str, device: str, precision: str = "f32") -> str:
    """The runtime ``requested`` means on ``device``: the one decision behind ``--runtime`` (see module doc)."""
    check_choice(requested, precision)
    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if on_cuda:
            runtime = "eager"  # bf16 autocast on the GPU (ExtractOptions.amp)
        elif precision == "bf16":
            runtime = "openvino"
        else:
            runtime = "onnxruntime" if available("onnxruntime") else "eager"
    else:
        runtime = requested
    if runtime in EXPORTED_RUNTIMES and on_cuda:
        raise FeaturecacheError(f"--runtime {runtime} runs on the CPU here; on CUDA use --runtime eager (or auto)")
    if precision == "bf16" and runtime != "openvino":
        raise FeaturecacheError(
            "--precision bf16 is OpenVINO's bf16 hint: pass --runtime openvino (on CUDA, bf16 is --amp bf16)"
        )
    if not available(runtime):
        extra = "openvino" if runtime == "openvino" else "onnx,onnxruntime"
        raise FeaturecacheError(
            f"--runtime {runtime} needs the {extra} package(s): pip install 'featurecache[openvino]' or "
            f"pip install {extra.replace(',', ' ')}, or use --runtime eager"
        )
    return runtime


# ------------------------------------------------------------------------------------------- export


def export_identity(*, base: str, weights: str, input_size: int, taps: Sequence[Any]) -> dict[str, Any]:
    """What the exported graph computes: its file name is a digest of this."""
    return {
        "base": base,
        "weights": weights,
        "input_size": int(input_size),
        "taps": [{"key": t.key, "node": t.node, "pool": t.pool, "layout": t.layout} for t in taps],
    }


def export_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def export_fingerprint(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity plus everything that makes an older file of the same name stale (versions, opset)."""
    import torch

    return {**identity, "torch": torch.__version__, "onnx": _onnx_version(), "opset": OPSET}


def _onnx_version() -> str:
    """onnx's version from its package metadata, the same string as ``onnx.__version__``: importing onnx takes
    ~0.6 s, a tenth of a 640-image split's extraction on the 2-core VM, and only writing an export needs the module.
    An onnx installed under another distribution name (onnx-weekly, a source tree) falls back to the import."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnx")
    except PackageNotFoundError:
        import onnx

        return onnx.__version__


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def export_status(path: Path, fingerprint: dict[str, Any]) -> str:
    """``ok``, ``missing``, ``stale`` (made by other versions/settings) or ``corrupt`` (checksum mismatch)."""
    if not path.is_file():
        return "missing"
    try:
        record = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return "corrupt"
    if record.get("fingerprint") != fingerprint:
        return "stale"
    return "ok" if record.get("sha256") == file_sha256(path) else "corrupt"


def write_export(module: Any, path: Path, fingerprint: dict[str, Any], *, keys: Sequence[str]) -> None:
    """Export ``module`` (images -> {key: (B, D)}) to ONNX with a dynamic batch axis; atomic, with its sidecar."""
    import warnings

    import torch

    size = fingerprint["input_size"]
    _remove_orphans(path)
    batch_axis = {0: "batch"}

    def export(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic in the bases' padding code
            torch.onnx.export(
                module.cpu().eval(), (torch.zeros(2, 3, size, size),), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(keys),
                dynamic_axes={INPUT_NAME: batch_axis, **dict.fromkeys(keys, batch_axis)},
            )  # fmt: skip

    atomic_write(path, export)
    atomic_write_text(_sidecar(path), json.dumps({"fingerprint": fingerprint, "sha256": file_sha256(path)}, indent=1))
    log.info("exported the extractor graph to %s", path)


def _remove_orphans(path: Path) -> None:
    """Delete temporaries of exports whose process died (``kill -9`` mid-export); a live exporter's are kept."""
    for tmp in path.parent.glob(temporary_for(path, "*").name):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


# ------------------------------------------------------------------------------------------- backends


@dataclass
class ExportedGraph:
    """An ONNX export loaded into a runtime: ``graph(images) -> {key: (B, D) float32}``."""

    runtime: str
    run: Callable[[np.ndarray], Features]  # one batch on every thread
    lanes: int = 1  # batches ``lane`` may be given at once, from as many threads
    lane: Callable[[np.ndarray], Features] | None = None  # one batch on one thread's share (lanes > 1)

    def __call__(self, images: Any, *, in_lane: bool = False) -> Features:
        array = images.numpy() if hasattr(images, "numpy") else images
        run = self.lane if in_lane and self.lane is not None else self.run
        return run(np.ascontiguousarray(array, dtype=np.float32))


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # the same budget eager PyTorch has (1 per rank under torchrun)


def lanes(runtime: str) -> int:
    """How many batches ``runtime`` runs at once (see CONCURRENT_BATCHES); 1: one batch on every thread."""
    return _threads() if runtime == "onnxruntime" and CONCURRENT_BATCHES else 1


def _load_onnxruntime(
    path: Path, keys: Sequence[str], precision: str, threads: int | None = None
) -> Callable[[np.ndarray], Features]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _threads()  # session.run is thread-safe: lanes share one session
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not SPIN_WAIT:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = list(keys)
    return lambda images: dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))


def _load_openvino(path: Path, keys: Sequence[str], precision: str) -> Callable[[np.ndarray], Features]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    names = list(keys)

    def run(images: np.ndarray) -> Features:
        result = compiled(images)
        return {k: np.asarray(result[k], dtype=np.float32) for k in names}

    return run


_LOADERS = {"onnxruntime": _load_onnxruntime, "openvino": _load_openvino}


def load_export(runtime: str, path: Path, keys: Sequence[str], precision: str = "f32") -> ExportedGraph:
    """Load an export into ``runtime``; a file the runtime cannot read raises ``CorruptExport``."""
    try:
        graph = ExportedGraph(runtime, _LOADERS[runtime](path, keys, precision))
        if lanes(runtime) > 1:
            graph.lanes = lanes(runtime)
            graph.lane = _load_onnxruntime(path, keys, precision, threads=max(1, _threads() // graph.lanes))
        return graph
    except Exception as exc:  # each runtime raises its own exception types for an unreadable graph
        raise CorruptExport(f"{runtime} cannot load {path}: {type(exc).__name__}: {str(exc)[:200]}") from exc


class CorruptExport(Exception):
    """An export file that cannot be used (it is rebuilt)."""


def exported_graph(
    runtime: str, path: Path, fingerprint: dict[str, Any], make_module: Callable[[], Any], *, keys: Sequence[str],
    precision: str = "f32", rebuild: bool = True,
) -> ExportedGraph:  # fmt: skip
    """The export at ``path`` loaded into ``runtime``: reused when current, (re-)built when missing/stale/corrupt.

    ``rebuild=False`` (torchrun ranks other than 0, which only read what rank 0 wrote) refuses instead.
    """
    status = export_status(path, fingerprint)
    if status == "ok":
        try:
            return load_export(runtime, path, keys, precision)
        except CorruptExport as exc:
            status, reason = "corrupt", str(exc)
    else:
        reason = "its checksum does not match its sidecar" if status == "corrupt" else ""
    if status == "corrupt":
        log.warning("refusing the exported graph %s (%s); rebuilding it", path, reason)
    elif status == "stale":
        log.info("the exported graph %s was made by other library versions; rebuilding it", path)
    if not rebuild:
        raise FeaturecacheError(
            f"the exported graph {path} is {status}; every rank must see rank 0's FEATURECACHE_HOME"
        )
    write_export(make_module(), path, fingerprint, keys=keys)
    return load_export(runtime, path, keys, precision)


# ------------------------------------------------------------------------------------------- checking


def relative_errors(got: Features, reference: Features) -> dict[str, float]:
    """max |got - ref| / max |ref| per tap, in float32 (0 where both are all zeros)."""
    errors = {}
    for key, ref in reference.items():
        ref32, got32 = np.asarray(ref, np.float32), np.asarray(got[key], np.float32)
        scale = float(np.abs(ref32).max()) if ref32.size else 0.0
        diff = float(np.abs(got32 - ref32).max()) if ref32.size else 0.0
        errors[key] = diff / scale if scale > 0 else diff
    return errors


def agrees_with_eager(runtime: str, got: Features, reference: Features, precision: str = "f32") -> bool:
    """Whether a runtime's first batch matches eager within ``MAX_RELATIVE_ERROR``; logs the verdict."""
    errors = relative_errors(got, reference)
    worst = max(errors, key=errors.get)
    bound = MAX_RELATIVE_ERROR[precision]
    if errors[worst] > bound or not np.isfinite(errors[worst]):
        log.warning(
            "refusing --runtime %s: on the first batch layer %r differs from eager PyTorch by %.2g (relative; "
            "allowed %.0e); falling back to eager. Report this with the base name, or pass --runtime eager",
            runtime, worst, errors[worst], bound,
        )  # fmt: skip
        return False
    log.info("%s agrees with eager PyTorch on the first batch (max relative error %.2g, %s)", runtime,
             errors[worst], worst)  # fmt: skip
    return True
