"""Tap selection, pooling and the one-pass extractor on a toy network (no base weights, no images)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featurecache.errors import FeaturecacheError
from featurecache.layers import TapSpec, build_extractor, parse_taps, pool_activation, pooled_dim, trace_base

SIZE = 32


class Toy(nn.Module):
    """stem (8x16x16) -> block (16x8x8) -> mean -> fc (5 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy().eval()
    return model, trace_base(model, SIZE, name="toy")


def test_trace_records_shapes_and_depth(toy):
    _, traced = toy
    nodes = traced.by_name()
    assert nodes["stem"].shape == (8, 16, 16) and nodes["block.1"].shape == (16, 8, 8) and nodes["fc"].shape == (5,)
    depths = [n.relative_depth for n in traced.nodes]
    assert depths == sorted(depths) and depths[-1] == 1.0
    assert nodes["stem"].relative_depth == pytest.approx(1 / 3, abs=1e-4)  # 1 of 3 conv/linear ops (4 decimals)


def test_parse_taps_resolves_modules_pools_and_duplicates(toy):
    _, traced = toy
    taps = parse_taps("block:grid2,stem,stem:max,stem:avg,logits", traced)
    assert [t.key for t in taps] == ["block@grid2", "stem", "stem@max", "fc"]  # stem:avg is stem again
    block, stem, _, logits = taps
    assert block.node == "block.1" and block.out_dim == 16 * 2 * 2 and block.reduction == 4
    assert stem.out_dim == 8 and stem.reduction == 2
    assert logits.pool == "none" and logits.out_dim == 5  # a vector is not pooled
    assert TapSpec.from_attrs(json.loads(json.dumps(block.as_attrs()))) == block  # survives HDF5 attrs / JSON


@pytest.mark.parametrize(
    ("shape", "layout", "channels"),
    [((8, 16, 16), "chw", 8), ((7, 7, 768), "hwc", 768), ((197, 384), "tokens", 384), ((1280,), "vector", 1280)],
)
def test_a_tap_knows_its_channels_in_every_layout(shape, layout, channels):
    tap = TapSpec("k", "k", "k", "avg", shape, layout, channels, 0.5, 1)
    assert tap.channels == channels
    assert tap.as_attrs()["channels"] == channels  # what a cache stores beside the tap's rows


def test_bad_layer_and_pool_name_the_fix(toy):
    _, traced = toy
    with pytest.raises(FeaturecacheError, match=r"'blok' is not a node .*`featurecache list-layers toy`"):
        parse_taps("blok", traced)
    with pytest.raises(FeaturecacheError, match="unknown pooling 'median' in 'stem:median'; choose one of: avg"):
        parse_taps("stem:median", traced)
    with pytest.raises(FeaturecacheError, match="no layers given"):
        parse_taps(" , ", traced)


def test_extractor_pools_every_tap_in_one_pass(toy):
    model, traced = toy
    taps = parse_taps("stem,stem:max,block:grid2", traced)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        out = build_extractor(model, taps)(images)
        stem = model.stem(images)
        block = model.block(stem)
    torch.testing.assert_close(out["stem"], stem.mean(dim=(2, 3)))
    torch.testing.assert_close(out["stem@max"], stem.amax(dim=(2, 3)))
    torch.testing.assert_close(out["block@grid2"], F.adaptive_avg_pool2d(block, 2).flatten(1))
    assert {k: v.shape[1] for k, v in out.items()} == {t.key: t.out_dim for t in taps}


@pytest.mark.parametrize("pool", ["avg", "max", "grid2", "grid3", "raw"])
def test_pooling_layouts_agree(pool):
    chw = torch.randn(2, 6, 9, 9)
    rows = pool_activation(chw, pool, "chw")
    assert rows.shape == (2, pooled_dim((6, 9, 9), "chw", pool))
    if pool != "raw":  # raw keeps the memory order, which differs between layouts by design
        torch.testing.assert_close(pool_activation(chw.permute(0, 2, 3, 1), pool, "hwc"), rows)
    tokens = torch.randn(2, 7, 6)
    if pool in ("avg", "max"):
        assert pool_activation(tokens, pool, "tokens").shape == (2, pooled_dim((7, 6), "tokens", pool))


def test_a_mistyped_base_or_layer_is_answered_with_the_name_it_meant_first():
    from featurecache.bases import get_base_spec, load_base
    from featurecache.layers import resolve_node, trace_base

    for typo, meant in (("efficientnet_lite", "efficientnet_lite0"), ("efficientnetlite0", "efficientnet_lite0")):
        with pytest.raises(FeaturecacheError, match=rf"Did you mean: {meant}, "):
            get_base_spec(typo)
    traced = trace_base(load_base("efficientnet_lite0"))
    for typo, meant in (("_blocks.2.ad", "_blocks.2.add"), ("all-stage", "all-stages")):
        with pytest.raises(FeaturecacheError, match=rf"Close names: {re.escape(meant)}[,.]"):
            resolve_node(traced, typo)
