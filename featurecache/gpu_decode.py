"""``--decode gpu``: JPEGs decoded by nvjpeg on the GPU that runs the base, and resized there by torch.

On a GPU the base is rarely what limits stage 1: a CPU decoding and resizing every JPEG with PIL is. With
``--decode gpu`` the decode workers only read a JPEG's bytes and its header (its EXIF orientation:
``featurecache.data.read_encoded``); the batch's JPEGs are decoded together by
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvjpeg), turned upright, and resized and cropped on the device
(``featurecache.preprocess.DeviceGeometry``), so uint8 pixels never cross the bus at full size; a thread does that
for the next batch while the base runs this one (:func:`decoded_ahead`). Files that are not
RGB or grey JPEGs (PNG, CMYK JPEG, HEIC ...) are decoded by PIL in the workers as always and resized there by the
same arithmetic. A JPEG nvjpeg refuses is decoded by libjpeg-turbo on the CPU instead (with a warning); one neither
reads is skipped like any unreadable file.

The numbers change, so the choice enters the cache fingerprint (``decode: gpu`` and
``featurecache.preprocess.DEVICE_DECODE_RULE``): torch's antialiased resize is not PIL's bit for bit (on the CPU,
over 600 random JPEGs 16-2200 px a side: 1-2 of 255 apart at most), and nvjpeg's IDCT need not be libjpeg's (not
measured: no GPU has been lent to this project; ``sh benchmarks/gpu_check.sh`` measures it where one is).

Every step but nvjpeg runs on any device: on the CPU, ``decode_jpeg`` is libjpeg-turbo (the same pixels as PIL's
decoder, 0 of 60 random JPEGs differing), which is how the tests run this path and how ``predict`` decodes for a
head whose cache was made this way. torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which
is not on this project's package index yet; the calls are in this module alone.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

from featurecache.data import Encoded, bad_image_reason
from featurecache.errors import FeaturecacheError
from featurecache.preprocess import DeviceGeometry

log = logging.getLogger(__name__)

# JPEGs per decode_jpeg call, each chunk resized before the next: nvjpeg holds a call's images in GPU memory at full
# size (256 12 MP photos: ~9 GB), and a call that fails is retried image by image.
DECODE_CHUNK = 64
AHEAD = 2  # batches decoded ahead of the forward pass (decoded_ahead): one in hand, one in the making
_DEVICE_FAILURE_SIGNS = ("out of memory", "CUDA error", "cudaError", "NVJPEG_STATUS_ALLOCATOR_FAILURE")
_TORCH_SOURCE = re.compile(r"^\w+, \S+:\d+, ")  # the prefix torchvision puts before a decoder's message
_warned_fallback: set[str] = set()  # devices whose nvjpeg refusal was warned about (once per process)


def check_device(device: str) -> None:
    """Refuse ``--decode gpu`` in one line, naming the fix, where it cannot run: not on CUDA, or a torchvision
    without nvjpeg (a ROCm or source build), found by decoding a tiny JPEG there once."""
    if not str(device).startswith("cuda"):
        raise FeaturecacheError(
            f"--decode gpu decodes JPEGs with nvjpeg on a CUDA device, and this run is on {device!r}; leave --decode "
            f"out (full) or use --decode draft on the CPU"
        )
    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(probe, "JPEG")
    try:
        _decode_call([probe.getvalue()], device)
    except RuntimeError as exc:
        raise FeaturecacheError(
            f"--decode gpu: torchvision cannot decode JPEGs on {device} ({_message(exc)}); leave --decode out (full)"
        ) from exc


def decoded_ahead(items: Iterable[Any], decode: Callable[[Any], tuple], device: Any) -> Generator[tuple, None, None]:
    """``decode(item)`` of every item, in order, by one thread working up to :data:`AHEAD` batches ahead: under
    ``--decode gpu`` the next batch is decoded (nvjpeg's Huffman stage runs on the CPU) while the base runs this one,
    instead of after it. On CUDA that thread decodes on a stream of its own; each batch is handed over behind an
    event, and recorded on the consumer's stream so that its memory is not reused before the consumer is done."""
    import torch

    from featurecache.decoders import in_order

    cuda = torch.device(device).type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def run(_i: int, item: Any) -> tuple[tuple, Any]:
        if not cuda:
            return decode(item), None
        # A new thread starts on GPU 0, and leaving the stream's context would switch back to it, which creates a
        # CUDA context there: under torchrun every rank would hold memory on GPU 0. This thread works on the device.
        torch.cuda.set_device(side.device)
        with torch.cuda.stream(side):
            batch = decode(item)
            done = torch.cuda.Event()
            done.record(side)
        return batch, done

    ahead = in_order(run, items, threads=1, in_flight=AHEAD, name="featurecache-device-decode")
    try:
        for _item, (batch, done) in ahead:
            if done is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(done)
                batch[0].record_stream(consumer)
            yield batch
    finally:
        ahead.close()  # stops the thread now when the loop stops early, not when the generator is collected


def decode_batch(
    items: Sequence[Encoded | None], errors: Sequence[str], geometry: DeviceGeometry, device: Any
) -> tuple[Any, list[str]]:
    """``(uint8 (B, 3, h, w) on device, errors)`` for a batch from ``featurecache.data.read_encoded`` (None where the
    worker found the file unreadable, with its reason in ``errors``). A JPEG that no decoder reads gets its reason in
    ``errors`` and zeros in its place (its feature rows are zeroed anyway)."""
    import torch

    errors = list(errors)
    out = torch.zeros(len(items), 3, *geometry.output_size, dtype=torch.uint8, device=device)
    jpegs = []
    for i, item in enumerate(items):
        if item is None or errors[i]:
            continue
        if item.jpeg is not None:
            jpegs.append(i)
        else:  # decoded and resized by PIL + the same geometry in the worker
            out[i] = torch.from_numpy(item.pixels).to(device, non_blocking=True)
    # Chunk by chunk, each resized before the next is decoded: only one chunk's full-size images at a time.
    for start in range(0, len(jpegs), DECODE_CHUNK):
        chunk = jpegs[start : start + DECODE_CHUNK]
        for i, pixels in zip(chunk, _decode_jpegs([items[i].jpeg for i in chunk], device), strict=True):
            if isinstance(pixels, Exception):
                errors[i] = bad_image_reason(pixels)
            else:
                out[i] = geometry(_turned(pixels, items[i].turn))
    return out, errors


def _decode_jpegs(data: list[bytes], device: Any) -> list[Any]:
    """Each JPEG of one chunk as a (3, H, W) uint8 tensor on ``device``, or the OSError that says why it cannot be
    read."""
    import torch

    if torch.device(device).type == "cuda":
        # nvjpeg writes on a stream of its own into memory allocated on this (the caller's) stream; torchvision then
        # makes this stream wait for it (an event), but not the other way round: memory this stream freed while its
        # kernels still use it could be written early (pytorch/vision#9606). So this stream's pending work ends first.
        torch.cuda.current_stream(device).synchronize()
    for attempt in (1, 2):
        try:
            return _decode_call(data, device)
        except RuntimeError as exc:
            if not _is_device_failure(exc):
                break  # a file's fault: found below
            if attempt == 2 or torch.device(device).type != "cuda":
                raise  # out of memory, a failing device: not the file's fault, so not a skipped image
            # nvjpeg allocates outside torch's caching allocator: give it what torch holds cached but unused, once.
            torch.cuda.empty_cache()
    return [_decode_one(one, device) for one in data]  # find the file; read it on the CPU if nvjpeg alone refuses


def _decode_call(data: list[bytes], device: Any) -> list[Any]:
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:  # deprecated in 0.29 for TorchCodec: a later torchvision may not have it
        raise FeaturecacheError(
            f"--decode gpu needs torchvision.io.decode_jpeg, which this torchvision lacks ({exc}); install "
            f"torchvision<0.30 or leave --decode out (full)"
        ) from exc

    tensors = [torch.frombuffer(bytearray(one), dtype=torch.uint8) for one in data]  # writable copies, as torch wants
    return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))


def _decode_one(data: bytes, device: Any) -> Any:
    """One JPEG after its batch failed: on ``device``, else by libjpeg-turbo on the CPU (PIL's decoder, moved to the
    device), else the OSError that says why neither reads it."""
    import torch

    try:
        return _decode_call([data], device)[0]
    except RuntimeError as exc:
        if _is_device_failure(exc):
            raise
        refused = _message(exc)
    if torch.device(device).type == "cpu":
        return OSError(f"cannot decode JPEG: {refused}")
    try:
        pixels = _decode_call([data], "cpu")[0]
    except RuntimeError as exc:
        return OSError(f"cannot decode JPEG: {_message(exc)}")
    if str(device) not in _warned_fallback:
        _warned_fallback.add(str(device))
        log.warning("nvjpeg refused a JPEG that libjpeg-turbo reads (%s): such JPEGs are decoded on the CPU", refused)
    return pixels.to(device)


def _is_device_failure(exc: RuntimeError) -> bool:
    """Whether a decoder's RuntimeError is the device's, not the file's: out of memory, a failed kernel. torchvision
    re-raises what its CUDA decoder meets as a plain RuntimeError ("Error while decoding JPEG images: ..."), so the
    message is read as well as the type."""
    import torch

    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                  if isinstance(t, type))  # fmt: skip
    return isinstance(exc, types) or any(sign in str(exc) for sign in _DEVICE_FAILURE_SIGNS)


def _message(exc: BaseException) -> str:
    """A decoder's message without torchvision's ``"decode_jpeg, <source file>:<line>, "`` prefix."""
    return _TORCH_SOURCE.sub("", " ".join(str(exc).split()))


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
