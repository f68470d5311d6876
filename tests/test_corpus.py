"""The bad-input corpus: every input a user could hand featurecache, and what must happen to it.

Each case builds one bad input (a broken file, a broken folder, a broken environment or a tampered artifact),
runs the CLI in-process, and asserts: the exit status; for a refusal, exactly one ``featurecache: error:`` line
that matches the case's message (and no traceback); no temporaries and no half-written file under a final name;
and nothing written or changed outside ``FEATURECACHE_HOME`` (the raw data included).

Read-only and full filesystems are simulated in-process (an ``OSError`` with ``EROFS`` / ``ENOSPC`` raised at the
first write: tests run as root here, where ``chmod`` does not stop writes); where ``unshare -m`` can mount a
tmpfs, the ``slow`` cases below repeat both on a real read-only mount and a real 16 KiB tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.alpha_icons import make_icon_folder
from featurecache import persist, store
from featurecache.data import load_image
from featurecache.fileio import file_sha256
from pipelines.cli import run
from tests.helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]
BASE_TAG = "efficientnet_lite0-random"
LAYER = "_blocks.2.add"
OTHER_LAYER = "_blocks.4.add"
FAST = ["--weights", "none", "--dtype", "float32", "--workers", "0", "--batch-size", "16", "--no-progress"]
SMALL = {"train": 2, "val": 1, "test": 1}  # 3 classes x (2, 1, 1) images


# ------------------------------------------------------------------------------------------- the world


@dataclass
class World:
    """One case's folders: the project home, the raw dataset, and the whole tree that must stay untouched."""

    tmp: Path
    home: Path
    data: Path
    template: Path  # a home with caches of ``template_data`` and a trained logreg head (train-heads cases)
    template_data: Path
    bad_name: str = ""  # the bad file a case dropped into train/circle

    @property
    def features(self) -> Path:
        return self.home / "data" / "features"

    def cache(self, split: str, dataset: str = "data") -> Path:
        return self.features / dataset / BASE_TAG / f"{split}.h5"

    def head_dir(self) -> Path:
        return self.home / "models" / "shapes" / BASE_TAG / LAYER / "logreg"

    def use_template(self) -> None:
        shutil.rmtree(self.home)
        shutil.copytree(self.template, self.home)


def snapshot(root: Path, *, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file and link below ``root`` except ``skip``: relative name -> (size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def temporaries(home: Path) -> list[str]:
    """Files that only a half-finished write leaves: ``.<name>.tmp-<pid>`` (caches, heads, JSON)."""
    return [str(p) for p in home.rglob(".*.tmp-*")]


# ------------------------------------------------------------------------------------------- bad files


def write_png(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 40)) -> None:
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def truncated_jpeg(folder: Path) -> str:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "t.jpg")
    data = (folder / "t.jpg").read_bytes()
    (folder / "t.jpg").write_bytes(data[: len(data) // 2])
    return "t.jpg"


def zero_byte(folder: Path) -> str:
    (folder / "empty.jpg").write_bytes(b"")
    return "empty.jpg"


def text_as_jpeg(folder: Path) -> str:
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n")
    return "notes.jpg"


def gif_named_png(folder: Path) -> str:
    Image.new("P", (30, 30), 3).save(folder / "really-a-gif.png", format="GIF")
    return "really-a-gif.png"


def decompression_bomb(folder: Path) -> str:
    """A PNG whose header claims 100000 x 100000 pixels (10 Gpx): PIL refuses it before allocating anything."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return "huge.png"


def cmyk_jpeg(folder: Path) -> str:
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    return "cmyk.jpg"


def sixteen_bit_png(folder: Path) -> str:
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(folder / "scan16.png")  # 50% grey in 16 bits
    return "scan16.png"


def float_tiff(folder: Path) -> str:
    Image.fromarray(np.full((40, 40), 128 / 255, dtype=np.float32), "F").save(folder / "float01.tif")  # 0..1 floats
    return "float01.tif"


def signed_tiff(folder: Path) -> str:
    Image.fromarray(np.linspace(-500, 500, 1600).reshape(40, 40).astype(np.int32), "I").save(folder / "signed.tif")
    return "signed.tif"


def thin_strip(folder: Path) -> str:
    Image.new("RGB", (12000, 1)).save(folder / "strip.png")  # ~100 bytes that a resize turns into 786 MP
    return "strip.png"


def one_pixel(folder: Path) -> str:
    write_png(folder / "dot.png", size=(1, 1))
    return "dot.png"


def animated_gif(folder: Path) -> str:
    frames = [Image.new("P", (30, 30), i) for i in (1, 2, 3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return "anim.gif"


def dangling_symlink(folder: Path) -> str:
    os.symlink(folder / "gone.png", folder / "link.png")
    return "link.png"


def non_utf8_name(folder: Path) -> str:
    name = os.fsdecode(b"caf\xe9-latin1.png")  # Latin-1 bytes: not valid UTF-8, arrive as surrogates
    write_png(folder / name)
    return name


def decodes_to_mid_grey(path: Path) -> None:
    pixels = np.asarray(load_image(path))
    assert np.all(pixels == 128), np.unique(pixels)  # PIL's clipping convert would have made it 255 (white)


@dataclass(frozen=True)
class BadFile:
    """An unusual file dropped into ``train/circle``: skipped (with a reason) or decoded."""

    make: Callable[[Path], str]
    skipped: str | None  # regex of the recorded reason, or None when the file must decode
    also: Callable[[Path], None] | None = None  # more assertions on the file


BAD_FILES = {
    "truncated": BadFile(truncated_jpeg, "truncated"),
    "zero-byte": BadFile(zero_byte, "cannot identify image file"),
    "text-as-jpg": BadFile(text_as_jpeg, "cannot identify image file"),
    "gif-named-png": BadFile(gif_named_png, None),
    "huge": BadFile(decompression_bomb, "DecompressionBombError"),
    "cmyk": BadFile(cmyk_jpeg, None),
    "16-bit": BadFile(sixteen_bit_png, None, also=decodes_to_mid_grey),
    "thin-strip": BadFile(thin_strip, r"12000x1 pixels, an aspect ratio over 1000:1"),
    "float-tiff": BadFile(float_tiff, None, also=decodes_to_mid_grey),  # PIL's convert made it black
    "signed-tiff": BadFile(signed_tiff, r"32-bit integer image with values -500\.\.500"),
    "1x1": BadFile(one_pixel, None),
    "animated-gif": BadFile(animated_gif, None),
    "dangling-symlink": BadFile(dangling_symlink, "FileNotFoundError"),
    "non-utf8-name": BadFile(non_utf8_name, None),
}


# ------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Outcome:
    out: str  # stdout
    warnings: list[str]  # logged warnings


@dataclass(frozen=True)
class Case:
    """Build the bad input (returns the CLI arguments), then expect ``code`` and, for 2, a matching line."""

    build: Callable[[World, pytest.MonkeyPatch], list[str]]
    code: int
    error: str = ""  # regex for the one error line
    check: Callable[[World, Outcome], None] | None = None  # more assertions
    finals_absent: tuple[str, ...] = ()  # final names (relative to home) that must not exist afterwards


def bad_file_case(name: str) -> Case:
    bad = BAD_FILES[name]

    def build(w: World, mp: pytest.MonkeyPatch) -> list[str]:
        make_image_folder(w.data, per_class=SMALL)
        w.bad_name = bad.make(w.data / "train" / "circle")
        return ["extract", str(w.data), "--layers", LAYER, "--splits", "train", *FAST]

    def check(w: World, outcome: Outcome) -> None:
        rel = f"train/circle/{w.bad_name}"
        skipped = {path: reason for _, path, reason in store.read_skipped(w.cache("train"))}
        if bad.skipped is None:
            assert rel not in skipped, skipped.get(rel)
        else:
            assert re.search(bad.skipped, skipped[rel]), skipped[rel]
        assert rel in store.read_paths(w.cache("train"))  # listed in the cache either way, under its own name
        assert (w.data / rel).is_symlink() or (w.data / rel).is_file()
        if bad.also is not None:
            bad.also(w.data / rel)

    return Case(build, 0, check=check)


def failing_bad_file(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    truncated_jpeg(w.data / "train" / "circle")
    return ["extract", str(w.data), "--layers", LAYER, "--splits", "train", "--on-bad-image", "fail", *FAST]


def icons(background: str | None) -> Callable[[World, pytest.MonkeyPatch], list[str]]:
    def build(w: World, mp: pytest.MonkeyPatch) -> list[str]:
        make_icon_folder(w.data, glyph_colour="black", per_class={"train": 3, "val": 1, "test": 1})
        alpha = ["--alpha", background] if background else []
        return ["extract", str(w.data), "--layers", LAYER, "--splits", "train", *alpha, *FAST]

    return build


def collapsed_icons_warn(w: World, outcome: Outcome) -> None:
    valid, groups = store.identical_row_groups(w.cache("train"))
    assert (valid, len(groups), len(groups[0])) == (15, 1, 15)  # 15 black glyphs on black: one image
    assert store.read_metadata(w.cache("train"))["alpha"] == "black"
    warning = next(m for m in outcome.warnings if "have exactly the same features" in m)
    assert "14 of 15 images" in warning and "train/circle/000.png" in warning and "--alpha black" in warning


def default_icons_stay_distinct(w: World, outcome: Outcome) -> None:
    valid, groups = store.identical_row_groups(w.cache("train"))
    assert (valid, groups) == (15, [])
    assert store.read_metadata(w.cache("train"))["alpha"] == "mean"
    assert not [m for m in outcome.warnings if "have exactly the same features" in m]


def folder(build_tree: Callable[[Path], None]) -> Callable[[World, pytest.MonkeyPatch], list[str]]:
    def build(w: World, mp: pytest.MonkeyPatch) -> list[str]:
        build_tree(w.data)
        return ["extract", str(w.data), "--layers", LAYER, *FAST]

    return build


def empty_class(root: Path) -> None:
    make_image_folder(root, per_class=SMALL)
    (root / "train" / "triangle").mkdir()


def one_class(root: Path) -> None:
    make_image_folder(root, per_class=SMALL)
    for split in ("train", "val", "test"):
        for extra in ("square", "stripes"):
            shutil.rmtree(root / split / extra)


def no_images(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "notes.txt").write_text("images go here")


def val_unreadable(root: Path) -> None:
    """Every val image replaced by text under an image name: the split has rows but no pixels."""
    make_image_folder(root, per_class=SMALL)
    for path in sorted((root / "val").rglob("*.*")):
        path.unlink()
        path.with_suffix(".jpg").write_text("not a photo\n")


def train_class_unreadable(root: Path) -> None:
    """Every train image of one class replaced by text: train-heads would see one class."""
    make_image_folder(root, per_class=SMALL)
    for path in sorted((root / "train" / "square").iterdir()):
        path.unlink()
        path.with_suffix(".jpg").write_text("not a photo\n")


def workers_negative(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    return ["extract", str(w.data), "--layers", LAYER, *FAST, "--workers", "-1"]


def no_split_named(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    return ["extract", str(w.data), "--layers", LAYER, *FAST, "--splits", ","]


def crafted_dataset_name(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    return ["extract", str(w.data), "--dataset", "../../escaped", "--layers", LAYER, *FAST]


def refuse_writes(mp: pytest.MonkeyPatch, home: Path, code: int) -> None:
    """The filesystem under ``home`` refuses every new folder, as a read-only or full mount does."""
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:
        if (self == home or home in self.parents) and not self.exists():
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    mp.setattr(Path, "mkdir", mkdir)


def read_only_home_extract(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    refuse_writes(mp, w.home, errno.EROFS)
    return ["extract", str(w.data), "--layers", LAYER, *FAST]


def read_only_home_train(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    w.use_template()
    shutil.rmtree(w.home / "models")
    shutil.rmtree(w.home / "reports")
    refuse_writes(mp, w.home, errno.EROFS)
    return ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--no-progress"]


def mistyped_base(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL, splits=False)  # no val/test: a first run would record a split
    return ["extract", str(w.data), "--base", "efficientnet_lite", "--layers", LAYER, *FAST]


def home_below_a_file(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    (w.home / "notes.txt").write_text("a file where FEATURECACHE_HOME wants a folder")
    mp.setenv("FEATURECACHE_HOME", str(w.home / "notes.txt" / "home"))
    return ["extract", str(w.data), "--layers", LAYER, *FAST]


def home_that_cannot_be_made(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)
    mp.setenv("FEATURECACHE_HOME", str(w.home / "gone" / "home"))
    refuse = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:  # as /proc or an unmounted path answers: no such file
        if w.home / "gone" in (self, *self.parents):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self))
        return refuse(self, *args, **kwargs)

    mp.setattr(Path, "mkdir", mkdir)
    return ["extract", str(w.data), "--layers", LAYER, *FAST]


def disk_full_extract(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    make_image_folder(w.data, per_class=SMALL)

    def no_space(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(store.np, "savez", no_space)  # the journal's first committed batch
    return ["extract", str(w.data), "--layers", LAYER, *FAST]


def flip_feature_bytes(cache: Path, layer: str) -> None:
    import h5py

    with h5py.File(cache, "r") as f:
        info = f["features"][layer].id.get_chunk_info(0)
    with open(cache, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def bit_flipped_train(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    w.use_template()
    flip_feature_bytes(w.cache("val", "shapes"), LAYER)
    return ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--layers", LAYER,
            "--overwrite", "--no-progress"]  # fmt: skip


def bit_flipped_verify(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    w.use_template()
    flip_feature_bytes(w.cache("val", "shapes"), LAYER)
    return ["verify", str(w.features / "shapes")]


def verify_reports_each_dataset(w: World, outcome: Outcome) -> None:
    out = outcome.out
    assert f"CORRUPT {w.cache('val', 'shapes')}" in out and f"CORRUPT features/{LAYER}: " in out
    assert f"OK      {w.cache('train', 'shapes')}" in out and f"ok      features/{OTHER_LAYER}" in out


def plant(marker: str) -> None:
    Path(marker).touch()


class Plant:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def swap_head_file(head_dir: Path, name: str, data: bytes) -> None:
    """Replace the head and make its sidecar's sha256 agree, as anyone who can write models/ could."""
    for p in head_dir.glob("head.*"):
        p.unlink()
    (head_dir / name).write_bytes(data)
    sidecar = json.loads((head_dir / persist.SIDECAR_FILE).read_text())
    sidecar["files"] = {name: file_sha256(head_dir / name)}
    (head_dir / persist.SIDECAR_FILE).write_text(json.dumps(sidecar))


def predict_with(w: World) -> list[str]:
    image = next((w.template_data / "test" / "circle").iterdir())
    return ["predict", "--head", str(w.head_dir()), str(image)]


def tampered_head(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    w.use_template()
    data = skops.io.dumps(FunctionTransformer(func=plant, kw_args={"marker": str(w.tmp / "code-ran")}))
    swap_head_file(w.head_dir(), persist.HEAD_FILE, data)
    return predict_with(w)


def planted_pickle(name: str) -> Callable[[World, pytest.MonkeyPatch], list[str]]:
    def build(w: World, mp: pytest.MonkeyPatch) -> list[str]:
        w.use_template()
        swap_head_file(w.head_dir(), name, pickle.dumps(Plant(w.tmp / "code-ran")))
        return predict_with(w)

    return build


def no_code_ran(w: World, outcome: Outcome) -> None:
    assert not (w.tmp / "code-ran").exists()


def crafted_tap_key(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    import h5py

    w.use_template()
    shutil.rmtree(w.home / "models")
    shutil.rmtree(w.home / "reports")
    for split in ("train", "val", "test"):
        with h5py.File(w.cache(split, "shapes"), "r+") as f:
            taps = json.loads(f.attrs["taps"])
            taps["../../../../escaped"] = taps.pop(LAYER)
            f.attrs["taps"] = json.dumps(taps)
    return ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--no-progress"]


def one_readable_class(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    """A train cache made before extract refused a class of unreadable images: one class left among valid rows."""
    import h5py

    w.use_template()
    with h5py.File(w.cache("train", "shapes"), "r+") as f:
        labels, valid = f["labels"][:], f["valid"][:]
        valid[labels != labels[0]] = False
        f["valid"][:] = valid
    return ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--no-progress"]


def taps_differ(w: World, mp: pytest.MonkeyPatch) -> list[str]:
    import h5py

    w.use_template()
    with h5py.File(w.cache("val", "shapes"), "r+") as f:
        del f["features"][OTHER_LAYER]
        taps = json.loads(f.attrs["taps"])
        del taps[OTHER_LAYER]
        f.attrs["taps"] = json.dumps(taps)
    return ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--layers", OTHER_LAYER,
            "--no-progress"]  # fmt: skip


EXTRACT_FINALS = tuple(f"data/features/data/{BASE_TAG}/{s}.h5" for s in ("train", "val", "test"))
HEAD_FINALS = (f"models/shapes/{BASE_TAG}/{LAYER}/logreg/sidecar.json", "reports/shapes/results.csv")

CASES = {
    **{f"file:{name}": bad_file_case(name) for name in BAD_FILES},
    "file:truncated --on-bad-image fail": Case(
        failing_bad_file,
        2,
        r"unreadable image .*train/circle/t\.jpg.*--on-bad-image skip",
        finals_absent=EXTRACT_FINALS,
    ),
    "rgba-icons (default alpha)": Case(icons(None), 0, check=default_icons_stay_distinct),
    "rgba-icons --alpha black (collapse warned)": Case(icons("black"), 0, check=collapsed_icons_warn),
    "empty class": Case(
        folder(empty_class), 2, r"class folder .*train/triangle has no image files", finals_absent=EXTRACT_FINALS
    ),
    "one class": Case(folder(one_class), 2, r"only one class \('circle'\)", finals_absent=EXTRACT_FINALS),
    "no images": Case(folder(no_images), 2, r"no class folders with images in", finals_absent=EXTRACT_FINALS),
    "no readable image in a split": Case(
        folder(val_unreadable),
        2,
        r"none of the 3 images of val could be read \(the first, val/circle/val_000\.jpg: "
        r"UnidentifiedImageError: .*\); make them readable or remove them",
        finals_absent=(f"data/features/data/{BASE_TAG}/val.h5",),
    ),
    "train-heads on one readable class": Case(
        one_readable_class,
        2,
        r"the readable images of .*train\.h5 hold fewer than two classes",
    ),
    "no readable image of a class in train": Case(
        folder(train_class_unreadable),
        2,
        r"no image of class 'square' in train could be read \(the first, "
        r"train/square/train_000\.jpg: UnidentifiedImageError: .*\); make them readable, or remove the class folder",
        finals_absent=(f"data/features/data/{BASE_TAG}/train.h5",),
    ),
    "--workers -1": Case(workers_negative, 2, r"--workers -1: must be 0", finals_absent=EXTRACT_FINALS),
    "--splits ,": Case(
        no_split_named, 2, r"--splits names no split; choose from train, val, test", finals_absent=EXTRACT_FINALS
    ),
    "crafted dataset name": Case(
        crafted_dataset_name, 2, r"dataset name '\.\./\.\./escaped' contains a path separator"
    ),
    "read-only home (extract, simulated EROFS)": Case(
        read_only_home_extract,
        2,
        r"cannot write to .*home/data.* \(read-only file system\); set FEATURECACHE_HOME",
        finals_absent=EXTRACT_FINALS,
    ),
    "read-only home (train-heads, simulated EROFS)": Case(
        read_only_home_train,
        2,
        r"cannot write to .*home/models.* \(read-only file system\); set FEATURECACHE_HOME",
        finals_absent=HEAD_FINALS,
    ),
    "mistyped base": Case(
        mistyped_base,
        2,
        r"unknown base 'efficientnet_lite'\. Did you mean: efficientnet_lite0, ",
        finals_absent=("data/features/data/splits.json",),
    ),
    "home below a file": Case(
        home_below_a_file, 2, r"cannot create .*notes\.txt/home/.*a file stands where a folder of its path should be"
    ),
    "home that cannot be made (simulated ENOENT)": Case(
        home_that_cannot_be_made, 2, r"cannot create .*gone/home.*; set FEATURECACHE_HOME to a folder that exists"
    ),
    "disk full (simulated ENOSPC)": Case(
        disk_full_extract, 2, r"disk full while writing under .*: free space", finals_absent=EXTRACT_FINALS
    ),
    "bit-flipped cache (train-heads)": Case(
        bit_flipped_train,
        2,
        rf"the cache .*shapes/{BASE_TAG}/val\.h5 is corrupt \(checksum mismatch in layer {LAYER}\); delete it and "
        r"re-run extract",
    ),
    "bit-flipped cache (verify)": Case(
        bit_flipped_verify, 2, r"1 corrupt cache\(s\): .*val\.h5; delete them", check=verify_reports_each_dataset
    ),
    "tampered head (foreign function in skops)": Case(
        tampered_head, 2, r"does not trust \(.*tests\.test_corpus\.plant.*--overwrite", check=no_code_ran
    ),
    "planted pickle as head.skops": Case(
        planted_pickle(persist.HEAD_FILE), 2, r"is not a readable skops head", check=no_code_ran
    ),
    "planted pickle as old head.joblib": Case(
        planted_pickle(persist.LEGACY_HEAD_FILE),
        2,
        r"pickled head from an older featurecache.*--overwrite`$",
        check=no_code_ran,
    ),
    "crafted tap key": Case(
        crafted_tap_key,
        2,
        r"layer key in .*'\.\./\.\./\.\./\.\./escaped' contains a path separator",
        finals_absent=HEAD_FINALS,
    ),
    "taps differ between splits": Case(
        taps_differ,
        2,
        rf"layer {re.escape(OTHER_LAYER)} is cached in train, test but not in val .*--layers {re.escape(OTHER_LAYER)} "
        r"--splits val",
    ),
}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A home with two-layer caches of a small dataset and a trained logreg head, made once for the module."""
    root = tmp_path_factory.mktemp("template")
    data = make_image_folder(root / "shapes", per_class=SMALL)
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATURECACHE_HOME", str(home))
        assert run(["extract", str(data), "--layers", f"{LAYER},{OTHER_LAYER}", *FAST]) == 0
        assert run(["train-heads", "--dataset", "shapes", "--bases", BASE_TAG, "--heads", "logreg", "--layers", LAYER,
                    "--no-progress"]) == 0  # fmt: skip
    return home, data


@pytest.fixture
def world(tmp_path: Path, template: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> World:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FEATURECACHE_HOME", str(home))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return World(tmp_path, home, tmp_path / "data", *template)


# ------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: World, monkeypatch: pytest.MonkeyPatch, capsys, caplog) -> None:
    case = CASES[name]
    argv = case.build(world, monkeypatch)
    outside = snapshot(world.tmp, skip=world.home)
    capsys.readouterr()
    code = run(argv)
    out, err = capsys.readouterr()
    outcome = Outcome(out, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"])
    monkeypatch.undo()  # the simulated filesystem faults end with the run

    assert code == case.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("featurecache: error:")]
    if case.code == 2:
        assert len(errors) == 1, err
        assert re.search(case.error, errors[0]), errors[0]
    else:
        assert errors == []
    assert temporaries(world.home) == []
    for final in case.finals_absent:
        assert not (world.home / final).exists(), final
    assert snapshot(world.tmp, skip=world.home) == outside  # nothing outside the project, raw data unchanged
    if case.check is not None:
        case.check(world, outcome)


# ------------------------------------------------------------------------------------------- real mounts


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def run_on_mount(
    home: Path, mount: str, argv: list[str], *, copy_from: Path | None = None
) -> subprocess.CompletedProcess:
    """``featurecache argv`` in a private mount namespace where ``home`` is a fresh tmpfs (``mount`` options)."""
    home.mkdir(exist_ok=True)
    fill = f"cp -a {copy_from}/. {home}/ && " if copy_from else ""
    remount = f"mount -o remount,ro {home} && " if "ro" in mount.split(",") else ""
    size = ",".join(o for o in mount.split(",") if o != "ro")
    script = (
        f"mount -t tmpfs -o {size} tmpfs {home} && {fill}{remount}"
        f"exec {sys.executable} -m pipelines.cli {' '.join(argv)}"
    )
    env = {**os.environ, "FEATURECACHE_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True)


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and unshare -m to mount a tmpfs")


@pytest.mark.slow
@needs_mount
def test_real_read_only_home(tmp_path: Path, template: tuple[Path, Path]) -> None:
    home, data = template
    done = run_on_mount(tmp_path / "home", "size=64m,ro", ["train-heads", "--dataset", "shapes", "--bases", BASE_TAG,
                        "--heads", "logreg", "--layers", OTHER_LAYER, "--no-progress"], copy_from=home)  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("featurecache: error:")]
    assert re.fullmatch(
        rf"featurecache: error: cannot write to {tmp_path}/home/models\S* \(read-only file system\); set "
        r"FEATURECACHE_HOME to a writable folder",
        line,
    ), line
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@needs_mount
def test_a_read_only_home_still_answers_what_it_holds(tmp_path: Path, template: tuple[Path, Path]) -> None:
    home, data = template
    cached = run_on_mount(tmp_path / "home", "size=64m,ro", ["extract", str(data), "--layers", LAYER, *FAST],
                          copy_from=home)  # fmt: skip
    assert cached.returncode == 0, cached.stderr
    assert "Traceback" not in cached.stderr and cached.stdout.count(" cached ") == 3, cached.stdout
    more = run_on_mount(tmp_path / "home2", "size=64m,ro", ["extract", str(data), "--layers", "view", *FAST],
                        copy_from=home)  # fmt: skip
    assert more.returncode == 2 and "(read-only file system); set FEATURECACHE_HOME" in more.stderr, more.stderr


@pytest.mark.slow
@needs_mount
def test_real_full_disk(tmp_path: Path, template: tuple[Path, Path]) -> None:
    _, data = template
    done = run_on_mount(tmp_path / "home", "size=16k", ["extract", str(data), "--dataset", "full", *FAST])
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("featurecache: error:")]
    assert re.search(r"disk full while writing under|no space left writing", line), line
    assert "Traceback" not in done.stderr
