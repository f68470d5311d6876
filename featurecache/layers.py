"""Tap selection by node name, pooling, and the one-pass multi-tap extractor.

Taps are FX graph nodes, named as ``torchvision.models.feature_extraction.get_graph_node_names`` names them
(eval mode). A module name (``layer3``, ``_blocks.4``) selects the last node inside that module, as
``create_feature_extractor`` does. Each tap has a pooling that turns its activation into one row per image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any

from featurecache.bases import PENULTIMATE
from featurecache.errors import FeaturecacheError, close_names

if TYPE_CHECKING:
    from featurecache.bases import LoadedBase

log = logging.getLogger(__name__)

# Poolings: global average (default), global max, a k x k adaptive-average grid, raw maps (flattened),
# and "none" for taps that are already vectors (the pooled penultimate).
POOLINGS = ("avg", "max", "grid2", "grid3", "grid4", "raw")
DEFAULT_POOL = "avg"
ALL_STAGES = ("all-stages", "default")
LOGITS = "logits"  # alias for the model's final output node (the ImageNet classifier, where the base has one)


@dataclass(frozen=True)
class NodeInfo:
    """One tappable node of a traced base, as seen for a single image at the base's input size."""

    name: str
    shape: tuple[int, ...]  # without the batch axis: (C, H, W), (H, W, C), (L, D) or (D,)
    relative_depth: float  # fraction of the base's conv/linear ops executed up to and including this node
    layout: str = "chw"  # chw | hwc (channels-last blocks: Swin, ConvNeXt internals) | tokens | vector


def infer_layout(shape: tuple[int, ...]) -> str:
    """Guess the axis order of a per-image activation from its shape (bases use square inputs)."""
    if len(shape) == 1:
        return "vector"
    if len(shape) == 2:
        return "tokens"
    if shape[0] == shape[1] and shape[1] != shape[2]:
        return "hwc"
    return "chw"


def spatial_size(shape: tuple[int, ...], layout: str) -> tuple[int, int] | None:
    if layout == "chw":
        return shape[1], shape[2]
    if layout == "hwc":
        return shape[0], shape[1]
    return None


def channels(shape: tuple[int, ...], layout: str) -> int:
    return int(shape[0] if layout in ("chw", "vector") else shape[-1])


@dataclass(frozen=True)
class TapSpec:
    """A resolved tap: which node, how it is pooled, and what it produces."""

    key: str  # dataset name under /features in the HDF5 file
    query: str  # what the user asked for (node or module name)
    node: str  # the resolved graph node
    pool: str
    map_shape: tuple[int, ...]
    layout: str
    out_dim: int
    relative_depth: float
    reduction: int  # input size / spatial size (1 for vectors)
    # The base's ImageNet classifier output (``--layers logits``, whatever it was called): no stage (see
    # featurecache.store.is_imagenet_logits, which reads it back)
    imagenet_logits: bool = False

    @property
    def channels(self) -> int:
        """Channels of the tapped activation, wherever its layout keeps them (last axis for hwc and tokens)."""
        return channels(self.map_shape, self.layout)

    def as_attrs(self) -> dict[str, Any]:
        """The tap as stored beside its rows in a cache (and in a head's sidecar): its fields plus ``channels``."""
        fields_ = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**fields_, "channels": self.channels}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TapSpec:
        """Rebuild a tap from the attrs stored with a cache or a head's sidecar (extra keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in attrs.items() if k in names}
        values["map_shape"] = tuple(values["map_shape"])
        values.setdefault("layout", infer_layout(values["map_shape"]))  # caches written before layouts were stored
        return cls(**values)


@dataclass
class TracedBase:
    """The tappable nodes of a base with every node's shape: what ``list-layers`` prints."""

    nodes: list[NodeInfo]
    default_taps: list[str]  # resolved node names
    input_size: int
    name: str = "BASE"
    graph: str = "fx"  # fx: nodes of the FX graph | hooks: outputs of named modules (models FX cannot trace)
    # The node whose output is the ImageNet logits (what ``--layers logits`` means); None without a classifier.
    logits_node: str | None = None
    # Node -> the stride the model declares there (BaseSpec.declared_reductions); other taps use size // map size.
    reductions: dict[str, int] = field(default_factory=dict)

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def _as_loaded(
    loaded: LoadedBase | Any, input_size: int | None, default_taps: Sequence[str] | None, name: str | None
) -> LoadedBase:
    """Accept the call shape from before bases owned their tracer settings: a bare torchvision-style model."""
    from featurecache.bases import BaseSpec, LoadedBase

    if isinstance(loaded, LoadedBase):
        return loaded

    def unused(*args: Any) -> Any:
        raise TypeError("a bare model passed to trace_base/build_extractor is only traced")

    spec = BaseSpec(
        name=name or "BASE",
        summary="",
        input_size=input_size or 224,
        build=unused,
        transforms=unused,
        load_weights=unused,
        default_taps=tuple(default_taps) if default_taps is not None else None,
    )
    # FX as before, with no fallback: that call shape predates the hook path.
    return LoadedBase(spec=spec, model=loaded, weights_id="", tag=spec.name, graph="fx")


def _is_weighted_op(node: Any, modules: dict[str, Any]) -> bool:
    import torch
    from torch import nn

    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.Conv2d | nn.Linear | nn.Conv1d)
    if node.op == "call_function":
        return node.target in (torch.conv2d, torch.nn.functional.conv2d, torch.nn.functional.linear)
    return False


def trace_base(
    loaded: LoadedBase,
    input_size: int | None = None,
    default_taps: Sequence[str] | None = None,
    *,
    name: str | None = None,
) -> TracedBase:
    """Every tappable node of a loaded base (eval mode) with its output shape and relative depth.

    Nodes come from the FX graph, traced with the base's own tracer settings; a model FX cannot trace is
    described by the outputs of its named modules instead (forward hooks), and ``loaded.graph`` records which,
    so that ``build_extractor`` taps the same names. ``input_size``, ``default_taps`` and ``name`` only serve
    the older call shape ``trace_base(model, input_size, default_taps, name=...)``.
    """
    loaded = _as_loaded(loaded, input_size, default_taps, name)
    spec = loaded.spec
    loaded.model.eval()
    nodes: list[NodeInfo] = []
    penultimate: str | None = None
    if loaded.graph != "hooks":
        try:
            nodes, penultimate = _trace_fx(loaded)
            loaded.graph = "fx"
        except Exception as exc:  # FX fails in many ways (TraceError, TypeError on proxies, control flow ...)
            if loaded.graph == "fx":
                raise
            log.info(
                "FX cannot trace %s (%s: %s); tapping named modules with forward hooks",
                spec.name,
                type(exc).__name__,
                exc,
            )
            loaded.graph = "hooks"
    if loaded.graph == "hooks":
        nodes, penultimate = _trace_hooks(loaded)

    traced = TracedBase(
        nodes=nodes, default_taps=[], input_size=spec.input_size, name=name or spec.name, graph=loaded.graph
    )
    modules = dict(loaded.model.named_modules())
    queries = spec.taps_from_model(loaded.model) if spec.taps_from_model is not None else spec.default_taps
    if queries is None:
        traced.default_taps = _stage_outputs(nodes, modules, penultimate)
    else:
        resolved = [penultimate if q == PENULTIMATE else resolve_node(traced, q) for q in queries]
        traced.default_taps = list(dict.fromkeys(r for r in resolved if r is not None))
    if spec.declared_reductions is not None:
        declared = spec.declared_reductions(loaded.model).items()
        traced.reductions = {resolve_node(traced, module): stride for module, stride in declared}
    if spec.logits_node is not None:
        traced.logits_node = resolve_node(traced, spec.logits_node)
    elif spec.has_imagenet_classifier and nodes:
        traced.logits_node = nodes[-1].name
    return traced


def _trace_fx(loaded: LoadedBase) -> tuple[list[NodeInfo], str | None]:
    """FX-trace the base with its tracer settings; shapes from one zero batch. Returns nodes and penultimate."""
    import torch
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer(**loaded.spec.tracer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(loaded.model)
    gm = fx.GraphModule(tracer.root, graph, loaded.model.__class__.__name__)
    size = loaded.spec.input_size
    # ShapeProp prints the traceback of a failing node itself; the caller reports the failure in one line.
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(torch.zeros(_TRACE_BATCH, 3, size, size))

    modules = dict(gm.named_modules())
    total_ops = sum(_is_weighted_op(n, modules) for n in gm.graph.nodes) or 1
    ops_so_far = 0
    nodes: list[NodeInfo] = []
    for node in gm.graph.nodes:
        ops_so_far += _is_weighted_op(node, modules)
        meta = node.meta.get("tensor_meta")
        qualname = tracer.node_to_qualname.get(node)
        if qualname is None or node.op in ("placeholder", "output") or not hasattr(meta, "shape"):
            continue
        if _is_per_image(tuple(meta.shape)):
            nodes.append(_node_info(qualname, tuple(meta.shape), ops_so_far / total_ops))
    return nodes, _penultimate_fx(gm, tracer, modules, nodes)


# A batch axis of 2 tells per-image activations apart from parameters and other tensors.
_TRACE_BATCH = 2


def _is_per_image(shape: tuple[int, ...]) -> bool:
    return len(shape) in (2, 3, 4) and shape[0] == _TRACE_BATCH


def _node_info(name: str, batch_shape: tuple[int, ...], depth: float) -> NodeInfo:
    shape = tuple(int(d) for d in batch_shape[1:])
    return NodeInfo(name=name, shape=shape, relative_depth=round(depth, 4), layout=infer_layout(shape))


def _penultimate_fx(gm: Any, tracer: Any, modules: dict[str, Any], nodes: list[NodeInfo]) -> str | None:
    """The classifier's input (through any dropout): the input of the last Linear, else the final node."""
    from torch import nn

    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear)]
    if not linears:
        return nodes[-1].name if nodes else None
    src = linears[-1].args[0]
    while src.op == "call_module" and isinstance(modules.get(src.target), nn.Dropout):
        src = src.args[0]
    return tracer.node_to_qualname.get(src)


def _trace_hooks(loaded: LoadedBase) -> tuple[list[NodeInfo], str | None]:
    """Describe a model FX cannot trace by the output of every named module (in the order they finish)."""
    import torch
    from torch import nn

    model = loaded.model
    weighted = (nn.Conv1d, nn.Conv2d, nn.Linear)
    seen: dict[str, tuple[tuple[int, ...], int]] = {}
    ops = 0

    def record(name: str, module: Any, inputs: Any, output: Any) -> None:
        nonlocal ops
        ops += isinstance(module, weighted)
        if isinstance(output, torch.Tensor) and _is_per_image(tuple(output.shape)):
            seen.pop(name, None)  # a module called twice is tapped at its last call
            seen[name] = (tuple(output.shape), ops)

    handles = [m.register_forward_hook(partial(record, n)) for n, m in model.named_modules() if n]
    size = loaded.spec.input_size
    try:
        with torch.inference_mode():
            model(torch.zeros(_TRACE_BATCH, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    nodes = [_node_info(n, shape, done / (ops or 1)) for n, (shape, done) in seen.items()]
    return nodes, _penultimate_hooks(nodes, dict(model.named_modules()), loaded.spec.logits_node)


def _penultimate_hooks(nodes: list[NodeInfo], modules: dict[str, Any], classifier: str | None) -> str | None:
    """The last vector a module produced before the classifier ran (skipping dropout)."""
    from torch import nn

    names = [n.name for n in nodes]
    if classifier not in names:
        linears = [n for n in names if isinstance(modules.get(n), nn.Linear)]
        if not linears:
            return names[-1] if names else None
        classifier = linears[-1]
    before = nodes[: names.index(classifier)]
    vectors = [n.name for n in before if n.layout == "vector" and not isinstance(modules.get(n.name), nn.Dropout)]
    return vectors[-1] if vectors else None


def _stage_outputs(nodes: list[NodeInfo], modules: dict[str, Any], penultimate: str | None) -> list[str]:
    """Derive default taps: the last block output at each spatial resolution, plus the pooled penultimate.

    That is timm's notion of a stage (one feature per stride). A "block output" is the last node inside a
    container (``layer1``, ``features``) or inside the first non-container module on the way down from the
    root (``layer1.0``, ``features.3``, ``Mixed_5d``); so a branch inside an Inception block, the expand conv of
    a downsampling block or a lone norm layer is never picked. The last resolution is left to the pooled
    penultimate, which is its global average in every torchvision CNN. Token models (ViT) have one
    resolution: there, four evenly spaced blocks of the longest container stand in for stages.
    """
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    last_in_module: dict[str, str] = {}
    for n in nodes:
        parts = n.name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            module = modules.get(prefix)
            if module is None:
                if depth == 1:  # a top-level functional op (``flatten``, ``add``)
                    last_in_module[prefix] = n.name
                break
            if isinstance(module, containers):
                last_in_module[prefix] = n.name
                continue
            if not isinstance(module, norms):
                last_in_module[prefix] = n.name
            break
    block_outputs = set(last_in_module.values())
    maps = [n for n in nodes if n.name in block_outputs and (spatial_size(n.shape, n.layout) or (1, 1))[0] > 1]
    last_at: dict[tuple[int, int], str] = {}
    for n in maps:
        size = spatial_size(n.shape, n.layout)
        last_at.pop(size, None)  # keep insertion order = order of the *last* occurrence
        last_at[size] = n.name
    stages = list(last_at.values())[:-1] if len(last_at) > 1 else list(last_at.values())
    if len(last_at) < 2:
        longest = max(
            (m for m in modules.items() if isinstance(m[1], containers)), key=lambda m: len(m[1]), default=None
        )
        if longest is not None:
            blocks = [f"{longest[0]}.{child}" for child, _ in longest[1].named_children()]
            outputs = [o for b in blocks if (o := _last_node_in(nodes, b)) is not None]
            picks = sorted({round(i * (len(outputs) - 1) / 4) for i in range(1, 5)}) if outputs else []
            stages = [outputs[i] for i in picks]

    known = {n.name for n in nodes}
    if penultimate in known and penultimate not in stages:
        stages.append(penultimate)
    return stages


def _last_node_in(nodes: Sequence[NodeInfo], module_name: str) -> str | None:
    inside = [n.name for n in nodes if n.name == module_name or n.name.startswith(module_name + ".")]
    return inside[-1] if inside else None


def resolve_node(traced: TracedBase, query: str) -> str:
    """Map a node or module name to a node; unknown names raise an error listing valid ones."""
    names = [n.name for n in traced.nodes]
    if query in names:
        return query
    pattern = re.compile(rf"^{re.escape(query)}\.")
    inside = [n for n in names if pattern.match(n)]
    if inside:
        return inside[-1]
    close = close_names(query, [*ALL_STAGES[:1], *names], n=10)
    raise FeaturecacheError(
        f"layer {query!r} is not a node of this base. "
        + (f"Close names: {', '.join(close)}. " if close else "")
        + f"Default taps: {','.join(traced.default_taps)}. Run `featurecache list-layers {traced.name}` for all "
        f"{len(names)} nodes with their shapes."
    )


def tap_key(query: str, pool: str) -> str:
    """HDF5 dataset name of a tap: the name asked for, plus ``@pool`` when not the default pooling."""
    return query if pool in (DEFAULT_POOL, "none") else f"{query}@{pool}"


def parse_taps(text: str | Sequence[str], traced: TracedBase, *, default_pool: str = DEFAULT_POOL) -> list[TapSpec]:
    """Parse ``--layers``: ``all-stages`` or comma-separated ``node[:pool]`` entries.

    Duplicates (the same node with the same pooling) are dropped, keeping the first spelling.
    """
    if default_pool not in POOLINGS:
        raise FeaturecacheError(f"unknown pooling {default_pool!r}; choose one of: {', '.join(POOLINGS)}")
    entries = [e.strip() for e in (text.split(",") if isinstance(text, str) else text) if e.strip()]
    if not entries:
        raise FeaturecacheError("no layers given; pass --layers all-stages or node names (see list-layers)")
    expanded: list[str] = []
    for entry in entries:
        if entry.partition(":")[0] == LOGITS:
            if traced.logits_node is None:
                raise FeaturecacheError(f"base {traced.name!r} has no ImageNet classifier, so no 'logits' layer")
            entry = traced.logits_node + entry[len(LOGITS) :]
        expanded.extend(traced.default_taps if entry in ALL_STAGES else [entry])

    info = traced.by_name()
    taps: list[TapSpec] = []
    seen: set[tuple[str, str]] = set()
    for entry in expanded:
        query, _, pool = entry.partition(":")
        pool = pool or default_pool
        if pool not in POOLINGS:
            raise FeaturecacheError(f"unknown pooling {pool!r} in {entry!r}; choose one of: {', '.join(POOLINGS)}")
        node = resolve_node(traced, query)
        shape, layout = info[node].shape, info[node].layout
        if layout == "vector":
            pool = "none"  # already a vector: nothing to pool
        elif layout == "tokens" and pool.startswith("grid"):
            raise FeaturecacheError(f"layer {query!r} is a token sequence {shape}; grid pooling needs a 2-D map")
        if (node, pool) in seen:
            continue
        seen.add((node, pool))
        taps.append(
            TapSpec(
                key=tap_key(query, pool),
                query=query,
                node=node,
                pool=pool,
                map_shape=shape,
                layout=layout,
                out_dim=pooled_dim(shape, layout, pool),
                relative_depth=info[node].relative_depth,
                reduction=traced.reductions.get(node)
                or traced.input_size // (spatial_size(shape, layout) or (traced.input_size,))[0],
                imagenet_logits=node == traced.logits_node,
            )
        )
    return taps


def pooled_dim(shape: tuple[int, ...], layout: str, pool: str) -> int:
    """Length of the row a tap of this shape and layout produces under ``pool``."""
    if layout == "vector" or pool in ("none", "raw"):
        return int(math.prod(shape))
    if pool.startswith("grid"):
        k = int(pool[4:])
        return channels(shape, layout) * k * k
    return channels(shape, layout)


def pool_activation(x: Any, pool: str, layout: str) -> Any:
    """Pool a batch of activations to (B, D) float32 rows (channels-last maps are put channels-first)."""
    import torch.nn.functional as F

    x = x.float()
    if layout == "vector" or pool in ("none", "raw"):
        return x.reshape(x.shape[0], -1)
    if layout == "tokens":  # (B, L, D)
        return x.mean(dim=1) if pool == "avg" else x.amax(dim=1)
    if layout == "hwc":
        x = x.permute(0, 3, 1, 2)
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    return F.adaptive_avg_pool2d(x, int(pool[4:])).reshape(x.shape[0], -1)


def build_extractor(loaded: LoadedBase, taps: Sequence[TapSpec]) -> Any:
    """One module that runs the base once and returns ``{tap.key: (B, D) float32}`` for every tap.

    On an FX graph, ``create_feature_extractor`` (with the base's tracer settings) prunes the graph after the
    deepest tap, so asking for early layers only also runs only the early part of the base. A base FX cannot
    trace runs whole, with forward hooks on the tapped modules. A bare model (the older call shape) is taken
    as a torchvision-style FX graph.
    """
    from torch import nn
    from torchvision.models.feature_extraction import create_feature_extractor

    loaded = _as_loaded(loaded, None, None, None)
    if loaded.graph is None:
        trace_base(loaded)  # decides fx or hooks, exactly as list-layers does
    nodes = sorted({t.node for t in taps})
    if loaded.graph == "hooks":
        body = _hooked_body(loaded.model, nodes)
    else:
        return_nodes = {n: n for n in nodes}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the train/eval node-set notice: we only ever run in eval mode
            body = create_feature_extractor(
                loaded.model,
                train_return_nodes=return_nodes,
                eval_return_nodes=return_nodes,
                tracer_kwargs=loaded.spec.tracer_kwargs(),
            )
    body.eval()

    class MultiTap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, images: Any) -> dict[str, Any]:
            acts = self.body(images)
            return {t.key: pool_activation(acts[t.node], t.pool, t.layout) for t in taps}

        def train(self, mode: bool = True) -> MultiTap:
            # create_feature_extractor swaps in a separately traced train-mode graph on .train(); for some bases
            # that graph bakes in stochastic depth on every block. Features (and fine-tuning) always use the
            # eval graph; layers that should learn batch statistics are switched to train mode one by one.
            self.training = mode
            self.body.eval()
            return self

    return MultiTap().eval()


def _hooked_body(model: Any, nodes: Sequence[str]) -> Any:
    """For bases FX cannot trace: a module that runs the whole model and returns ``{node: output}`` of the
    tapped modules."""
    from torch import nn

    class HookedBody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Any) -> dict[str, Any]:
            acts: dict[str, Any] = {}

            def keep(name: str, module: Any, inputs: Any, output: Any) -> None:
                acts[name] = output

            # Hooks live for this call only, so a model shared by several extractors never collects for all.
            handles = [self.model.get_submodule(n).register_forward_hook(partial(keep, n)) for n in nodes]
            try:
                self.model(images)
            finally:
                for handle in handles:
                    handle.remove()
            return acts

    return HookedBody()
