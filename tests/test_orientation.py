"""--orientation: photos turned upright by their EXIF tag (the default) or decoded as stored, recorded in the cache
and in every head, and followed by predict; caches made before the option (which ignored the tag) are re-extracted
under the default and stay valid under ``--orientation ignore``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from featurecache import FeaturecacheError, load_features, read_metadata
from featurecache.config import Paths
from featurecache.data import Decoding, draft_would_shrink, load_image
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.persist import load_head
from featurecache.predict import _decoding_of, predict_images
from featurecache.preprocess import DraftSize
from featurecache.train import TrainOptions, train_heads

BASE = "mobilenet_v2_offline"
OPTIONS = {"dtype": "float32", "progress": False, "runtime": "eager"}
ORIENTATION = 0x0112
T = Image.Transpose
# EXIF orientation -> how a camera stores an upright scene: the inverse of the turn that makes the file upright.
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
             7: T.TRANSVERSE, 8: T.ROTATE_270}  # fmt: skip


def upright_scene(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    """An image with no symmetry, so that every wrong turn or flip shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def stored(scene: Image.Image, orientation: int, path: Path, **save: object) -> Path:
    """``scene`` as a camera would store it with EXIF ``orientation``: the pixels turned, plus the tag."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    turned = scene if STORED_AS[orientation] is None else scene.transpose(STORED_AS[orientation])
    turned.save(path, exif=exif.tobytes(), **save)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["png", "tiff", "jpg"])
def test_every_exif_orientation_gives_the_upright_scene(tmp_path, orientation, kind):
    scene = upright_scene()
    path = stored(scene, orientation, tmp_path / f"o{orientation}.{kind}", **({"quality": 95} if kind == "jpg" else {}))
    upright = np.asarray(load_image(path))
    if kind == "jpg":  # lossy: the decoded pixels as PIL's own exif_transpose turns them
        np.testing.assert_array_equal(upright, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
    else:  # lossless: exactly the scene the camera saw
        np.testing.assert_array_equal(upright, np.asarray(scene))


@pytest.mark.parametrize("orientation", [3, 6])
@pytest.mark.parametrize("kind", ["png", "jpg", "tiff"])
def test_ignore_reads_the_pixels_as_imagefolder_does(tmp_path, orientation, kind):
    """As stored, except TIFFs: PIL turns those by their tag as it loads them, so torchvision's loader sees them
    upright too."""
    from torchvision.datasets.folder import pil_loader

    path = stored(upright_scene(), orientation, tmp_path / f"o{orientation}.{kind}")
    ignored = np.asarray(load_image(path, Decoding(orientation="ignore")))
    np.testing.assert_array_equal(ignored, np.asarray(pil_loader(str(path))))
    assert (ignored.shape[:2] == (30, 40)) is (kind == "tiff" or orientation == 3)


def test_a_transparent_image_is_composited_and_turned(tmp_path):
    scene = upright_scene().convert("RGBA")
    scene.putpixel((0, 0), (255, 0, 0, 0))  # a transparent corner: onto the background, then turned with the rest
    path = stored(scene, 6, tmp_path / "icon.png")
    image = np.asarray(load_image(path, Decoding(alpha="white")))
    assert image.shape == (30, 40, 3) and tuple(image[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("exif", [b"Exif\x00\x00MM\x00*garbage", b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"])
def test_a_mangled_exif_block_decodes_the_pixels_as_stored(tmp_path, exif):
    path = tmp_path / "mangled.jpg"
    upright_scene().save(path, quality=95, exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))


def test_an_exif_parser_that_raises_decodes_the_pixels_as_stored(tmp_path, monkeypatch):
    """Pillow 13 warns on the blocks above; other versions raised on such blocks (a mangled tag is common in
    the wild), and the pixels are fine either way."""
    path = stored(upright_scene(), 6, tmp_path / "turned.png")

    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_an_orientation_outside_1_to_8_decodes_the_pixels_as_stored(tmp_path, value):
    path = tmp_path / "odd.png"
    exif = Image.Exif()
    exif[ORIENTATION] = value
    upright_scene().save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(upright_scene()))


def test_a_draft_decode_keeps_what_the_upright_image_needs(tmp_path):
    """A portrait shot stored sideways: the resize needs the upright width, which is the stored height."""
    path = stored(upright_scene((1200, 1600)), 6, tmp_path / "portrait.jpg", quality=90)  # stored 1600x1200
    need = DraftSize((100, 400))  # (h, w): the upright image must stay at least 400 wide
    assert load_image(path, draft=need).size == (600, 800)  # 1/2 scale; 1/4 would leave it 300 wide
    assert load_image(path, Decoding(orientation="ignore"), draft=need).size == (400, 300)  # stored 1/4: 400 wide


def test_the_draft_hint_asks_for_the_upright_size_as_the_decode_does(tmp_path):
    path = stored(upright_scene((1200, 1600)), 6, tmp_path / "portrait.jpg", quality=90)  # stored 1600x1200
    need = DraftSize((100, 700))  # the upright image must stay 700 wide: its stored height, 1200, cannot halve
    assert not draft_would_shrink(path, need)
    assert draft_would_shrink(path, need, Decoding(orientation="ignore"))  # stored 1600 wide: halves to 800


def test_decoding_records_and_reads_back_what_a_cache_or_head_predates():
    assert Decoding.recorded({}) == Decoding(alpha="mean", orientation="ignore", decode="full")
    assert Decoding().cache_keys() == {"alpha": "mean", "orientation": "exif"}
    assert Decoding(orientation="ignore").cache_keys() == {"alpha": "mean"}  # as caches made before the option
    for decoding in (Decoding(), Decoding(alpha="white", orientation="ignore", decode="draft")):
        assert Decoding.recorded({**decoding.cache_keys(), "decode": decoding.decode}) == decoding
    with pytest.raises(FeaturecacheError, match="unknown --orientation 'sideways'; choose one of: exif, ignore"):
        Decoding(orientation="sideways")


def rotated_folder(root: Path) -> Path:
    """Two classes of small photos; in every split one image of each class is stored sideways with tag 6."""
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                scene = upright_scene((64, 48), seed=100 * c + 10 * i + len(split))
                stored(scene, 6 if i == 0 else 1, folder / f"{i}.png")
    return root


def test_the_cache_records_orientation_and_only_turned_images_change(tmp_path, caplog, monkeypatch):
    root = rotated_folder(tmp_path / "photos")
    request = ExtractRequest(root, base=BASE, layers="flatten")
    upright_home, stored_home = Paths(tmp_path / "u"), Paths(tmp_path / "s")
    upright = {r.split: r for r in extract(request, paths=upright_home, options=ExtractOptions(**OPTIONS))}
    as_stored = {r.split: r for r in extract(request, paths=stored_home, options=ExtractOptions(orientation="ignore",
                                                                                               **OPTIONS))}  # fmt: skip
    assert read_metadata(upright["train"].path)["orientation"] == "exif"
    assert "orientation" not in read_metadata(as_stored["train"].path)  # the fingerprint of a cache from before
    X_up, _, meta = load_features(upright["train"].path, "flatten")
    X_st, _, _ = load_features(as_stored["train"].path, "flatten")
    turned = np.array([p.endswith("/0.png") for p in meta["paths"]])
    assert turned.sum() == 2
    assert np.array_equal(X_up[~turned], X_st[~turned]) and not np.isclose(X_up[turned], X_st[turned]).all()

    # A cache made before --orientation (no key, the tag ignored) is re-extracted under the default, by name.
    with caplog.at_level(logging.INFO, logger="featurecache.extract"):
        (again,) = extract(ExtractRequest(root, base=BASE, layers="flatten", splits=["train"]), paths=stored_home,
                           options=ExtractOptions(**OPTIONS))  # fmt: skip
    assert again.status == "extracted" and "to keep it instead, run with --orientation ignore" in caplog.text
    with pytest.raises(FeaturecacheError, match=r"decoded their images differently .*train mean/exif/full, val mean/"
                                                r"ignore/full"):  # fmt: skip
        train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg"],
                    options=TrainOptions(progress=False), paths=stored_home)  # fmt: skip

    # A head remembers the orientation, and predict turns new images as the training images were turned.
    train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg"],
                options=TrainOptions(progress=False), paths=upright_home)  # fmt: skip
    model_dir = upright_home.models / "photos" / BASE / "flatten" / "logreg"
    head, record = load_head(model_dir)
    assert record.orientation == "exif" and _decoding_of(record).orientation == "exif"
    X_test, _, test_meta = load_features(upright["test"].path, "flatten")
    seen = []
    monkeypatch.setattr("featurecache.predict.load_image", lambda path, decoding, **kw: seen.append(decoding) or
                        load_image(path, decoding, **kw))  # fmt: skip
    rows = predict_images(model_dir, [root / p for p in test_meta["paths"]])
    assert [r["label"] for r in rows] == [record.class_names[i] for i in head.predict(X_test.astype(np.float32))]
    assert {d.orientation for d in seen} == {"exif"}


def test_a_head_from_before_the_option_predicts_with_the_tag_ignored(tmp_path, monkeypatch):
    root = rotated_folder(tmp_path / "photos")
    home = Paths(tmp_path / "h")
    extract(ExtractRequest(root, base=BASE, layers="flatten"), paths=home,
            options=ExtractOptions(orientation="ignore", **OPTIONS))  # fmt: skip
    train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg"],
                options=TrainOptions(progress=False), paths=home)  # fmt: skip
    model_dir = home.models / "photos" / BASE / "flatten" / "logreg"
    sidecar = model_dir / "sidecar.json"
    data = json.loads(sidecar.read_text())
    assert data.pop("orientation") == "ignore"
    sidecar.write_text(json.dumps(data))  # as written before the field existed
    head, record = load_head(model_dir)
    assert record.orientation is None
    seen = []
    monkeypatch.setattr("featurecache.predict.load_image", lambda path, decoding, **kw: seen.append(decoding) or
                        load_image(path, decoding, **kw))  # fmt: skip
    X_test, _, meta = load_features(home.feature_file("photos", BASE, "test"), "flatten")
    rows = predict_images(model_dir, [root / p for p in meta["paths"]])
    assert [r["label"] for r in rows] == [record.class_names[i] for i in head.predict(X_test.astype(np.float32))]
    assert {d.orientation for d in seen} == {"ignore"}


def test_the_command_line_passes_orientation_on(tiny, tmp_path, monkeypatch, capsys):
    from pipelines import compare_layers
    from pipelines.cli import run

    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path))
    args = ["extract", str(tiny), "--base", BASE, "--layers", "features.3", "--no-progress", "--workers", "0"]
    assert run([*args, "--orientation", "ignore"]) == 0
    capsys.readouterr()
    assert run(["info", str(tmp_path / "data" / "features" / "tiny" / BASE / "test.h5")]) == 0
    assert "orientation ignore" in capsys.readouterr().out
    asked = []
    monkeypatch.setattr(compare_layers, "run_comparison", lambda **kw: asked.append(kw["options"]) or [])
    assert run(["compare-layers", str(tiny), "--orientation", "ignore", "--no-progress"]) == 0
    assert asked[0].extract.decoding == Decoding(orientation="ignore")


def test_train_heads_refuses_augmented_views_turned_otherwise_than_the_splits(tmp_path):
    from featurecache.train import _check_splits_agree

    split = {"class_names": ["a", "b"], "base": BASE, "num_samples": 4, "alpha": "mean", "orientation": "exif"}
    metas = {s: dict(split) for s in ("train", "val", "test")}
    metas["train"]["decode"] = metas["val"]["decode"] = metas["test"]["decode"] = "draft"
    files = {s: tmp_path / f"{s}.h5" for s in (*metas, "train-aug")}
    views = {"class_names": ["a", "b"], "base": BASE, "alpha": "mean", "source_rows": 4}  # views decode in full
    _check_splits_agree(files, {**metas, "train-aug": {**views, "orientation": "exif"}}, augmented=True)
    with pytest.raises(FeaturecacheError, match="train mean/exif/draft.*train-aug mean/ignore/draft"):
        _check_splits_agree(files, {**metas, "train-aug": views}, augmented=True)  # views from before the option


def test_the_raw_pixel_baseline_is_retrained_when_the_decoding_changes():
    from featurecache.freshness import pixels_fingerprint

    meta = {"data_fingerprint": "files", "alpha": "mean"}
    prints = {
        pixels_fingerprint(meta, "pixels16x16"),
        pixels_fingerprint({**meta, "orientation": "exif"}, "pixels16x16"),
        pixels_fingerprint({**meta, "alpha": "white"}, "pixels16x16"),
        pixels_fingerprint(meta, "pixels8x8"),
    }
    assert len(prints) == 4
