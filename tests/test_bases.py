"""Base registry and layer selection, parametrized over registries like timm's model tests."""

from __future__ import annotations

import sys

import pytest
import torch

from featurecache import FeaturecacheError
from featurecache.bases import BaseSpec, get_base_spec, list_bases, load_base, register_base
from featurecache.layers import build_extractor, parse_taps, trace_base
from pipelines import list_bases as list_bases_cli

# A spread of torchvision families (plain, residual, dense, inverted-residual, inception, channels-last
# transformer, token transformer); the heavy ones are marked slow.
FAMILIES = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "regnet_y_400mf",
    "squeezenet1_1",
    "mnasnet0_5",
    pytest.param("googlenet", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", marks=pytest.mark.slow),
    pytest.param("swin_t", marks=pytest.mark.slow),
    pytest.param("vit_b_16", marks=pytest.mark.slow),
]


def test_registry_lists_offline_and_torchvision_bases():
    names = list_bases()
    assert names == sorted(names)
    assert {"efficientnet_lite0", "mobilenet_v2_offline", "resnet50", "vgg16", "convnext_tiny"} <= set(names)
    assert list_bases("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert get_base_spec("efficientnet_lite0").family == "offline"


def test_duplicate_registration_is_refused():
    spec = get_base_spec("efficientnet_lite0")
    with pytest.raises(ValueError, match="registered twice"):
        register_base(lambda: BaseSpec(**{**spec.__dict__}))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2_offline", *FAMILIES])
def test_default_taps_resolve_and_match_the_real_forward(name):
    loaded = load_base(name, weights="none")
    traced = trace_base(loaded)
    taps = parse_taps("all-stages", traced)
    assert len(taps) >= 4, [t.node for t in taps]
    depths = [t.relative_depth for t in taps]
    assert depths == sorted(depths)
    assert taps[-1].layout == "vector"  # the pooled penultimate closes the list
    spatial = [t for t in taps if t.layout in ("chw", "hwc")]
    assert [t.reduction for t in spatial] == sorted(t.reduction for t in spatial)
    out = build_extractor(loaded, taps)(torch.randn(2, 3, traced.input_size, traced.input_size))
    for tap in taps:
        assert out[tap.key].shape == (2, tap.out_dim), tap


def test_pooling_variants_have_the_declared_width():
    loaded = load_base("resnet18", weights="none")
    traced = trace_base(loaded)
    taps = parse_taps("layer3:avg,layer3:max,layer3:grid2,layer3:grid3,layer2:raw,fc", traced)
    assert [t.key for t in taps] == ["layer3", "layer3@max", "layer3@grid2", "layer3@grid3", "layer2@raw", "fc"]
    assert [t.out_dim for t in taps] == [256, 256, 1024, 2304, 128 * 28 * 28, 1000]
    x = torch.randn(2, 3, 224, 224)
    out = build_extractor(loaded, taps)(x)
    assert all(out[t.key].shape == (2, t.out_dim) for t in taps)
    layer3 = torch.nn.Sequential(*list(loaded.model.children())[:7])(x)
    torch.testing.assert_close(out["layer3"], layer3.mean(dim=(2, 3)))
    torch.testing.assert_close(out["layer3@grid2"].reshape(2, 256, 2, 2)[..., 0, 0], layer3[..., :7, :7].mean((2, 3)))


def test_missing_torchvision_weights_never_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("featurecache tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FeaturecacheError, match=r"resnet18-f37072fd.pth.*--weights-file PATH.*--weights none"):
        load_base("resnet18")


def test_torchvision_weights_load_from_the_torch_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    saved = load_base("resnet18", weights="none", seed=7).model.state_dict()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(saved, checkpoints / "resnet18-f37072fd.pth")
    loaded = load_base("resnet18")
    assert loaded.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and loaded.tag == "resnet18"
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_weights_file(tmp_path):
    saved = load_base("resnet18", weights="none", seed=3).model.state_dict()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": saved}, path)
    loaded = load_base("resnet18", weights_file=path)
    assert loaded.weights_id.startswith("file:r18.pth:sha256=")
    torch.testing.assert_close(loaded.model.conv1.weight, saved["conv1.weight"])
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    with pytest.raises(FeaturecacheError, match="does not fit base 'mobilenet_v2'"):
        load_base("mobilenet_v2", weights_file=path)
    with pytest.raises(FeaturecacheError, match="does not exist"):
        load_base("resnet18", weights_file=tmp_path / "missing.pth")
    with pytest.raises(FeaturecacheError, match="has no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_base("resnet18", weights="IMAGENET9K")


def test_random_init_is_seeded():
    a = load_base("efficientnet_lite0", weights="none", seed=1).model.state_dict()
    b = load_base("efficientnet_lite0", weights="none", seed=1).model.state_dict()
    c = load_base("efficientnet_lite0", weights="none", seed=2).model.state_dict()
    key = "_conv_stem.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_without_timm_the_family_is_absent_and_names_the_extra(monkeypatch, capsys):
    list_bases()  # the family may already be registered: it must still disappear
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm looks like to import
    assert list_bases() and not any(n.startswith("timm:") for n in list_bases())
    list_bases_cli.main(list_bases_cli.get_args_parser().parse_args([]))
    assert "# timm" not in capsys.readouterr().out
    for name in ("timm:resnet18", "timm:anything"):
        with pytest.raises(FeaturecacheError, match=r"pip install 'featurecache\[timm\]'"):
            get_base_spec(name)


def test_the_older_call_shape_with_a_bare_model_still_traces_and_extracts():
    # Branches written before trace_base/build_extractor took the LoadedBase still pass (model, input_size, ...).
    loaded = load_base("resnet18", weights="none")
    old, new = trace_base(loaded.model, 224, name="resnet18"), trace_base(loaded)
    assert old.by_name() == new.by_name() and old.default_taps == new.default_taps and old.logits_node == "fc"
    taps = parse_taps("layer2,fc", old)
    x = torch.randn(2, 3, 64, 64)
    for key, value in build_extractor(loaded.model, taps)(x).items():
        torch.testing.assert_close(value, build_extractor(loaded, taps)(x)[key])


def test_the_logits_node_is_the_bases_own_knowledge():
    # `--layers logits` resolves to this node, and extraction marks its tap imagenet_logits (store.is_imagenet_logits).
    assert get_base_spec("efficientnet_lite0").logits_node == "_fc"
    offline = load_base("mobilenet_v2_offline", weights="none")
    assert trace_base(offline).logits_node is None
    with pytest.raises(FeaturecacheError, match="'mobilenet_v2_offline' has no ImageNet classifier"):
        parse_taps("logits", trace_base(offline))
