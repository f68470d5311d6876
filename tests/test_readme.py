"""Every ```python block of the README runs, against a tiny cache made where the README says it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from tests.helpers import make_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall(README.read_text())


def test_the_readme_has_python_blocks():
    assert python_blocks(), "no ```python block found: the pattern or the README changed"


@pytest.fixture(scope="module")
def readme_project(tmp_path_factory) -> Path:
    """A project folder holding the digits x efficientnet_lite0 cache the README's examples read (tiny images)."""
    home = tmp_path_factory.mktemp("readme")
    root = make_image_folder(home / "images", per_class={"train": 4, "val": 2, "test": 2})
    extract(
        ExtractRequest(root, base="efficientnet_lite0", layers="all-stages", dataset="digits", splits=("train",)),
        options=ExtractOptions(workers=0, progress=False),
        paths=Paths(home),
    )
    return home


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, readme_project, monkeypatch):
    monkeypatch.chdir(readme_project)  # the README's paths are relative to the project folder
    code = python_blocks()[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
