"""The split preprocessing (uint8 geometry in the workers, batched normalization) equals the base's own transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from featurecache.augment import SeededPerRow, train_transform
from featurecache.bases import get_base_spec, load_base
from featurecache.data import ImageFiles, discover_splits, load_image
from featurecache.extract import ExtractOptions, _Runner
from featurecache.layers import parse_taps, trace_base
from featurecache.preprocess import Preprocessing
from tests.helpers import add_bad_files


def _images(root: Path) -> list[Image.Image]:
    """Decoded (load_image) images of odd sizes and every colour mode featurecache meets, alpha composited."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate([(1, 1), (3, 517), (333, 241), (224, 224), (640, 97), (255, 256), (17, 900)]):
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        pixels[..., :3] = np.cumsum(pixels[..., :3], axis=1, dtype=np.uint8)  # some structure, not only noise
        rgba = Image.fromarray(pixels, "RGBA")
        for mode, suffix in (("RGBA", "png"), ("RGB", "jpg"), ("L", "png"), ("LA", "png"), ("P", "gif")):
            path = root / f"{i}-{mode}.{suffix}"
            image = rgba.convert(mode)
            if mode == "P":
                image.info["transparency"] = 0
            image.save(path)
            files.append(path)
    return [load_image(p) for p in files]


def _transforms() -> dict[str, object]:
    from torchvision.models import get_model_weights

    lite0 = get_base_spec("efficientnet_lite0").transforms()
    return {
        "lite0": lite0,
        "mobilenet_v2_offline": get_base_spec("mobilenet_v2_offline").transforms(),
        "torchvision preset": get_model_weights("resnet50").DEFAULT.transforms(),
        "augmented views": SeededPerRow(train_transform(lite0, 224, "standard"), seed=5),
    }


@pytest.mark.parametrize("name", list(_transforms()))
def test_batched_normalization_is_bit_identical_to_the_per_image_transform(name, tmp_path):
    transform = _transforms()[name]
    preprocessing = Preprocessing(transform)
    assert preprocessing.split
    assert repr(preprocessing) == repr(transform)  # the cache fingerprint records it: no cache turns stale
    images = _images(tmp_path)
    per_row = isinstance(transform, SeededPerRow)
    expected = [transform(image, row) if per_row else transform(image) for row, image in enumerate(images)]
    pixels = [preprocessing.per_image(image, row) for row, image in enumerate(images)]
    assert all(p.dtype == torch.uint8 for p in pixels)
    half = len(images) // 2
    buffers = []
    # Two equal batches (the second written into the first one's buffer), then the odd one out (a fresh buffer).
    for batch in (slice(0, half), slice(half, 2 * half), slice(2 * half, None)):
        got = preprocessing.normalize(torch.stack(pixels[batch]), reuse=True)
        assert got.dtype == torch.float32
        buffers.append(got.data_ptr())
        for row, (have, want) in enumerate(zip(got, expected[batch], strict=True)):
            assert torch.equal(have, want), f"{name}: image {row} differs from the base's own transforms"
    assert buffers[0] == buffers[1] != buffers[2]
    assert torch.equal(preprocessing(images[0]), expected[0])  # the one-image form, too


def test_a_transform_that_is_not_geometry_totensor_normalize_runs_whole_in_the_workers(tmp_path):
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])  # no Normalize: nothing to batch
    preprocessing = Preprocessing(transform)
    image = _images(tmp_path)[2]
    assert not preprocessing.split
    floats = preprocessing.per_image(image)
    assert floats.dtype == torch.float32 and torch.equal(floats, transform(image))
    batch = floats[None]
    assert preprocessing.normalize(batch) is batch
    assert preprocessing.per_image.blank(32).dtype == torch.float32


def test_an_unreadable_image_stands_in_as_uint8_zeros_in_a_uint8_batch(tiny):
    add_bad_files(tiny / "train" / "circle")
    index = discover_splits(tiny)["train"]
    preprocessing = Preprocessing(get_base_spec("efficientnet_lite0").transforms())
    data = ImageFiles(index, preprocessing.per_image, input_size=224, rows=range(len(index)))
    items = [data[i] for i in range(len(index))]
    bad = [image for image, _row, error in items if error]
    assert bad and all(image.dtype == torch.uint8 and not image.any() for image in bad)
    assert torch.stack([image for image, _row, _error in items]).dtype == torch.uint8


def test_the_runner_gives_the_same_features_from_pixels_as_from_preprocessed_images(tiny):
    runner = _Runner(load_base("efficientnet_lite0"), "cpu", ExtractOptions(runtime="eager", dtype="float32"))
    index = discover_splits(tiny)["train"]
    data = ImageFiles(index, runner.preprocessing.per_image, input_size=224, rows=range(len(index)))
    pixels = torch.stack([data[i][0] for i in range(len(index))])
    old_way = torch.stack([runner.transform(load_image(index.root / p)) for p in index.paths])
    module = runner.extractor(parse_taps("_blocks.2,view", trace_base(runner.loaded)))
    want = runner.forward(module, old_way)
    for _ in range(2):  # the second batch reuses the normalized buffer of the first
        got = runner.forward(module, pixels)
        assert all(np.array_equal(got[k], want[k]) for k in want)
