"""HEIC/HEIF photos (an iPhone's default format): read through pillow-heif (the [heic] extra, in dev) when it is
installed, registered on the first such file; without it, skipped with an error that names the install command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache import load_features
from featurecache.config import Paths
from featurecache.data import Decoding, load_image
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.train import TrainOptions, train_heads

pillow_heif = pytest.importorskip("pillow_heif", reason="the [heic] extra (installed by make install)")
REPO = Path(__file__).resolve().parents[1]


def scene(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """Smooth colour blobs (HEVC is lossy: smooth content keeps the comparison tight)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def heic(path: Path, image: Image.Image, **save: object) -> Path:
    pillow_heif.from_pillow(image).save(path, quality=95, **save)
    return path


def test_a_heic_photo_decodes_to_the_pixels_it_holds(tmp_path):
    source = scene()
    path = heic(tmp_path / "IMG_0001.HEIC", source)
    assert path.read_bytes()[4:12] == b"ftypheic"
    pixels = np.asarray(load_image(path)).astype(int)
    assert pixels.shape == (48, 64, 3)
    error = np.abs(pixels - np.asarray(source)).mean()
    assert error < 12 < np.abs(pixels - np.asarray(source)[::-1]).mean()  # lossy (~6 of 255), but the same picture


def test_a_heic_photo_comes_out_upright_under_either_orientation(tmp_path):
    """A phone writes the turn into the container (irot); libheif applies it and reports EXIF orientation 1."""
    source = scene()
    exif = Image.Exif()
    exif[0x0112] = 6  # pillow-heif writes a tag-6 picture as an irot box, as a phone does
    path = heic(tmp_path / "portrait.heic", source.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    for decoding in (Decoding(), Decoding(orientation="ignore")):
        pixels = np.asarray(load_image(path, decoding)).astype(int)
        assert pixels.shape == (48, 64, 3) and np.abs(pixels - np.asarray(source)).mean() < 12


def test_a_file_that_is_neither_keeps_pil_s_error(tmp_path):
    path = tmp_path / "notes.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypjunk" + bytes(40))
    with pytest.raises(Image.UnidentifiedImageError, match="cannot identify image file"):
        load_image(path)


def test_without_pillow_heif_the_error_names_the_install_command(tmp_path):
    """In a fresh process where pillow-heif cannot be imported (it would be registered for good in this one)."""
    path = heic(tmp_path / "IMG_0002.HEIC", scene())
    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from featurecache.data import load_image\n"
        f"load_image({str(path)!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode == 1
    assert "is a HEIC/HEIF photo, which PIL reads only with pillow-heif: pip install 'featurecache[heic]'" in run.stderr


def test_heic_photos_are_extracted_like_any_other(tmp_path):
    root = tmp_path / "phone"
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                heic(root / split / name / f"IMG_{i}.HEIC", scene(seed=10 * c + i + len(split)))
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="flatten", splits=["train"])
    (result,) = extract(request, paths=Paths(tmp_path / "h"), options=ExtractOptions(progress=False, runtime="eager"))
    assert result.num_samples == 4 and result.num_skipped == 0
    X, _, _ = load_features(result.path, "flatten")
    assert len(X) == 4 and np.abs(X).sum(axis=1).min() > 0  # no row zeroed as unreadable


def held_out(root: Path) -> Path:
    """One PNG per class in val and test, so that train is used as it is."""
    for split in ("val", "test"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            scene(seed=c + 20).save(root / split / name / "0.png")
    return root


def test_a_cache_that_skipped_heic_photos_is_re_extracted_once_pillow_heif_reads_them(tmp_path, caplog):
    root = held_out(tmp_path / "mixed")
    for c, name in enumerate(("a", "b")):
        (root / "train" / name).mkdir(parents=True)
        scene(seed=c).save(root / "train" / name / "0.png")
        heic(root / "train" / name / "1.HEIC", scene(seed=c + 5))
    home = tmp_path / "h"
    # A run where pillow-heif cannot be imported skips the HEIC photos, naming the install command.
    cli = "import sys; sys.modules['pillow_heif'] = None\nfrom pipelines.cli import run\nsys.exit(run(sys.argv[1:]))"
    args = ["extract", str(root), "--base", "mobilenet_v2_offline", "--layers", "flatten", "--splits", "train",
            "--runtime", "eager", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEATURECACHE_HOME": str(home)}
    first = subprocess.run([sys.executable, "-c", cli, *args], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "4 images (2 read, 2 skipped)" in first.stdout and "pip install 'featurecache[heic]'" in first.stderr
    request = ExtractRequest(root, base="mobilenet_v2_offline", layers="flatten")
    options = ExtractOptions(progress=False, runtime="eager")
    extract(ExtractRequest(root, base="mobilenet_v2_offline", layers="flatten", splits=["val", "test"]),
            paths=Paths(home), options=options)  # fmt: skip
    quiet = TrainOptions(progress=False)
    (before,) = train_heads(dataset="mixed", base_tag="mobilenet_v2_offline", heads=["logreg"], options=quiet,
                            paths=Paths(home))  # fmt: skip
    assert before["n_train"] == 2  # the two PNGs: the HEIC photos were skipped
    # With pillow-heif the same files (the same config fingerprint) are read: the cache is made again, not reused,
    # and the head trained on the smaller cache is retrained, not reused.
    with caplog.at_level("INFO", logger="featurecache.extract"):
        again = {r.split: r for r in extract(request, paths=Paths(home), options=options)}
    assert "skipped HEIC photos that pillow-heif, installed since, reads" in caplog.text
    assert again["train"].status == "extracted" and again["train"].num_skipped == 0
    (after,) = train_heads(dataset="mixed", base_tag="mobilenet_v2_offline", heads=["logreg"], options=quiet,
                           paths=Paths(home))  # fmt: skip
    assert after["status"] == "trained" and after["n_train"] == 4
