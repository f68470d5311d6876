from __future__ import annotations

from pathlib import Path

import pytest

from featurecache.config import Paths
from tests.helpers import make_image_folder


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "project")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """3 classes x (6 train, 2 val, 2 test) small images in mixed sizes and modes (RGB, L, P; png/jpg)."""
    return make_image_folder(tmp_path / "tiny")
