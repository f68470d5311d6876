"""Runtimes: exported graphs equal eager within tolerance, exports are fingerprinted, bad runtimes are refused."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from featurecache import FeaturecacheError, load_features, read_metadata, runtime, store
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.fileio import file_sha256
from tests.helpers import add_bad_files, make_image_folder

F32 = {"dtype": "float32", "workers": 0, "progress": False}


def few_images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "few", per_class={"train": 2, "val": 1, "test": 1})


def features(result_path: Path) -> dict[str, np.ndarray]:
    return {k: load_features(result_path, k)[0] for k in read_metadata(result_path)["taps"]}


@pytest.mark.slow
@pytest.mark.parametrize("base", ["efficientnet_lite0", "mobilenet_v2_offline"])
def test_every_runtime_equals_eager_within_tolerance_on_the_offline_bases(tmp_path, base):
    root = few_images(tmp_path)
    paths = Paths(tmp_path / "home")
    outputs, metas = {}, {}
    for name in ("eager", "onnxruntime", "openvino"):
        options = ExtractOptions(runtime=name, **F32)
        (result,) = extract(ExtractRequest(root, base=base, splits=["train"]), paths=paths, options=options)
        assert result.status == "extracted"  # a cache of another runtime is not reused
        outputs[name], metas[name] = features(result.path), read_metadata(result.path)
        assert metas[name]["runtime"] == name and metas[name]["precision"] == "f32"
    assert len(outputs["eager"]) == (7 if base == "efficientnet_lite0" else 8)  # all stage taps
    for name in ("onnxruntime", "openvino"):
        errors = runtime.relative_errors(outputs[name], outputs["eager"])
        assert max(errors.values()) < runtime.MAX_RELATIVE_ERROR["f32"], errors
        assert metas[name]["config_fingerprint"] != metas["eager"]["config_fingerprint"]
    exports = list((paths.features / "few" / base / "exports").glob("*.onnx"))
    assert len(exports) == 1  # one export serves both exported runtimes


@pytest.mark.slow
def test_auto_is_onnxruntime_on_the_cpu_and_is_reused_then_eager_cache_stays_eager(tmp_path):
    root = few_images(tmp_path)
    paths = Paths(tmp_path / "home")
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="features.3", splits=["train"])
    (auto,) = extract(request, options=ExtractOptions(**F32), paths=paths)
    assert read_metadata(auto.path)["runtime"] == "onnxruntime"
    (again,) = extract(request, options=ExtractOptions(runtime="onnxruntime", **F32), paths=paths)
    assert again.status == "cached"
    (eager,) = extract(request, options=ExtractOptions(runtime="eager", **F32), paths=paths)
    assert eager.status == "extracted"
    assert read_metadata(eager.path)["runtime"] == "eager"


def test_eager_f32_keeps_the_fingerprint_of_caches_made_before_runtimes_existed(tmp_path):
    from featurecache.bases import load_base
    from featurecache.extract import _Runner

    loaded = load_base("mobilenet_v2_offline")
    eager = _Runner(loaded, "cpu", ExtractOptions(runtime="eager")).run_config()
    assert "runtime" not in eager and "precision" not in eager
    exported = _Runner(loaded, "cpu", ExtractOptions(), taps=["t"], export_file=tmp_path / "x.onnx").run_config()
    assert exported["runtime"] == "onnxruntime" and exported["precision"] == "f32"
    assert {k: v for k, v in exported.items() if k not in ("runtime", "precision")} == eager


@pytest.mark.slow
def test_a_runtime_that_disagrees_with_eager_is_refused_with_a_warning_and_eager_is_used(tmp_path, monkeypatch, caplog):
    root = few_images(tmp_path)
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="features.3,features.6", splits=["train"])
    (reference,) = extract(request, paths=Paths(tmp_path / "ref"), options=ExtractOptions(runtime="eager", **F32))

    honest = runtime.ExportedGraph.__call__

    def off_by_a_percent(self, images, **kw):
        return {k: v * 1.01 for k, v in honest(self, images, **kw).items()}

    monkeypatch.setattr(runtime.ExportedGraph, "__call__", off_by_a_percent)
    with caplog.at_level(logging.WARNING, logger="featurecache.runtime"):
        (result,) = extract(
            request, paths=Paths(tmp_path / "home"), options=ExtractOptions(runtime="onnxruntime", **F32)
        )
    assert any("refusing --runtime onnxruntime" in r.getMessage() for r in caplog.records)
    assert read_metadata(result.path)["runtime"] == "eager"
    assert read_metadata(result.path)["config_fingerprint"] == read_metadata(reference.path)["config_fingerprint"]
    for key, value in features(reference.path).items():
        np.testing.assert_array_equal(features(result.path)[key], value)


# ------------------------------------------------------------------------------------------- exports


class TwoTaps(torch.nn.Module):
    """A stand-in extractor (images -> {key: (B, D)}) that exports in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, images):
        x = self.conv(images)
        return {"a": x.mean(dim=(2, 3)), "b": x.amax(dim=(2, 3))}


IDENTITY = {"base": "toy", "weights": "seed0", "input_size": 8, "taps": ["a", "b"]}


def load(path: Path, *, rebuild: bool = True, fingerprint: dict | None = None) -> runtime.ExportedGraph:
    fingerprint = fingerprint or runtime.export_fingerprint(IDENTITY)
    return runtime.exported_graph("onnxruntime", path, fingerprint, TwoTaps, keys=["a", "b"], rebuild=rebuild)


def check_matches_eager(graph: runtime.ExportedGraph) -> None:
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = {k: v.numpy() for k, v in TwoTaps()(images).items()}
    assert max(runtime.relative_errors(graph(images), eager).values()) < 1e-5


def test_an_export_is_built_once_then_reused(tmp_path):
    path = Paths(tmp_path).export_file("ds", "toy", runtime.export_digest(IDENTITY))
    check_matches_eager(load(path))
    assert runtime.export_status(path, runtime.export_fingerprint(IDENTITY)) == "ok"
    stamp = path.stat().st_mtime_ns
    check_matches_eager(load(path))
    assert path.stat().st_mtime_ns == stamp


def test_a_stale_export_is_rebuilt(tmp_path):
    path = tmp_path / "exports" / "x.onnx"
    load(path)
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["fingerprint"]["torch"] = "1.0.0"  # made by another torch
    sidecar.write_text(json.dumps(record))
    assert runtime.export_status(path, runtime.export_fingerprint(IDENTITY)) == "stale"
    check_matches_eager(load(path))
    assert runtime.export_status(path, runtime.export_fingerprint(IDENTITY)) == "ok"


@pytest.mark.parametrize("damage", ["bad-checksum", "unloadable"])
def test_a_corrupt_export_is_refused_with_a_warning_and_rebuilt(tmp_path, caplog, damage):
    path = tmp_path / "exports" / "x.onnx"
    load(path)
    path.write_bytes(b"\x08\x07not a graph" * 50)
    if damage == "unloadable":  # the checksum matches (e.g. a sidecar rewritten by hand); the runtime refuses it
        record = json.loads(path.with_suffix(".json").read_text())
        record["sha256"] = file_sha256(path)
        path.with_suffix(".json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="featurecache.runtime"):
        check_matches_eager(load(path))
    assert any("refusing the exported graph" in r.getMessage() for r in caplog.records)
    assert runtime.export_status(path, runtime.export_fingerprint(IDENTITY)) == "ok"


def test_temporaries_of_a_killed_export_are_removed_on_the_next_export(tmp_path):
    path = tmp_path / "exports" / "x.onnx"
    path.parent.mkdir()
    orphan = path.with_name(f".{path.name}.tmp-{2**22 + 1}")  # above the kernel's pid limit: no such process
    orphan.write_bytes(b"half an export")
    load(path)
    assert not orphan.exists() and sorted(p.name for p in path.parent.iterdir()) == ["x.json", "x.onnx"]


def test_a_rank_that_may_not_rebuild_refuses_a_corrupt_export(tmp_path):
    path = tmp_path / "exports" / "x.onnx"
    load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(FeaturecacheError, match="is corrupt"):
        load(path, rebuild=False)


# ------------------------------------------------------------------------------------------- choices


def test_auto_resolves_per_device_and_bad_choices_name_the_fix():
    assert runtime.resolve_runtime("auto", "cpu") == "onnxruntime"
    assert runtime.resolve_runtime("auto", "cpu", "bf16") == "openvino"
    assert runtime.resolve_runtime("auto", "cuda") == "eager"
    with pytest.raises(FeaturecacheError, match="--runtime eager"):
        runtime.resolve_runtime("onnxruntime", "cuda")
    with pytest.raises(FeaturecacheError, match="--runtime openvino"):
        runtime.resolve_runtime("onnxruntime", "cpu", "bf16")
    with pytest.raises(FeaturecacheError, match="choose one of"):
        runtime.resolve_runtime("tensorrt", "cpu")


# ------------------------------------------------------------------------------------------- writer thread


def test_background_commits_write_every_batch_and_raise_a_writer_error_on_the_main_thread(tmp_path, monkeypatch):
    journal = store.Journal.open(tmp_path / "x.h5", {"m": 1})
    rows = {"f": np.ones((2, 3), np.float32)}
    with store.BackgroundCommits(journal) as commits:
        for start in (0, 2, 4):
            commits.submit(start, rows, ["", ""])
    assert journal.committed() == {(0, 2), (2, 4), (4, 6)}

    def disk_full(*args, **kwargs):
        raise FeaturecacheError("disk full while writing")

    monkeypatch.setattr(journal, "commit", disk_full)
    with pytest.raises(FeaturecacheError, match="disk full"), store.BackgroundCommits(journal) as commits:
        commits.submit(6, rows, ["", ""])
    assert journal.committed() == {(0, 2), (2, 4), (4, 6)}


@pytest.mark.slow
def test_predict_uses_the_runtime_and_home_of_the_heads_training_cache(tmp_path):
    from types import SimpleNamespace

    from featurecache.predict import _home_of, _runtime_for

    paths = Paths(tmp_path / "home")
    options = ExtractOptions(runtime="eager", **F32)
    (result,) = extract(
        ExtractRequest(few_images(tmp_path), base="mobilenet_v2_offline", layers="features.3", splits=["train"]),
        paths=paths,
        options=options,
    )
    # the fields of a HeadRecord these two read
    sidecar = SimpleNamespace(dataset="few", base_tag="mobilenet_v2_offline",
                              features={"train": {"file": str(result.path)}})  # fmt: skip
    assert _runtime_for(sidecar, None) == ("eager", "f32")
    assert _runtime_for(sidecar, "openvino") == ("openvino", "f32")
    assert _home_of(sidecar).root == paths.root.resolve()
    result.path.unlink()  # a head copied without its cache: the device's default runtime
    assert _runtime_for(sidecar, None) == ("auto", "f32")


@pytest.mark.slow
def test_batches_in_concurrent_lanes_write_the_cache_of_one_batch_at_a_time(tmp_path, monkeypatch):
    """ONNX Runtime runs two batches at once on 2 threads (one each); the cache is bit-identical to one at a time."""
    root = make_image_folder(tmp_path / "many", per_class={"train": 7, "val": 1, "test": 1})  # 21 rows
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="features.3,features.6", splits=["train"])
    options = ExtractOptions(runtime="onnxruntime", batch_size=4, **F32)  # 6 batches, the last one short
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(runtime, "CONCURRENT_BATCHES", False)
        (serial,) = extract(request, paths=Paths(tmp_path / "serial"), options=options)
        monkeypatch.setattr(runtime, "CONCURRENT_BATCHES", True)
        assert runtime.lanes("onnxruntime") == 2
        honest, threads_seen = runtime.ExportedGraph.__call__, set()

        def recording(self, images, *, in_lane=False):
            if in_lane:
                threads_seen.add(threading.current_thread().name)
            return honest(self, images, in_lane=in_lane)

        monkeypatch.setattr(runtime.ExportedGraph, "__call__", recording)
        (lanes,) = extract(request, paths=Paths(tmp_path / "lanes"), options=options)
    finally:
        torch.set_num_threads(threads)
    assert any(t.startswith("featurecache-lane") for t in threads_seen)  # the loop's batches ran in the lanes
    assert read_metadata(lanes.path)["config_fingerprint"] == read_metadata(serial.path)["config_fingerprint"]
    assert read_metadata(lanes.path)["num_samples"] == 21
    for key, value in features(serial.path).items():
        np.testing.assert_array_equal(features(lanes.path)[key], value)


@pytest.mark.slow
def test_lanes_decode_their_own_batches_into_the_cache_of_a_separate_decoder(tmp_path, monkeypatch):
    """The CPU default under ONNX Runtime: each lane decodes the batch it runs; the same cache bit for bit."""
    from featurecache.data import ImageFiles
    from featurecache.decoders import DecodeThreads, LaneBatches

    root = make_image_folder(tmp_path / "many", per_class={"train": 7, "val": 1, "test": 1})  # 21 rows
    bad = add_bad_files(root / "train" / "square")  # unreadable files travel as zeros plus their errors either way
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="features.3,features.6", splits=["train"])
    options = {"runtime": "onnxruntime", "batch_size": 4, "dtype": "float32", "progress": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (workers,) = extract(request, paths=Paths(tmp_path / "w"), options=ExtractOptions(workers=0, **options))
        honest, decoded_on = ImageFiles.__getitem__, set()

        def recording(self, i):
            decoded_on.add(threading.current_thread().name)
            return honest(self, i)

        monkeypatch.setattr(ImageFiles, "__getitem__", recording)
        made = []
        monkeypatch.setattr("featurecache.decoders.LaneBatches.__init__", _recorded(LaneBatches.__init__, made))
        monkeypatch.setattr("featurecache.decoders.DecodeThreads.__init__", _recorded(DecodeThreads.__init__, made))
        (lanes,) = extract(request, paths=Paths(tmp_path / "lanes"), options=ExtractOptions(**options))
    finally:
        torch.set_num_threads(threads)
    assert made == ["LaneBatches"]  # the default decoder with lanes; eager keeps decode threads (test_extract)
    assert any(t.startswith("featurecache-lane") for t in decoded_on)
    assert not any(t.startswith("featurecache-decode") for t in decoded_on)
    assert read_metadata(lanes.path)["num_samples"] == read_metadata(workers.path)["num_samples"] == 21 + len(bad)
    assert lanes.num_skipped == workers.num_skipped == len(bad)
    for key in read_metadata(workers.path)["taps"]:
        (xa, ya, ma), (xb, yb, mb) = (load_features(r.path, key, include_invalid=True) for r in (lanes, workers))
        np.testing.assert_array_equal(xa, xb)
        assert np.array_equal(ya, yb) and list(ma["paths"]) == list(mb["paths"])


def _recorded(init, made: list):
    def wrapper(self, *args, **kwargs):
        made.append(type(self).__name__)
        init(self, *args, **kwargs)

    return wrapper
