"""--decode draft: JPEGs decoded at the reduced scale the base's resize allows, recorded in the cache, followed by
predict; decoding in full stays the default and keeps the fingerprints of caches made before the option."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache import FeaturecacheError, load_features, read_metadata
from featurecache.augment import train_transform
from featurecache.bases import load_base
from featurecache.config import Paths
from featurecache.data import Decoding, load_image
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.persist import load_head
from featurecache.predict import _decoding_of, predict_images
from featurecache.preprocess import DraftSize, Preprocessing
from featurecache.train import TrainOptions, train_heads

BASE = "mobilenet_v2_offline"  # Resize((224, 224)): an exact size
OPTIONS = {"dtype": "float32", "progress": False, "runtime": "eager"}


def photo(path: Path, size: tuple[int, int], seed: int, *, kind: str = "JPEG") -> Path:
    """A smooth photo-like image (a few blobs of colour, upscaled), ``kind``-encoded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    small[:, : 4 + seed % 3] //= 3  # a little class-like structure: dark on the left, by how much varies
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return path


def photo_folder(root: Path) -> Path:
    """Two classes of 800x600 JPEGs (one PNG among them), train/val/test."""
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for c, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 100 * c + 10 * i + len(split)
                kind = "PNG" if (split, i) == ("train", 0) else "JPEG"
                path = photo(folder / f"{i}.{kind.lower()}", (800, 600), seed, kind=kind)
                if c == 1:  # brighter class
                    Image.fromarray(np.clip(np.asarray(Image.open(path)) * 1.0 + 90, 0, 255).astype(np.uint8)).save(
                        path, kind
                    )
    return root


def test_the_draft_size_keeps_what_the_first_resize_needs():
    assert DraftSize(256)((4032, 3024)) == (342, 256) and DraftSize(256)((3024, 4032)) == (256, 342)
    assert DraftSize((224, 160))((4032, 3024)) == (160, 224)  # (h, w) as torchvision's Resize takes it
    lite0 = Preprocessing(load_base("efficientnet_lite0").spec.transforms()).draft_size()
    assert lite0 is not None and lite0.size == 256  # Resize(256) + CenterCrop(224)
    transform = load_base(BASE).spec.transforms()
    assert Preprocessing(transform).draft_size().size == (224, 224)
    # Random crops of any scale (augmented views) and a resize capped by max_size are decoded in full.
    assert Preprocessing(train_transform(transform, 224, "light")).draft_size() is None
    from torchvision import transforms as T

    capped = T.Compose(
        [T.Resize(256, max_size=300), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert Preprocessing(capped).draft_size() is None


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_other_images_in_full(tmp_path):
    draft = DraftSize(256)
    big = photo(tmp_path / "big.jpg", (1600, 1200), 0)
    assert load_image(big).size == (1600, 1200)
    assert load_image(big, draft=draft).size == (400, 300)  # 1/4: both sides stay >= (342, 256)
    small = photo(tmp_path / "small.jpg", (320, 240), 1)  # no scale keeps 256: decoded in full, the same pixels
    assert np.array_equal(np.asarray(load_image(small, draft=draft)), np.asarray(load_image(small)))
    mpo = tmp_path / "phone.jpg"  # a JPEG with an embedded second image (gain map, depth): PIL says "MPO"
    Image.open(big).save(mpo, "MPO", save_all=True, append_images=[Image.open(small)])
    assert Image.open(mpo).format == "MPO" and load_image(mpo, draft=draft).size == (400, 300)
    png = photo(tmp_path / "big.png", (1600, 1200), 2, kind="PNG")  # only JPEGs have a DCT to scale
    assert np.array_equal(np.asarray(load_image(png, draft=draft)), np.asarray(load_image(png)))
    # After the base's resize and crop the pixels are close to a full decode's, not equal.
    per_image = Preprocessing(load_base("efficientnet_lite0").spec.transforms()).per_image
    full, fast = (per_image(load_image(big, draft=d)).numpy().astype(int) for d in (None, draft))
    assert full.shape == fast.shape == (3, 224, 224)
    assert 0 < np.abs(full - fast).mean() < 3 and np.abs(full - fast).max() < 40


@pytest.mark.slow
def test_draft_caches_are_recorded_reextracted_when_switched_and_followed_by_predict(tmp_path, caplog, monkeypatch):
    root = photo_folder(tmp_path / "photos")
    request = ExtractRequest(root, base=BASE, layers="features.6,flatten")
    full_home, draft_home = Paths(tmp_path / "full"), Paths(tmp_path / "draft")
    full = {r.split: r for r in extract(request, paths=full_home, options=ExtractOptions(**OPTIONS))}
    draft = {r.split: r for r in extract(request, paths=draft_home, options=ExtractOptions(decode="draft", **OPTIONS))}
    full_meta, draft_meta = read_metadata(full["train"].path), read_metadata(draft["train"].path)
    assert "decode" not in full_meta  # decoding in full adds no key: caches made before --decode stay valid
    assert draft_meta["decode"] == "draft" and draft_meta["config_fingerprint"] != full_meta["config_fingerprint"]
    X_full, y, _ = load_features(full["train"].path, "flatten")
    X_draft, y_draft, _ = load_features(draft["train"].path, "flatten")
    assert np.array_equal(y, y_draft) and not np.array_equal(X_full, X_draft)
    assert np.abs(X_full - X_draft).max() / np.abs(X_full).max() < 0.2  # near: the same images, slightly resampled
    png_row = [i for i, p in enumerate(load_features(full["train"].path, "flatten")[2]["paths"]) if p.endswith(".png")]
    assert np.array_equal(X_full[png_row], X_draft[png_row])  # a PNG decodes in full either way

    train_only = ExtractRequest(root, base=BASE, layers="features.6,flatten", splits=["train"])
    with caplog.at_level(logging.INFO, logger="featurecache.extract"):
        (again,) = extract(train_only, paths=draft_home, options=ExtractOptions(**OPTIONS))
    assert again.status == "extracted" and "made with other options (decode)" in caplog.text
    assert "to keep it instead, run with --decode draft" in caplog.text
    with pytest.raises(
        FeaturecacheError, match=r"decoded their images differently .*train mean/exif/full, val mean/exif/draft"
    ):
        train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg"],
                    options=TrainOptions(progress=False), paths=draft_home)  # fmt: skip
    # Augmented views crop at random scales: decoded in full (no draft key) beside a draft train split.
    views = ExtractRequest(root, base=BASE, layers="features.6,flatten", splits=["train"], train_views=1)
    train, aug = extract(views, paths=draft_home, options=ExtractOptions(decode="draft", **OPTIONS))
    assert read_metadata(train.path)["decode"] == "draft" and "decode" not in read_metadata(aug.path)

    train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg", "mlp"],
                             options=TrainOptions(progress=False), paths=draft_home)  # fmt: skip
    model_dir = draft_home.models / "photos" / BASE / "flatten" / "logreg"
    head, record = load_head(model_dir)
    assert record.decode == "draft" and _decoding_of(record).decode == "draft"
    X_test, _, meta = load_features(draft["test"].path, "flatten")
    cached = head.predict(X_test.astype(np.float32))
    drafts = []

    def recording(path, decoding, **kwargs):
        drafts.append(kwargs.get("draft"))
        return load_image(path, decoding, **kwargs)

    monkeypatch.setattr("featurecache.predict.load_image", recording)
    rows = predict_images(model_dir, [root / p for p in meta["paths"]])  # decoded as the training images were
    assert [r["label"] for r in rows] == [record.class_names[i] for i in cached]
    assert len(drafts) == len(rows) and all(isinstance(d, DraftSize) for d in drafts)
    from featurecache.finetune import FinetuneOptions, rebuild

    assert rebuild("photos", BASE, FinetuneOptions(device="cpu"), draft_home).splits.decoding.decode == "draft"


def test_the_cli_passes_decode_to_the_cache(tmp_path, monkeypatch, capsys):
    from pipelines.cli import run
    from tests.helpers import make_image_folder

    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path / "home"))
    root = make_image_folder(tmp_path / "tiny", per_class={"train": 2, "val": 1, "test": 1})
    args = ["extract", str(root), "--base", BASE, "--layers", "features.3", "--splits", "test", "--no-progress"]
    assert run([*args, "--runtime", "eager", "--decode", "draft"]) == 0
    assert read_metadata(tmp_path / "home/data/features/tiny" / BASE / "test.h5")["decode"] == "draft"
    with pytest.raises(SystemExit) as exited:  # argparse names the choices
        run([*args, "--decode", "fast"])
    assert exited.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_an_unknown_decode_mode_names_the_choices(tmp_path):
    with pytest.raises(FeaturecacheError, match="unknown --decode 'fast'; choose one of: full, draft"):
        extract(ExtractRequest(tmp_path, base=BASE), paths=Paths(tmp_path / "h"), options=ExtractOptions(decode="fast"))


def test_fine_tuning_decodes_evaluation_images_as_the_cache_did_and_augmented_ones_in_full(tmp_path):
    from featurecache.data import discover_splits
    from featurecache.finetune import Splits

    root = photo_folder(tmp_path / "photos")
    transform = load_base(BASE).spec.transforms()
    index = discover_splits(root)
    splits = Splits(index=index, labels={}, valid={}, eval_transform=transform, input_size=224, batch_size=2, seed=0,
                    workers=0, decoding=Decoding(alpha="white", decode="draft"))  # fmt: skip
    assert isinstance(splits.loader("test", transform, shuffle=False).dataset.draft, DraftSize)
    augmented = train_transform(transform, 224, "light")
    assert splits.loader("train", augmented, shuffle=True).dataset.draft is None
    full = Splits(**{**splits.__dict__, "decoding": Decoding(alpha="white")})
    assert full.loader("test", transform, shuffle=False).dataset.draft is None


def test_large_jpegs_bring_a_hint_at_draft_decoding_small_images_and_draft_runs_do_not(tmp_path, caplog):
    from featurecache.data import discover_splits
    from featurecache.extract import _Runner, _suggest_draft
    from tests.helpers import make_image_folder

    loaded = load_base(BASE)
    large = discover_splits(photo_folder(tmp_path / "photos"))["train"]
    small = discover_splits(make_image_folder(tmp_path / "small"))["train"]  # 24-100 px: nothing to gain
    full, draft = (_Runner(loaded, "cpu", ExtractOptions(decode=mode, **OPTIONS)) for mode in ("full", "draft"))
    for index, runner, hinted in ((large, full, True), (small, full, False), (large, draft, False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="featurecache.extract"):
            _suggest_draft(index, runner)
        assert ("--decode draft decodes such images" in caplog.text) is hinted, (index.root, runner.options.decode)
