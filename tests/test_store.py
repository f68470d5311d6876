"""The HDF5 store on its own: journal, one-writer lock, atomic assembly and the readers (no base, no images)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from featurecache import store
from featurecache.errors import FeaturecacheError

ROWS, DIM = 10, 6
ATTRS = {"schema_version": store.SCHEMA_VERSION, "base": "toy", "class_names": ["a", "b"]}


def commit_all(journal: store.Journal, features: np.ndarray, *, batch: int = 4, bad_row: int | None = None) -> None:
    for start in range(0, len(features), batch):
        stop = min(start + batch, len(features))
        errors = ["OSError: truncated" if r == bad_row else "" for r in range(start, stop)]
        journal.commit(start, {"toy": features[start:stop]}, errors)


def write_cache(tmp_path, *, bad_row: int | None = None, dtype: str = "float32", compression: str = "none"):
    """A complete 10-row cache of one 6-d layer; returns (path, features, labels)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    if bad_row is not None:
        features[bad_row] = 0  # the extractor writes zeros for an unreadable image
    labels = np.arange(ROWS) % 2
    final = tmp_path / "train.h5"
    journal = store.Journal.open(final, {"manifest": 1})
    commit_all(journal, features, bad_row=bad_row)
    store.assemble(
        final, journal=journal, taps=[store.TapColumn("toy", DIM, {"relative_depth": 0.5, "node": "toy_node"})],
        labels=labels, paths=[f"{'ab'[y]}/{i}.png" for i, y in enumerate(labels)], attrs=ATTRS, dtype=dtype,
        compression=compression,
    )  # fmt: skip
    return final, features, labels


def test_journal_resumes_only_with_the_same_manifest(tmp_path, caplog):
    final = tmp_path / "train.h5"
    journal = store.Journal.open(final, {"manifest": 1})
    journal.commit(0, {"toy": np.ones((4, DIM), np.float32)}, [""] * 4)
    journal.commit(8, {"toy": np.ones((2, DIM), np.float32)}, [""] * 2)
    assert journal.missing_rows(ROWS) == [(4, 8)]
    arrays, errors = journal.read(journal.directory / "rows-000000000000-000000000004.npz")
    assert arrays["toy"].shape == (4, DIM) and errors == [""] * 4
    assert store.Journal.open(final, {"manifest": 1}).committed() == {(0, 4), (8, 10)}  # same settings: kept
    with caplog.at_level("WARNING", logger="featurecache.store"):
        assert store.Journal.open(final, {"manifest": 2}).committed() == set()  # other settings: started afresh
    assert "made with other settings (manifest)" in caplog.text  # names what changed (e.g. batch_size)
    settings = {"config": {"runtime": "eager", "dtype": "float16"}, "config_fingerprint": "a", "batch_size": 8}
    store.Journal.open(final, settings)
    with caplog.at_level("WARNING", logger="featurecache.store"):
        store.Journal.open(final, {**settings, "config": {"runtime": "onnxruntime", "dtype": "float16"},
                                   "config_fingerprint": "b", "batch_size": 16})  # fmt: skip
    assert "made with other settings (batch_size, runtime)" in caplog.text  # the setting, not its fingerprint
    older = {"config_fingerprint": "c", "batch_size": 8}  # a journal written before manifests named the config
    store.Journal.open(final, older).commit(0, {"toy": np.ones((4, DIM), np.float32)}, [""] * 4)
    resumed = store.Journal.open(final, {**older, "config": {"runtime": "eager"}})
    assert resumed.committed() == {(0, 4)}  # same settings: its progress is kept
    assert store.Journal.attach(final, {**older, "config": {"runtime": "eager"}}).committed() == {(0, 4)}


def test_a_second_writer_is_refused_and_the_lock_is_released(tmp_path):
    final = tmp_path / "train.h5"
    refused = pytest.raises(FeaturecacheError, match="another featurecache process .* is writing")
    with store.writer_lock(final), refused, store.writer_lock(final):  # the second lock raises on entry
        pass
    with store.writer_lock(final):  # released on exit
        pass


@pytest.mark.parametrize(("dtype", "compression"), [("float32", "none"), ("float16", "gzip"), ("float32", "lzf")])
def test_assemble_then_read_round_trip(tmp_path, dtype, compression):
    path, features, labels = write_cache(tmp_path, bad_row=3, dtype=dtype, compression=compression)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    meta = store.read_metadata(path)
    assert meta["complete"] and meta["class_names"] == ["a", "b"] and meta["num_valid"] == ROWS - 1
    assert meta["taps"]["toy"]["node"] == "toy_node"

    X, y, m = store.load_features(path, "toy")
    keep = np.arange(ROWS) != 3  # the unreadable row is dropped
    np.testing.assert_array_equal(X, features[keep].astype(dtype))
    np.testing.assert_array_equal(y, labels[keep])
    assert m["layer"] == "toy" and list(m["paths"]) == [p for i, p in enumerate(store.read_paths(path)) if keep[i]]
    X_all, _, _ = store.load_features(path, "toy_node", include_invalid=True)  # by node name
    np.testing.assert_array_equal(X_all, features.astype(dtype))

    chunks = list(store.iter_feature_chunks(path, rows_per_chunk=1))
    np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), X)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), y)
    with h5py.File(path, "r") as f:
        assert f["features/toy"].fletcher32 and f["skipped/row"][:].tolist() == [3]
        assert f["features/toy"].compression == (None if compression == "none" else compression)


def test_readers_refuse_what_is_not_a_complete_cache(tmp_path):
    with pytest.raises(FeaturecacheError, match="no feature cache at .*run `featurecache extract`"):
        store.read_metadata(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeaturecacheError, match="not a readable HDF5 file"):
        store.read_metadata(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.attrs["schema_version"] = store.SCHEMA_VERSION  # no complete=True
    with pytest.raises(FeaturecacheError, match="not a complete featurecache"):
        store.read_metadata(tmp_path / "half.h5")
    path, _, _ = write_cache(tmp_path)
    with pytest.raises(FeaturecacheError, match="layer 'deeper' is not in .*cached layers: toy"):
        store.load_features(path, "deeper")


def test_a_failed_assembly_leaves_nothing_under_the_final_name(tmp_path):
    final = tmp_path / "train.h5"
    journal = store.Journal.open(final, {"manifest": 1})
    commit_all(journal, np.zeros((ROWS, DIM), np.float32))
    with pytest.raises(FeaturecacheError, match="unknown compression 'zstd'"):
        store.assemble(final, journal=journal, taps=[store.TapColumn("toy", DIM, {"relative_depth": 0.5})],
                       labels=[0] * ROWS, paths=[f"{i}.png" for i in range(ROWS)], attrs=ATTRS, dtype="float32",
                       compression="zstd")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.h5.partial"]  # committed batches are kept


def test_chunks_hold_about_half_a_mebibyte():
    assert store.chunk_rows(row_bytes=1280 * 2, n_rows=10_000) == store.TARGET_CHUNK_BYTES // 2560
    assert store.chunk_rows(row_bytes=1280 * 2, n_rows=7) == 7  # never more rows than the file holds
    assert store.chunk_rows(row_bytes=10 << 20, n_rows=100) == 1  # a huge row: one per chunk
