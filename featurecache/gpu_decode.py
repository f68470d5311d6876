"""``--decode gpu``: JPEGs decoded by nvjpeg on the GPU that runs the base, and resized there by torch.

On a GPU the base is rarely what limits stage 1: a CPU decoding and resizing every JPEG with PIL is. With
``--decode gpu`` the decode workers only read a JPEG's bytes and its header (its EXIF orientation); the batch's
JPEGs are decoded together by ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvjpeg), turned upright, and
resized and cropped by torchvision's tensor ``resize``/``center_crop`` on the device, so uint8 pixels never cross
the bus at full size. Files that are not RGB or grey JPEGs (PNG, CMYK JPEG, HEIC ...) are decoded by PIL in the
workers as always (:func:`featurecache.data.load_image`: alpha, orientation) and resized on the device by the same
tensor ops.

The numbers change, so the choice enters the cache fingerprint (``decode: gpu`` and :data:`DEVICE_DECODE_RULE`):
torch's antialiased resize is not PIL's bit for bit (measured on the 2-core VM over 600 random JPEGs, 16 px to
2200 px a side: at most 1-2 of 255 apart, on up to a quarter of the pixels), and nvjpeg's IDCT need not be
libjpeg's. Only a geometry that is a fixed ``Resize`` (and ``CenterCrop``) runs this way
(:func:`device_geometry_for`); augmentations crop at random and are decoded on the CPU in full.

Every step but nvjpeg runs on any device: on the CPU, ``decode_jpeg`` is libjpeg-turbo (the same pixels as PIL's
decoder, 0 of 60 random JPEGs differing), which is how the tests run this path and how ``predict`` decodes for a
head whose cache was made this way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featurecache.errors import FeaturecacheError

# Part of a gpu-decoded cache's fingerprint: a change to what this module does to the pixels must bump it, so that
# caches made under the old rule are re-extracted rather than reused.
DEVICE_DECODE_RULE = 1
NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg decodes to RGB as PIL does; CMYK goes through PIL
_TORCH_SOURCE = re.compile(r"^\w+, \S+:\d+, ")  # the prefix torchvision puts before a decoder's message


def check_device(device: str) -> None:
    """Refuse ``--decode gpu`` on a device without nvjpeg (one line, naming the fix)."""
    if not device.startswith("cuda"):
        raise FeaturecacheError(
            f"--decode gpu decodes JPEGs with nvjpeg on a CUDA device, and this run is on {device!r}; leave --decode "
            f"out (full) or use --decode draft on the CPU"
        )


@dataclass(frozen=True)
class DeviceGeometry:
    """A base's fixed resize (and center crop) as tensor ops on any device: ``(C, H, W) uint8 -> uint8``."""

    size: tuple[int, ...]  # torchvision's Resize size: (shorter side,) or (height, width)
    interpolation: Any  # torchvision InterpolationMode
    max_size: int | None
    crop: tuple[int, int] | None  # (height, width) of the center crop; None: no crop (size is then (h, w))

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms.v2 import functional as F

        image = F.resize(image, list(self.size), interpolation=self.interpolation, max_size=self.max_size,
                         antialias=True)  # fmt: skip
        return F.center_crop(image, list(self.crop)) if self.crop else image

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or (self.size[0], self.size[1])


def device_geometry_for(preprocessing: Any, decode: str) -> DeviceGeometry | None:
    """The one decision of what runs on the device under ``--decode`` (or what a cache records): the base's
    geometry when ``decode`` is ``"gpu"`` and that geometry is a fixed-size Resize (+ CenterCrop) of every image to
    one shape; None otherwise (decoded on the CPU as the base's own transforms do)."""
    if decode != "gpu" or not preprocessing.split:
        return None
    from torchvision import transforms as T

    from featurecache.preprocess import _PresetGeometry

    geometry = preprocessing.per_image.geometry
    if isinstance(geometry, _PresetGeometry):
        preset = geometry.preset
        resize = T.Resize(preset.resize_size, interpolation=preset.interpolation, antialias=preset.antialias)
        steps = [resize, T.CenterCrop(preset.crop_size)]
    else:
        steps = list(getattr(geometry, "transforms", None) or [])
    if not steps or type(steps[0]) is not T.Resize or steps[0].antialias is False:
        return None
    if len(steps) > 2 or (len(steps) == 2 and type(steps[1]) is not T.CenterCrop):
        return None
    resize = steps[0]
    size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
    crop = _pair(steps[1].size) if len(steps) == 2 else None
    if crop is None and len(size) != 2:
        return None  # the shorter side alone: images of one batch would differ in shape
    return DeviceGeometry(size=size, interpolation=resize.interpolation, max_size=resize.max_size, crop=crop)


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


@dataclass(frozen=True)
class Encoded:
    """One image as a decode worker hands it over under ``--decode gpu``: a JPEG's bytes and the turn that makes it
    upright, or (any other file) its RGB pixels decoded by PIL at full size, already upright.

    Plain bytes and numpy, not tensors: a DataLoader worker shares each tensor it sends through a file descriptor of
    its own, and a batch of separate images (8 workers x 4 batches ahead x 256 images) would pass the usual limit of
    1024 open files; pickled, they travel through the worker's pipe."""

    jpeg: bytes | None = None  # the file's bytes
    turn: Any = None  # PIL Image.Transpose from the EXIF orientation tag, applied after decoding; None: as stored
    pixels: Any = None  # (3, H, W) uint8 numpy array


def read_encoded(path: str | os.PathLike, decoding: Any) -> Encoded:
    """What a decode worker does under ``--decode gpu``: read the header, keep an RGB or grey JPEG's bytes; decode
    anything else as every stage does. Raises :func:`featurecache.data.bad_image_errors` for unreadable files (a
    JPEG whose payload is broken is found when it is decoded: :func:`decode_batch`)."""
    import numpy as np

    from featurecache.data import _is_jpeg, _open, _upright_turn, load_image

    with open(path, "rb") as f:
        image = _open(f, path)  # the header only; PIL refuses decompression bombs here
        if _is_jpeg(image) and image.mode in NVJPEG_MODES:
            turn = _upright_turn(image) if decoding.orientation == "exif" else None
            f.seek(0)
            return Encoded(jpeg=f.read(), turn=turn)
    return Encoded(pixels=np.ascontiguousarray(np.asarray(load_image(path, decoding)).transpose(2, 0, 1)))


def decode_batch(
    items: Sequence[Encoded | None], errors: Sequence[str], geometry: DeviceGeometry, device: Any
) -> tuple[Any, list[str]]:
    """``(uint8 (B, 3, h, w) on device, errors)`` for a batch from :func:`read_encoded` (None where the worker
    found the file unreadable, with its reason in ``errors``). The JPEGs are decoded in one call; a JPEG that fails
    to decode is found alone and reported like any unreadable file (zeros in its place)."""
    import torch

    from featurecache.data import bad_image_reason

    errors = list(errors)
    height, width = geometry.output_size
    out = torch.zeros(len(items), 3, height, width, dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(items) if item is not None and not errors[i] and item.jpeg is not None]
    decoded = dict(zip(jpegs, _decode_jpegs([items[i].jpeg for i in jpegs], device), strict=True))
    for i, item in enumerate(items):
        if item is None or errors[i]:
            continue
        pixels = decoded[i] if i in decoded else torch.from_numpy(item.pixels).to(device, non_blocking=True)
        if isinstance(pixels, Exception):
            errors[i] = bad_image_reason(pixels)
            continue
        out[i] = geometry(_turned(pixels, item.turn))
    return out, errors


def _decode_jpegs(data: list[Any], device: Any) -> list[Any]:
    """Each JPEG as a (3, H, W) uint8 tensor on ``device``, or the exception that refused it: nvjpeg decodes the
    batch in one call and fails it whole, so a failed batch is retried image by image to name the broken file."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    data = [torch.frombuffer(bytearray(one), dtype=torch.uint8) for one in data]  # a writable copy, as torch wants
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[Any] = []
    for one in data:
        try:
            out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:  # "decode_jpeg, <source file>:<line>, <what>": the what is the user's part
            out.append(OSError(f"cannot decode JPEG: {_TORCH_SOURCE.sub('', str(exc))}"))
    return out


def _turned(pixels: Any, turn: Any) -> Any:
    """``pixels`` (C, H, W) after the PIL ``Image.Transpose`` ``turn``, on whatever device they are."""
    import torch
    from PIL import Image

    if turn is None:
        return pixels
    t = Image.Transpose
    if turn == t.FLIP_LEFT_RIGHT:
        return pixels.flip(-1)
    if turn == t.FLIP_TOP_BOTTOM:
        return pixels.flip(-2)
    if turn == t.TRANSPOSE:
        return pixels.transpose(-2, -1)
    if turn == t.TRANSVERSE:
        return torch.rot90(pixels.transpose(-2, -1), 2, dims=(-2, -1))
    quarter_turns = {t.ROTATE_90: 1, t.ROTATE_180: 2, t.ROTATE_270: 3}[turn]  # PIL turns counter-clockwise
    return torch.rot90(pixels, quarter_turns, dims=(-2, -1))
