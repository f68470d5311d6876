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
