"""A base's preprocessing, split where each half is cheapest: geometry per image, normalization per batch.

A base's own transforms (torchvision ``Compose`` ending in ``ToTensor`` + ``Normalize``, a torchvision weights
preset, timm's eval transform) turn every image into float32 inside the DataLoader worker. On a 2-core CPU that
worker shares the cores with the forward pass, and each float image is 4x the bytes of its pixels on the way to
the main process. :class:`Preprocessing` keeps the geometry (resize, crop, augmentation) in the workers, which hand
over uint8 CHW pixels, and does the float conversion and normalization once per batch on the main side
(:meth:`Preprocessing.normalize`).

The split is exact: the batched step runs the same float32 operations in the same order as ``ToTensor``
(``x.float().div(255)``) and ``Normalize`` (``sub_(mean).div_(std)``), element by element, so the tensors equal
the per-image transform's bit for bit (tests/test_preprocess.py). A transform that does not end that way is not
split: the workers run it whole and its float tensors pass :meth:`Preprocessing.normalize` untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from featurecache.augment import SeededPerRow
from featurecache.errors import FeaturecacheError


class Preprocessing:
    """One base's preprocessing: :attr:`per_image` for the decode workers, :meth:`normalize` for each batch.

    ``repr`` is the wrapped transform's, which the cache fingerprint records: splitting it changes no number, so it
    must not make existing caches stale.
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        split = _split(transform)
        self.split = split is not None
        geometry, self.mean, self.std = split or (transform, None, None)
        self.per_image = PerImage(geometry, to_uint8=self.split)
        self._buffers: dict[int, Any] = {}  # slot -> the CPU output of normalize(reuse=True), kept across batches
        self._constants: dict[Any, tuple[Any, Any, Any]] = {}  # device -> (255, mean, std), float32 tensors

    def leading_resize(self) -> tuple[Any, list[Any]] | None:
        """The torchvision ``Resize`` the geometry starts with and the steps after it (a weights preset: its resize
        and center crop); None where the geometry starts otherwise (augmentations crop at random scales) or the
        transform was not split. What both ``--decode draft`` and ``--decode gpu`` read of a base's geometry."""
        from torchvision import transforms as T

        if not self.split:
            return None
        geometry = self.per_image.geometry
        if isinstance(geometry, _PresetGeometry):
            p = geometry.preset
            resize = T.Resize(p.resize_size, interpolation=p.interpolation, antialias=p.antialias)
            return resize, [T.CenterCrop(p.crop_size)]
        first, *rest = list(getattr(geometry, "transforms", None) or [None])
        return (first, rest) if isinstance(first, T.Resize) else None

    def draft_size(self) -> DraftSize | None:
        """What ``--decode draft`` must keep (:class:`DraftSize`); None where the geometry does not start with a
        fixed-size ``Resize`` (augmentations crop at random scales: they are decoded in full)."""
        leading = self.leading_resize()
        if leading is None:
            return None
        size, max_size = leading[0].size, leading[0].max_size
        if isinstance(size, Sequence) and len(size) == 1:
            size = size[0]
        if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return DraftSize((size[0], size[1]))
        return DraftSize(size) if isinstance(size, int) and max_size is None else None

    def __call__(self, image: Any) -> Any:
        """One image, preprocessed exactly as the wrapped transform does it (float32 CHW)."""
        return self.normalize(self.per_image(image)[None])[0]

    def __repr__(self) -> str:
        return repr(self.transform)

    def normalize(self, images: Any, *, reuse: bool = False, slot: int = 0) -> Any:
        """Float, normalized ``(B, C, H, W)`` images from a batch of :attr:`per_image` outputs.

        uint8 pixels are converted as ``ToTensor`` + ``Normalize`` would; float images (a transform that was not
        split) are returned as they are. On the CPU the work goes image by image, so each stays in the cache;
        ``reuse=True`` writes into a buffer kept from the previous batch (no fresh pages to fault in), for a
        caller that is done with the previous result before it asks for the next; batches in flight at the same
        time use one ``slot`` each.
        """
        import numpy as np
        import torch

        if images.dtype != torch.uint8:
            return images
        device = images.device
        if images.device.type != "cpu":
            scale, mean, std = self._constants_on(device)
            # 255 as a tensor on the device: CUDA divides by a Python scalar as a multiplication by its reciprocal,
            # which is not ToTensor's division on the CPU; by a tensor it divides. (Written for that; no GPU has
            # been lent to check the bits yet, so the equality tests run on the CPU.)
            return images.float().div_(scale).sub_(mean).div_(std)
        out = self._buffers.get(slot) if reuse else None
        if out is None or out.shape != images.shape:
            out = torch.empty(images.shape, dtype=torch.float32)
        # numpy, on this thread alone: torch's elementwise ops wake its intra-op threads for every op, and those
        # spin-wait after each, on the cores the runtime and the decode worker need (measured on 2 cores: receiving
        # and normalizing 640 decoded images took 0.96 s of main-process CPU, 0.14 s this way). The same IEEE
        # float32 operations in the same order, so the same bits.
        _, mean, std = (c.numpy() for c in self._constants_on(torch.device("cpu")))
        for pixels, floats in zip(images.numpy(), out.numpy(), strict=True):
            floats[...] = pixels
            np.divide(floats, np.float32(255), out=floats)
            np.subtract(floats, mean, out=floats)
            np.divide(floats, std, out=floats)
        if reuse:
            self._buffers[slot] = out
        return out

    def _constants_on(self, device: Any) -> tuple[Any, Any, Any]:
        """(255, mean, std) as float32 tensors on ``device``, made once per device: a 0-d 255, and mean and std as
        ``(C, 1, 1)`` in Normalize's own conversion of its floats."""
        import torch

        if device not in self._constants:
            scale = torch.tensor(255.0, dtype=torch.float32, device=device)
            self._constants[device] = (scale, *(torch.as_tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                                for v in (self.mean, self.std)))  # fmt: skip
        return self._constants[device]


class PerImage:
    """The per-image half, run in the decode workers: ``(PIL image, row) -> (C, H, W)`` tensor.

    uint8 pixels after the geometry when the transform was split, else the whole transform's float32 output. A
    per-row (seeded augmentation) geometry gets the row, so view ``v`` of image ``i`` is the same in every run.
    """

    per_row = True  # featurecache.data.ImageFiles passes the row index

    def __init__(self, geometry: Callable, *, to_uint8: bool) -> None:
        self.geometry = geometry
        self.to_uint8 = to_uint8

    def __call__(self, image: Any, row: int = 0) -> Any:
        image = self.geometry(image, row) if getattr(self.geometry, "per_row", False) else self.geometry(image)
        return uint8_chw(image) if self.to_uint8 else image

    def blank(self, size: int) -> Any:
        """The stand-in of an unreadable image (its feature rows are zeroed anyway): zeros of the output dtype."""
        import torch

        return torch.zeros(3, size, size, dtype=torch.uint8 if self.to_uint8 else torch.float32)


def uint8_chw(image: Any) -> Any:
    """A PIL image's 8-bit channels as a contiguous uint8 (C, H, W) tensor: ``ToTensor`` before its ``/ 255``."""
    import numpy as np
    import torch

    array = np.array(image)  # a writable copy: torch refuses to wrap a read-only one silently
    if array.dtype != np.uint8 or array.ndim != 3:
        raise FeaturecacheError(
            f"preprocessing produced a {image.mode!r} image; featurecache decodes every image to RGB first, so a "
            f"transform that changes the mode is not supported"
        )
    # The CHW copy in numpy: torch's would wake its intra-op threads when this runs in a decode thread.
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _split(transform: Any) -> tuple[Callable, Sequence[float], Sequence[float]] | None:
    """``(geometry, mean, std)`` when ``transform`` is geometry on PIL images + ToTensor + Normalize, else None."""
    if isinstance(transform, SeededPerRow):
        inner = _split(transform.transform)
        return None if inner is None else (SeededPerRow(inner[0], transform.seed), inner[1], inner[2])
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):
        return _PresetGeometry(transform), list(transform.mean), list(transform.std)
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    *geometry, to_tensor, normalize = steps
    # ToTensor subclasses (timm's MaybeToTensor) convert a PIL image exactly as ToTensor does.
    if not isinstance(to_tensor, T.ToTensor) or type(normalize) is not T.Normalize:
        return None
    if any(isinstance(step, T.ToTensor | T.Normalize | T.PILToTensor | T.ConvertImageDtype) for step in geometry):
        return None
    return T.Compose(geometry), list(normalize.mean), list(normalize.std)


# Part of a draft cache's fingerprint: a change to what DraftSize or draft_size() asks of libjpeg must bump it,
# so that caches made under the old rule are re-extracted rather than reused.
DRAFT_RULE = 1


def draft_for(preprocessing: Preprocessing, decode: str) -> DraftSize | None:
    """The one decision of what a run decodes JPEGs to keep: ``decode`` is ``--decode`` (or what a cache records);
    None decodes in full (the default; and augmentations, which crop at random scales, whatever is asked)."""
    return preprocessing.draft_size() if decode == "draft" else None


class DraftSize:
    """``(width, height) -> the smallest size to decode a JPEG at`` for a geometry that starts with torchvision's
    ``Resize(size)``: an int resizes the shorter side to ``size``, an ``(h, w)`` pair resizes to exactly that. The
    resize then never upscales what the draft kept, so only its input changes.

    ``--decode draft`` (``featurecache.data.load_image``): libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 of the
    size where both sides stay at least this large. Measured on the 2-core VM (one thread, PIL 13): a 4032x3024
    JPEG (a 12 MP phone photo) 131 -> 15 ms to decode and resize to 341x256, 1600x1200 15 -> 3.5 ms, 500x375
    unchanged (no scale fits); pixels of the resized image differ by 0.5-0.6 of 255 on average, at most 4-5. A plain
    object (not a closure) so that DataLoader worker processes can receive it.
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image_size: tuple[int, int]) -> tuple[int, int]:
        if not isinstance(self.size, int):
            height, width = self.size
            return width, height
        width, height = image_size
        scale = self.size / min(width, height)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def __repr__(self) -> str:
        return f"DraftSize({self.size})"


# Part of a gpu-decoded cache's fingerprint: a change to what DeviceGeometry or featurecache.gpu_decode does to the
# pixels must bump it, so that caches made under the old rule are re-extracted rather than reused.
DEVICE_DECODE_RULE = 1


def device_geometry_for(preprocessing: Preprocessing, decode: str) -> DeviceGeometry | None:
    """The one decision of what ``--decode gpu`` resizes on the device (``decode`` is ``--decode`` or what a cache
    records): the base's geometry when it is a fixed ``Resize`` (+ ``CenterCrop``) of every image to one shape, by
    an interpolation torch computes as PIL does, on every device; None otherwise (decoded on the CPU in full)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    leading = preprocessing.leading_resize() if decode == "gpu" else None
    if leading is None:
        return None
    resize, rest = leading
    # NEAREST is not PIL's nearest (21 of 255 apart), LANCZOS runs on the CPU only, BOX and HAMMING nowhere.
    if resize.interpolation not in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC) or resize.antialias is False:
        return None
    if len(rest) > 1 or (rest and type(rest[0]) is not T.CenterCrop):
        return None
    size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
    crop = tuple(rest[0].size) if rest else None  # CenterCrop keeps its size as (height, width)
    if crop is None and len(size) != 2:
        return None  # the shorter side alone: images of one batch would differ in shape
    return DeviceGeometry(size=size, interpolation=resize.interpolation, max_size=resize.max_size, crop=crop)


@dataclass(frozen=True)
class DeviceGeometry:
    """A base's fixed resize (and center crop) as torch ops on any device: ``(C, H, W) uint8 -> uint8``.

    In float32, rounded back, on every device: torch resizes uint8 natively on the CPU but through float32 on CUDA,
    and the two round differently (measured against PIL: 0.4% vs 9.4% of pixels 1 of 255 apart). One arithmetic
    keeps a cache made on the GPU and ``predict`` on the CPU within float rounding of each other.
    """

    size: tuple[int, ...]  # torchvision's Resize size: (shorter side,) or (height, width)
    interpolation: Any  # torchvision InterpolationMode: bilinear or bicubic
    max_size: int | None
    crop: tuple[int, int] | None  # (height, width) of the center crop; None: no crop (size is then (h, w))

    def __call__(self, image: Any) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        floats = F.resize(image.float(), list(self.size), interpolation=self.interpolation, max_size=self.max_size,
                          antialias=True)  # fmt: skip
        if self.crop:
            floats = F.center_crop(floats, list(self.crop))
        return floats.round_().clamp_(0, 255).to(torch.uint8)  # bicubic overshoots: clamped as PIL clips

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or (self.size[0], self.size[1])


class _PresetGeometry:
    """The resize + center crop of a torchvision weights preset (``ImageClassification``), on PIL images."""

    def __init__(self, preset: Any) -> None:
        self.preset = preset

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms import functional as F

        p = self.preset
        image = F.resize(image, p.resize_size, interpolation=p.interpolation, antialias=p.antialias)
        return F.center_crop(image, p.crop_size)
