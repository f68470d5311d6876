"""The extract commands that messages suggest add to the cache they speak of instead of making it again."""

from __future__ import annotations

import shlex

import pytest

from featurecache import store
from featurecache.commands import extract_command
from featurecache.config import Paths
from pipelines.cli import run

BASE = "mobilenet_v2_offline"
OPTIONS = ["--dtype", "float32", "--alpha", "white", "--orientation", "ignore", "--runtime", "eager",
           "--fingerprint", "stat", "--decode", "draft"]  # fmt: skip


@pytest.mark.parametrize("weights", ["default", "none"])
def test_the_suggested_command_adds_a_layer_to_a_cache_made_with_other_options(tiny, tmp_path, monkeypatch, weights):
    paths = Paths(tmp_path / "home")
    monkeypatch.setenv("FEATURECACHE_HOME", str(paths.root))
    monkeypatch.chdir(tmp_path)
    made = ["extract", str(tiny), "--base", BASE, "--weights", weights, "--layers", "features.3", "--splits", "val",
            "--no-progress", *(OPTIONS if weights == "default" else [])]  # fmt: skip
    assert run(made) == 0
    tag = BASE if weights == "default" else f"{BASE}-random"
    command = extract_command("tiny", tag, "--layers", "features.6:max", "--splits", "val", paths=paths)
    argv = shlex.split(command)
    assert argv[:3] == ["featurecache", "extract", str(tiny)]
    before = store.read_metadata(paths.feature_file("tiny", tag, "val"))
    assert run([*argv[1:], "--no-progress"]) == 0, command
    after = store.read_metadata(paths.feature_file("tiny", tag, "val"))
    assert after["config_fingerprint"] == before["config_fingerprint"], command  # added to, not made again
    assert list(after["taps"]) == ["features.3", "features.6@max"]


def test_without_a_cache_the_command_names_the_known_folder_or_a_placeholder(tmp_path):
    paths = Paths(tmp_path)
    assert extract_command("mine", "resnet50-random", paths=paths) == (
        "featurecache extract path/to/mine --base resnet50 --weights none"
    )
    (paths.raw / "digits").mkdir(parents=True)
    assert extract_command("digits", "resnet50", paths=paths).startswith(f"featurecache extract {paths.raw}/digits ")


def test_the_suggested_command_adds_a_layer_to_the_augmented_views_too(tiny, tmp_path, monkeypatch):
    from featurecache.train import cache_files, check_layers_in_every_split

    paths = Paths(tmp_path / "home")
    monkeypatch.setenv("FEATURECACHE_HOME", str(paths.root))
    folder = tmp_path / "run=3" / "tiny"  # a path with "=" in it, which NAME=PATH parsing would misread
    folder.parent.mkdir()
    tiny.rename(folder)
    common = ["--base", BASE, "--runtime", "eager", "--no-progress"]
    assert run(["extract", str(folder), "--layers", "features.3", "--train-views", "2", "--seed", "3", *common]) == 0
    assert run(["extract", str(folder), "--layers", "features.6", "--seed", "3", *common]) == 0  # the views lack it
    files = cache_files("tiny", BASE, paths, augmented=True)
    metas = {s: store.read_metadata(f) for s, f in files.items()}
    with pytest.raises(Exception, match="Add it with") as refused:
        check_layers_in_every_split(["features.6"], metas, files, dataset="tiny", base_tag=BASE)
    command = str(refused.value).split("Add it with `")[1].split("`")[0]
    assert f"tiny={folder}" in command and "--train-views 2 --augment light --seed 3" in command
    assert run([*shlex.split(command)[1:], "--no-progress"]) == 0, command
    views = store.read_metadata(files["train-aug"])
    assert views["config_fingerprint"] == metas["train-aug"]["config_fingerprint"], command
    assert "features.6" in views["taps"]


def test_flags_that_depend_on_the_device_are_spelled_out():
    from featurecache.commands import _flags_of_tag, cache_flags

    recorded = {"base": BASE, "weights": "w", "orientation": "exif"}
    exported = cache_flags({**recorded, "runtime": "onnxruntime", "amp": "off"}, BASE)
    assert exported[exported.index("--runtime") :] == ["--runtime", "onnxruntime", "--device", "cpu"]
    assert cache_flags({**recorded, "runtime": "eager", "amp": "off"}, BASE)[-2:] == ["--amp", "off"]
    assert cache_flags({**recorded, "runtime": "eager", "amp": "bf16"}, BASE)[-2:] == ["--amp", "bf16"]
    assert _flags_of_tag("resnet50-IMAGENET1K_V2") == ["--base", "resnet50", "--weights", "IMAGENET1K_V2"]
    assert _flags_of_tag("efficientnet_lite0") == ["--base", "efficientnet_lite0"]


def test_the_images_are_found_where_they_are_now(tmp_path):
    from featurecache.data import _write_split_record, images_folder

    paths = Paths(tmp_path / "home")
    gone = str(tmp_path / "old-home" / "data" / "raw" / "digits")  # what a cache recorded before the home moved
    assert images_folder(gone, "digits", paths) is None
    (paths.raw / "digits").mkdir(parents=True)
    assert images_folder(gone, "digits", paths) == paths.raw / "digits"
    mine = tmp_path / "photos"
    mine.mkdir()
    paths.split_record("mine").parent.mkdir(parents=True)
    _write_split_record(paths.split_record("mine"), {"seed": 0, "fractions": {"val": 0.2, "test": 0.2}},
                        {"train": ["a/1.png"], "val": ["a/2.png"], "test": ["a/3.png"]}, str(mine))  # fmt: skip
    assert images_folder(None, "mine", paths) == mine
    assert images_folder(str(mine), "digits", paths) == mine  # the recorded folder first while it is there


def test_a_suggested_command_keeps_a_split_drawn_with_another_seed(tmp_path, monkeypatch, caplog):
    """A folder without val/test split with ``--seed 2``: the hints leave ``--seed`` out (the cache's weights and
    views do not need it), so running one must keep the recorded split, not draw a seed-0 split over it and make
    every cache again."""
    import json

    from tests.helpers import make_image_folder

    paths = Paths(tmp_path / "home")
    monkeypatch.setenv("FEATURECACHE_HOME", str(paths.root))
    folder = make_image_folder(tmp_path / "flat", per_class={"all": 10}, splits=False)
    common = ["--base", BASE, "--runtime", "eager", "--no-progress"]
    assert run(["extract", str(folder), "--layers", "features.3", "--seed", "2", *common]) == 0
    record = paths.split_record("flat").read_text()
    before = store.read_metadata(paths.feature_file("flat", BASE, "test"))
    command = extract_command("flat", BASE, "--layers", "features.6", paths=paths)
    assert "--seed" not in command
    caplog.clear()
    assert run([*shlex.split(command)[1:], "--no-progress"]) == 0, command
    assert "split seed or fractions changed" not in caplog.text
    assert paths.split_record("flat").read_text() == record and json.loads(record)["params"]["seed"] == 2
    after = store.read_metadata(paths.feature_file("flat", BASE, "test"))
    assert after["data_fingerprint"] == before["data_fingerprint"]  # the same test images
    assert list(after["taps"]) == ["features.3", "features.6"]
    assert run(["extract", str(folder), "--layers", "features.3", "--seed", "5", *common]) == 0  # asked: redrawn
    assert json.loads(paths.split_record("flat").read_text())["params"]["seed"] == 5
