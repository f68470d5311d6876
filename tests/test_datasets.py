"""Offline datasets: prepared into ImageFolder layout with a fixed, recorded, stratified split and a license."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from featurecache import FeaturecacheError
from featurecache.data import discover_splits
from featurecache.datasets import (
    _flatten_on_white,
    _read_idx,
    debian_package,
    get_dataset_spec,
    list_datasets,
    prepare_dataset,
)


def test_registry():
    assert {"digits", "mnist5k", "animal_mnist", "fashion_mnist", "openclipart", "tuxpaint"} <= set(list_datasets())
    assert {get_dataset_spec(d).expected_distance for d in list_datasets(default_only=True)} == {
        "near",
        "between",
        "far",
    }
    with pytest.raises(FeaturecacheError, match="unknown dataset 'cifar'.*digits"):
        get_dataset_spec("cifar")


@pytest.mark.parametrize(("name", "total", "classes"), [("digits", 1797, 10), ("mnist5k", 600, 10),
                                                         ("animal_mnist", 600, 10)])  # fmt: skip
def test_pip_datasets_prepare_with_a_recorded_split(tmp_path, name, total, classes):
    dest = prepare_dataset(name, tmp_path / "raw")
    record = json.loads((dest / "splits.json").read_text())
    splits = discover_splits(dest)
    assert sum(len(ix) for ix in splits.values()) == total
    assert {s: list(ix.paths) for s, ix in splits.items()} == {s: sorted(v) for s, v in record["splits"].items()}
    for ix in splits.values():
        assert len(ix.class_names) == classes and len(set(ix.labels)) == classes  # every class in every split
    assert "License:" in (dest / "LICENSE.txt").read_text()
    again = prepare_dataset(name, tmp_path / "raw2")
    assert json.loads((again / "splits.json").read_text())["splits"] == record["splits"]  # same seed, same split


def test_idx_reader(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(_read_idx(path), images)


def test_transparent_clip_art_is_flattened_on_white_and_shrunk(tmp_path):
    rgba = np.zeros((600, 400, 4), np.uint8)
    rgba[100:200, 100:200] = (255, 0, 0, 255)
    path = tmp_path / "clip.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = _flatten_on_white(path)
    assert image.mode == "RGB" and max(image.size) == 256
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((60, 60))[0] > 200


def test_a_huge_clip_art_png_is_shrunk_without_pil_s_bomb_warning(tmp_path, monkeypatch):
    """One PNG of openclipart-png is 168 megapixels: PIL's DecompressionBombWarning interrupted `featurecache
    data` with a line nobody can act on (this code thumbnails it on purpose)."""
    import warnings

    Image.fromarray(np.zeros((600, 400, 4), np.uint8), "RGBA").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150_000)  # 240,000 pixels: between PIL's two limits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max(_flatten_on_white(tmp_path / "big.png").size) == 256


def test_debian_datasets_without_apt_say_how(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FeaturecacheError, match=r"apt-get download openclipart-png.*dpkg-deb -x"):
        debian_package("openclipart-png", tmp_path)


def test_a_relative_folder_that_is_not_here_is_found_under_the_home(tmp_path, monkeypatch):
    """The README's `featurecache data --datasets digits` then `extract data/raw/digits`, run from another folder
    with FEATURECACHE_HOME set: the folder is under the home, and extract said it was neither a folder nor a
    built-in dataset."""
    from featurecache.datasets import parse_dataset

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (home / "data" / "raw" / "mine" / "a").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.setenv("FEATURECACHE_HOME", str(home))
    monkeypatch.chdir(elsewhere)
    assert parse_dataset("data/raw/mine").folder == home / "data" / "raw" / "mine"
    assert parse_dataset("other=data/raw/mine").folder == home / "data" / "raw" / "mine"
    (elsewhere / "data" / "raw" / "mine").mkdir(parents=True)  # a folder here comes first
    assert parse_dataset("data/raw/mine").folder.resolve() == (elsewhere / "data" / "raw" / "mine").resolve()
    with pytest.raises(FeaturecacheError, match=r"neither a folder \(here or under FEATURECACHE_HOME, .*\) nor"):
        parse_dataset("data/raw/nope")
