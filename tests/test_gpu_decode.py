"""--decode gpu: JPEGs decoded by nvjpeg and every image resized by torch on the device that runs the base.

CI has no GPU, so these tests run every step of that path on the CPU, where ``decode_jpeg`` is libjpeg-turbo:
the worker side (bytes + EXIF turn, PIL for the rest), the collation, the batch decode with its broken-file
fallback, the resize, the cache record and predict. Only the ``device="cuda"`` argument (nvjpeg) is not run here;
outside a test, asking for ``--decode gpu`` on the CPU is refused in one line.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from featurecache import FeaturecacheError, load_features, read_metadata
from featurecache import gpu_decode as G
from featurecache.augment import train_transform
from featurecache.bases import load_base
from featurecache.config import Paths
from featurecache.data import Decoding, load_image, read_encoded
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.preprocess import DEVICE_DECODE_RULE, Preprocessing, device_geometry_for
from featurecache.store import read_skipped
from tests.test_decode import photo, photo_folder

BASE = "mobilenet_v2_offline"  # Resize((224, 224)): an exact size, no crop
OPTIONS = {"dtype": "float32", "progress": False, "runtime": "eager", "device": "cpu"}


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    """``--decode gpu`` allowed on the CPU: the same code, with libjpeg-turbo where a GPU runs nvjpeg."""
    monkeypatch.setattr(G, "check_device", lambda device: None)


def near(X, reference) -> bool:
    """Features of the same images decoded another way: every row within a few degrees of the reference's, and the
    whole within 10% of its norm (measured for mobilenet_v2_offline's pooled layer: cosine >= 0.997, 5% apart)."""
    cosines = (X * reference).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(reference, axis=1)
    return bool(cosines.min() > 0.99 and np.linalg.norm(X - reference) < 0.1 * np.linalg.norm(reference))


def geometry_of(transform, decode: str = "gpu"):
    return device_geometry_for(Preprocessing(transform), decode)


def test_the_device_geometry_is_the_bases_fixed_resize_and_crop():
    from torchvision import transforms as T

    lite0 = geometry_of(load_base("efficientnet_lite0").spec.transforms())
    assert (lite0.size, lite0.crop, lite0.output_size) == ((256,), (224, 224), (224, 224))
    exact = geometry_of(load_base(BASE).spec.transforms())
    assert (exact.size, exact.crop, exact.output_size) == ((224, 224), None, (224, 224))
    preset = geometry_of(load_base("resnet18", weights="none").spec.transforms())  # a torchvision weights preset
    assert (preset.size, preset.crop) == ((256,), (224, 224))
    assert geometry_of(load_base(BASE).spec.transforms(), "full") is None  # only when asked for
    # Random crops (augmented views), a step beyond resize + crop, or no fixed shape: decoded on the CPU.
    assert geometry_of(train_transform(load_base(BASE).spec.transforms(), 224, "light")) is None
    tail = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    assert geometry_of(T.Compose([T.Resize(256), T.CenterCrop(224), T.Grayscale(3), *tail])) is None
    assert geometry_of(T.Compose([T.Resize(256), *tail])) is None  # the shorter side only: shapes would differ


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"])
def test_only_interpolations_torch_computes_as_pil_does_on_every_device_run_there(mode):
    """NEAREST is not PIL's nearest (21 of 255 apart), LANCZOS is CPU-only in torch, BOX and HAMMING run nowhere."""
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(mode)
    tail = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    geometry = geometry_of(T.Compose([T.Resize(256, interpolation=interpolation), T.CenterCrop(224), *tail]))
    assert (geometry is not None) == (mode in ("bilinear", "bicubic"))


@pytest.mark.parametrize("turn", list(Image.Transpose))
def test_every_exif_turn_turns_the_pixels_as_pil_does(turn):
    pixels = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    import torch

    turned = G._turned(torch.from_numpy(pixels).permute(2, 0, 1), turn).permute(1, 2, 0).numpy()
    assert np.array_equal(turned, np.asarray(Image.fromarray(pixels).transpose(turn)))


def test_a_batch_of_jpegs_grey_png_and_turned_photos_comes_out_near_pil_and_broken_files_are_named(tmp_path):
    transform = load_base("efficientnet_lite0").spec.transforms()
    preprocessing, geometry = Preprocessing(transform), geometry_of(transform)
    colour = photo(tmp_path / "colour.jpg", (500, 300), 0)
    Image.open(colour).convert("L").save(tmp_path / "grey.jpg")
    Image.open(colour).save(tmp_path / "lossless.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": a phone's portrait shot
    Image.open(colour).save(tmp_path / "portrait.jpg", exif=exif)
    payload = colour.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(payload[: len(payload) * 4 // 5])
    (tmp_path / "scrambled.jpg").write_bytes(payload[:400] + bytes(200) + payload[600:])
    names = ["colour.jpg", "grey.jpg", "lossless.png", "portrait.jpg", "truncated.jpg", "scrambled.jpg"]
    items = [read_encoded(tmp_path / name, Decoding(), geometry) for name in names]
    assert items[2].jpeg is None and items[2].pixels.shape == (3, 224, 224)  # not a JPEG: PIL + resize in the worker
    assert items[3].turn == Image.Transpose.ROTATE_270 and items[0].turn is None
    Image.open(colour).save(tmp_path / "adobe-rgb.jpg", keep_rgb=True)  # stores RGB, not YCbCr: PIL decodes it
    assert Image.open(tmp_path / "adobe-rgb.jpg").info["adobe_transform"] == 0
    assert read_encoded(tmp_path / "adobe-rgb.jpg", Decoding(), geometry).jpeg is None
    with pytest.raises(OSError):  # a header PIL cannot read fails in the worker, like any unreadable file
        (tmp_path / "stub.jpg").write_bytes(payload[:300])
        read_encoded(tmp_path / "stub.jpg", Decoding(), geometry)

    pixels, errors = G.decode_batch([*items, None], [""] * len(items) + ["OSError: unreadable"], geometry, "cpu")
    assert pixels.shape == (7, 3, 224, 224) and pixels.dtype.is_floating_point is False
    assert errors[:4] == [""] * 4 and errors[6] == "OSError: unreadable"
    assert errors[4] == "OSError: cannot decode JPEG: Image is incomplete or truncated"
    assert errors[5].startswith("OSError: cannot decode JPEG: ") and "decode_jpeg.cpp" not in errors[5]
    assert not pixels[4:].any()  # unreadable rows are zeros (their features are zeroed anyway)
    for i, name in enumerate(names[:4]):  # torch's antialiased resize in float32 is PIL's within 1-2 of 255
        reference = preprocessing.per_image(load_image(tmp_path / name, Decoding())).numpy().astype(int)
        difference = np.abs(reference - pixels[i].numpy())
        assert difference.max() <= 2 and difference.mean() < 0.2, name
    ignored = read_encoded(tmp_path / "portrait.jpg", Decoding(orientation="ignore"), geometry)
    assert ignored.turn is None  # --orientation ignore: as stored


def jpeg_batch(tmp_path, count: int = 5):
    """``count`` JPEG items with a truncated one in the middle, and the geometry of Lite0."""
    geometry = geometry_of(load_base("efficientnet_lite0").spec.transforms())
    paths = [photo(tmp_path / f"{i}.jpg", (320, 240), i) for i in range(count)]
    payload = paths[count // 2].read_bytes()
    paths[count // 2].write_bytes(payload[: len(payload) // 2])
    return [read_encoded(p, Decoding(), geometry) for p in paths], geometry


def test_the_jpegs_are_decoded_in_chunks_and_a_failed_chunk_image_by_image_with_the_same_result(tmp_path, monkeypatch):
    items, geometry = jpeg_batch(tmp_path)
    whole, whole_errors = G.decode_batch(items, [""] * 5, geometry, "cpu")
    monkeypatch.setattr(G, "DECODE_CHUNK", 2)
    chunked, chunked_errors = G.decode_batch(items, [""] * 5, geometry, "cpu")
    assert whole.equal(chunked) and whole_errors == chunked_errors
    assert [bool(e) for e in whole_errors] == [False, False, True, False, False]


def test_a_device_failure_is_raised_not_recorded_as_unreadable_images(tmp_path, monkeypatch):
    """Out of memory, a failed kernel: under --on-bad-image skip these would turn good images into skipped rows for
    good (the cache's fingerprint does not change, so they would never be retried)."""
    import torch

    items, geometry = jpeg_batch(tmp_path)

    wrapped = "Error while decoding JPEG images: "  # how torchvision's CUDA decoder re-raises what it meets
    failures = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
        RuntimeError(wrapped + "CUDA out of memory. Tried to allocate 9.00 GiB"),
        RuntimeError(wrapped + "CUDA error: an illegal memory access was encountered"),
    ]
    for failure in failures:

        def failing(data, device, failure=failure):
            raise failure

        monkeypatch.setattr(G, "_decode_call", failing)
        with pytest.raises(RuntimeError, match="out of memory|CUDA error"):
            G.decode_batch(items, [""] * 5, geometry, "cpu")


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu_with_one_warning(tmp_path, monkeypatch, caplog):
    """nvjpeg refusing what libjpeg-turbo reads (an unusual JPEG): the image is kept, decoded on the CPU. The device
    is torch's "meta" here, which runs every step without data."""
    items, geometry = jpeg_batch(tmp_path)
    calls = []
    real = G._decode_call

    def refusing_on_the_device(data, device):
        calls.append(str(device))
        if str(device) != "cpu":
            raise RuntimeError("nvjpegDecode failed: JPEG stream is not supported")
        return real(data, device)

    monkeypatch.setattr(G, "_decode_call", refusing_on_the_device)
    with caplog.at_level(logging.WARNING, logger="featurecache.gpu_decode"):
        pixels, errors = G.decode_batch(items, [""] * 5, geometry, "meta")
        G.decode_batch(items, [""] * 5, geometry, "meta")
    assert pixels.device.type == "meta" and pixels.shape == (5, 3, 224, 224)
    assert errors[2] == "OSError: cannot decode JPEG: Image is incomplete or truncated"
    assert errors[:2] == errors[3:] == ["", ""]  # refused by the device, read on the CPU
    assert calls.count("cpu") == 2 * 5 and caplog.text.count("nvjpeg refused a JPEG") == 1


def test_batches_are_decoded_ahead_in_order_and_the_thread_stops_with_the_loop():
    import threading

    calls = []

    def decode(item):
        calls.append(item)
        return (item * 2,)

    ahead = G.decoded_ahead(iter(range(10)), decode, "cpu")
    assert [next(ahead)[0] for _ in range(3)] == [0, 2, 4]  # in order, whichever thread decoded them
    ahead.close()  # the loop stops early (an error, --on-bad-image fail)
    assert len(calls) <= 3 + G.AHEAD  # no more than one batch in hand and AHEAD in the making
    assert not [t for t in threading.enumerate() if t.name.startswith("featurecache-device-decode")]


def test_the_decode_ahead_thread_stops_when_the_forward_pass_raises(tmp_path, gpu_path_on_cpu):
    """A forward that raises (float16 out of range, out of memory): the thread and its decoded batches go with the
    loop, not when the exception is freed."""
    import threading

    from featurecache import decoders
    from featurecache.data import discover_splits
    from featurecache.extract import _Runner

    runner = _Runner(load_base(BASE), "cpu", ExtractOptions(decode="gpu", batch_size=2, **OPTIONS))
    index = discover_splits(photo_folder(tmp_path / "photos"))["train"]
    data = runner.image_files(index, range(len(index)))
    batches = (decoders.decode_batch(data, (start, start + 2)) for start in range(0, len(index), 2))

    def failing(images):
        raise ValueError("features of layer 'flatten' fall outside float16's range")

    with pytest.raises(ValueError) as raised:
        for _ in runner.forward_batches(failing, batches):
            pass
    assert raised.value is not None  # the exception, and the frames it holds, are still referenced here
    assert not [t for t in threading.enumerate() if t.name.startswith("featurecache-device-decode")]


def test_out_of_memory_in_nvjpeg_is_retried_once_with_torchs_cache_emptied(tmp_path, monkeypatch):
    import torch

    items, geometry = jpeg_batch(tmp_path)
    calls, emptied = [], []

    def short_of_memory_once(data, device):
        calls.append(len(data))
        if len(calls) == 1:
            raise RuntimeError("Error while decoding JPEG images: NVJPEG_STATUS_ALLOCATOR_FAILURE")
        return [torch.zeros(3, 240, 320, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(G, "_decode_call", short_of_memory_once)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: type("S", (), {"synchronize": lambda s: 0})())
    out = G._decode_jpegs([item.jpeg for item in items], torch.device("cuda"))  # no GPU here: the calls stood in
    assert len(out) == 5 and calls == [5, 5] and emptied == [True]


def test_decode_gpu_is_refused_where_torchvision_has_no_nvjpeg(monkeypatch):
    def without_nvjpeg(data, device):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(G, "_decode_call", without_nvjpeg)
    with pytest.raises(FeaturecacheError, match=r"^--decode gpu: torchvision cannot decode JPEGs on cuda:0 \(.*nvJPEG"):
        G.check_device("cuda:0")


def test_decode_gpu_on_the_cpu_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    root = photo_folder(tmp_path / "photos")
    request = ExtractRequest(root, base=BASE, layers="flatten")
    with pytest.raises(FeaturecacheError, match=r"^--decode gpu decodes JPEGs with nvjpeg on a CUDA device, and"):
        extract(request, paths=Paths(tmp_path / "home"), options=ExtractOptions(decode="gpu", **OPTIONS))
    assert not list((tmp_path / "home").rglob("*.h5"))  # refused before any file is written
    from pipelines.cli import run

    monkeypatch.setenv("FEATURECACHE_HOME", str(tmp_path / "cli"))
    args = ["extract", str(root), "--base", BASE, "--layers", "flatten", "--device", "cpu", "--decode", "gpu"]
    assert run([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "use --decode draft on the CPU" in err[-1]


def test_a_gpu_decoded_cache_is_recorded_near_a_full_one_and_followed_by_predict(tmp_path, caplog, gpu_path_on_cpu):
    root = photo_folder(tmp_path / "photos")
    broken = root / "train" / "dark" / "3.jpeg"
    broken.write_bytes(broken.read_bytes()[:-900])  # a truncated photo: found when the batch is decoded
    request = ExtractRequest(root, base=BASE, layers="features.6,flatten")
    full_home, gpu_home = Paths(tmp_path / "full"), Paths(tmp_path / "gpu")
    full = {r.split: r for r in extract(request, paths=full_home, options=ExtractOptions(**OPTIONS))}
    gpu = {r.split: r for r in extract(request, paths=gpu_home, options=ExtractOptions(decode="gpu", **OPTIONS))}
    full_meta, gpu_meta = read_metadata(full["train"].path), read_metadata(gpu["train"].path)
    assert gpu_meta["decode"] == "gpu" and gpu_meta["device_decode_rule"] == DEVICE_DECODE_RULE
    assert gpu_meta["config_fingerprint"] != full_meta["config_fingerprint"]
    skipped = [[(path, reason.split(":")[0]) for _, path, reason in read_skipped(r["train"].path)] for r in (full, gpu)]
    assert skipped[0] == skipped[1] == [("train/dark/3.jpeg", "OSError")]
    X_full, y, _ = load_features(full["train"].path, "flatten")
    X_gpu, y_gpu, _ = load_features(gpu["train"].path, "flatten")
    assert np.array_equal(y, y_gpu) and not np.array_equal(X_full, X_gpu)
    assert near(X_gpu, X_full)  # the same images, resized by another kernel: 1 of 255 apart on ~9% of pixels

    # The same pixels whichever decoder runs the batches: worker processes (CUDA's default) or decode threads.
    train_only = ExtractRequest(root, base=BASE, layers="features.6,flatten", splits=["train"])
    options = ExtractOptions(decode="gpu", workers=1, fingerprint="stat", **OPTIONS)
    (in_workers,) = extract(train_only, paths=Paths(tmp_path / "workers"), options=options)
    assert np.array_equal(load_features(in_workers.path, "flatten")[0], X_gpu)

    with caplog.at_level(logging.INFO, logger="featurecache.extract"):
        (again,) = extract(train_only, paths=gpu_home, options=ExtractOptions(**OPTIONS))
    assert again.status == "extracted" and "to keep it instead, run with --decode gpu" in caplog.text
    extract(train_only, paths=gpu_home, options=ExtractOptions(decode="gpu", **OPTIONS))

    from featurecache.persist import load_head
    from featurecache.predict import predict_images
    from featurecache.train import TrainOptions, train_heads

    train_heads(dataset="photos", base_tag=BASE, layers=["flatten"], heads=["logreg"],
                options=TrainOptions(progress=False), paths=gpu_home)  # fmt: skip
    model_dir = gpu_home.models / "photos" / BASE / "flatten" / "logreg"
    head, record = load_head(model_dir)
    assert record.decode == "gpu"
    X_test, _, meta = load_features(gpu["test"].path, "flatten")
    rows = predict_images(model_dir, [root / p for p in meta["paths"]] + [broken])  # decoded as in training
    cached = head.predict(X_test.astype(np.float32))
    assert [r["label"] for r in rows[:-1]] == [record.class_names[i] for i in cached]
    assert rows[-1]["error"] == "OSError: cannot decode JPEG: Image is incomplete or truncated"


def test_fine_tuning_decodes_a_gpu_decoded_cache_in_full_and_records_that():
    from featurecache.finetune import _finetune_decoding

    assert _finetune_decoding(Decoding(decode="gpu")) == Decoding(decode="full")  # its loaders run PIL: predict too
    assert _finetune_decoding(Decoding(decode="draft", alpha="white")) == Decoding(decode="draft", alpha="white")


def test_augmented_views_are_decoded_on_the_cpu_beside_a_gpu_decoded_train_split(tmp_path, gpu_path_on_cpu):
    root = photo_folder(tmp_path / "photos")
    views = ExtractRequest(root, base=BASE, layers="flatten", splits=["train"], train_views=1)
    train, aug = extract(views, paths=Paths(tmp_path / "home"), options=ExtractOptions(decode="gpu", **OPTIONS))
    assert read_metadata(train.path)["decode"] == "gpu" and "decode" not in read_metadata(aug.path)


def test_the_exported_runtime_is_checked_on_a_gpu_decoded_first_batch(tmp_path, gpu_path_on_cpu):
    root = photo_folder(tmp_path / "photos")
    request = ExtractRequest(root, base=BASE, layers="flatten", splits=["train"])
    options = {**OPTIONS, "runtime": "onnxruntime"}
    (exported,) = extract(request, paths=Paths(tmp_path / "ort"), options=ExtractOptions(decode="gpu", **options))
    (eager,) = extract(request, paths=Paths(tmp_path / "eager"), options=ExtractOptions(decode="gpu", **OPTIONS))
    assert read_metadata(exported.path)["runtime"] == "onnxruntime"  # passed the first-batch check against eager
    X_exported, X_eager = (load_features(r.path, "flatten")[0] for r in (exported, eager))
    assert np.abs(X_exported - X_eager).max() <= 1e-4 * np.abs(X_eager).max()


# --- On a CUDA device (skipped in CI; `sh benchmarks/gpu_check.sh` runs them on a lent GPU) --------------------

cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (nvjpeg)")


@cuda
def test_on_cuda_nvjpeg_decodes_a_batch_as_the_cpu_path_does_within_its_idct(tmp_path):
    import torch

    geometry = geometry_of(load_base("resnet18", weights="none").spec.transforms())
    for seed, size in enumerate([(500, 375), (375, 500), (1600, 1200), (64, 48)]):
        photo(tmp_path / f"{seed}.jpg", size, seed)
    colour = Image.open(tmp_path / "0.jpg")
    colour.convert("L").save(tmp_path / "grey.jpg")
    colour.save(tmp_path / "progressive.jpg", progressive=True, quality=90)
    colour.save(tmp_path / "rgb-not-ycbcr.jpg", keep_rgb=True)  # Adobe transform 0: stored as RGB, read by PIL
    colour.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[Image.open(tmp_path / "3.jpg")])
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 counter-clockwise to view"
    colour.save(tmp_path / "turned.jpg", exif=exif)
    payload = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(payload[: len(payload) // 2])
    files = sorted(tmp_path.glob("*.jpg"))
    items = [read_encoded(f, Decoding(), geometry) for f in files]
    on_cpu, cpu_errors = G.decode_batch(items, [""] * len(items), geometry, "cpu")
    on_gpu, gpu_errors = G.decode_batch(items, [""] * len(items), geometry, torch.device("cuda"))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    assert [bool(e) for e in gpu_errors] == [bool(e) for e in cpu_errors] == [f.name == "truncated.jpg" for f in files]
    for f, gpu, cpu in zip(files, on_gpu.cpu().int(), on_cpu.int(), strict=True):
        difference = (gpu - cpu).abs()
        print(f"{f.name}: nvjpeg vs libjpeg-turbo after the resize, max {int(difference.max())}, "
              f"mean {float(difference.float().mean()):.3f}")  # fmt: skip
        # IDCT and chroma upsampling may differ by a few levels; a wrong turn or channel order by tens
        assert float(difference.float().mean()) < 1.5, f.name


@cuda
def test_on_cuda_an_extraction_with_decode_gpu_is_near_the_full_decode(tmp_path):
    root = photo_folder(tmp_path / "photos")
    request = ExtractRequest(root, base="resnet18", weights="none", layers="layer2,avgpool", splits=["train"])
    options = {"dtype": "float32", "progress": False, "device": "cuda", "amp": "off"}
    (full,) = extract(request, paths=Paths(tmp_path / "full"), options=ExtractOptions(**options))
    (gpu,) = extract(request, paths=Paths(tmp_path / "gpu"), options=ExtractOptions(decode="gpu", **options))
    assert read_metadata(gpu.path)["decode"] == "gpu" and "decode" not in read_metadata(full.path)
    X_full, X_gpu = (load_features(r.path, "avgpool")[0] for r in (full, gpu))
    assert near(X_gpu, X_full)
