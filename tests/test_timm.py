"""timm bases: stage taps from feature_info, weights only from disk, the hook fallback, and timm as an extra."""

from __future__ import annotations

import pytest
import torch

from featurecache import FeaturecacheError
from featurecache.bases import get_base_spec, list_bases, lite0_key_to_timm, load_base
from featurecache.layers import build_extractor, parse_taps, trace_base
from pipelines import list_bases as list_bases_cli
from pipelines import list_layers as list_layers_cli

timm = pytest.importorskip("timm")  # the optional extra; test_bases checks the product without it

# One small model per family the issue names: residual, channels-last ConvNeXt, inverted-residual, RegNet.
FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002"]
SIDE = 96  # features are pooled, so a small input checks the same graph much faster than 224 px


def _features(name: str, **weights) -> tuple[dict[str, torch.Tensor], list, object]:
    loaded = load_base(f"timm:{name}", **weights)
    taps = parse_taps("all-stages", trace_base(loaded))
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return build_extractor(loaded, taps)(x), taps, loaded


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_taps_match_timms_feature_info_and_a_saved_weights_file_gives_the_same_features(name, tmp_path):
    out, taps, loaded = _features(name, weights="none", seed=5)
    model = loaded.model
    stages, pooled = taps[:-1], taps[-1]
    # channels and reduction of every stage tap are the ones timm declares in feature_info
    declared = [(f["num_chs"], f["reduction"]) for f in model.feature_info]
    assert [(t.map_shape[0], t.reduction) for t in stages] == declared
    assert pooled.layout == "vector" and pooled.out_dim == model.num_features
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        maps = model.forward_intermediates(x, intermediates_only=True)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    for tap, feature_map in zip(stages, maps, strict=True):
        torch.testing.assert_close(out[tap.key], feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(out[pooled.key], pre_logits)

    # The file holds seed 5's weights; the reloaded model is initialised with seed 0 before it is read.
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    from_file, _, reloaded = _features(name, weights_file=path)
    assert reloaded.weights_id.startswith(f"file:{name}.pth:sha256=") and reloaded.tag == f"timm:{name}"
    for key, value in out.items():
        assert torch.equal(from_file[key], value), key


def test_preprocessing_and_input_size_come_from_the_pretrained_config():
    spec = get_base_spec("timm:resnet10t")  # trained and evaluated at 176 px, bicubic, crop 0.875
    config = timm.models.get_pretrained_cfg("resnet10t")
    assert spec.input_size == config.input_size[-1] == 176
    steps = {type(t).__name__: t for t in spec.transforms().transforms}
    assert tuple(steps["CenterCrop"].size) == (176, 176)
    torch.testing.assert_close(steps["Normalize"].mean, torch.tensor(config.mean))
    assert get_base_spec("timm:resnet18.tv_in1k").weight_variants == ("tv_in1k",)


def test_hooks_give_the_fx_features_for_module_taps():
    # Forcing the hook path on a model FX can trace: both ways must agree on every module output.
    fx_base = load_base("timm:resnet18", weights="none")
    hooked = load_base("timm:resnet18", weights="none")
    hooked.graph = "hooks"
    layers = "layer2,layer4:grid2,global_pool,fc"
    x = torch.randn(2, 3, SIDE, SIDE)
    outs = []
    for loaded in (fx_base, hooked):
        taps = parse_taps(layers, trace_base(loaded))
        with torch.inference_mode():
            outs.append(build_extractor(loaded, taps)(x))
    assert hooked.graph == "hooks" and fx_base.graph == "fx"
    assert outs[0].keys() == outs[1].keys() == {"layer2", "layer4@grid2", "global_pool", "fc"}
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key])
    assert trace_base(hooked).default_taps == ["act1", "layer1", "layer2", "layer3", "layer4", "global_pool"]
    assert [t.key for t in parse_taps("logits", trace_base(hooked))] == ["fc"]  # timm's pretrained_cfg classifier


@pytest.mark.slow
def test_a_model_fx_cannot_trace_falls_back_to_hooks(capsys):
    list_layers_cli.main(list_layers_cli.get_args_parser().parse_args(["timm:hiera_tiny_224", "--defaults-only"]))
    printed = capsys.readouterr()
    assert "module outputs (FX cannot trace this model)" in printed.out and "Traceback" not in printed.err
    assert "default taps (--layers all-stages): blocks.0,blocks.2,blocks.9,blocks.11,head.pre_logits" in printed.out


def test_list_bases_and_list_layers_show_timm_models(capsys):
    assert {"timm:resnet18", "timm:convnext_atto", "timm:efficientnet_b0", "timm:regnetx_002"} <= set(list_bases())
    assert not any(n.startswith("timm:vit_") for n in list_bases("timm:*"))  # CNN families only
    list_bases_cli.main(list_bases_cli.get_args_parser().parse_args(["timm:regnetx_00*"]))
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("# timm (") and "timm:regnetx_002 " in printed
    list_layers_cli.main(list_layers_cli.get_args_parser().parse_args(["timm:regnetx_002", "--defaults-only"]))
    printed = capsys.readouterr().out
    assert "FX graph nodes" in printed
    assert "default taps (--layers all-stages): stem.bn,s1.b1.act3,s2.b1.act3,s3.b4.act3,s4.b7.act3" in printed


def test_any_timm_model_is_a_base_by_name_and_bad_names_say_what_exists():
    assert get_base_spec("timm:vit_tiny_patch16_224").family == "timm"  # not listed, still reachable
    with pytest.raises(FeaturecacheError, match=r"timm has no model 'resnet19'.*timm:resnet"):
        get_base_spec("timm:resnet19")
    with pytest.raises(FeaturecacheError, match=r"no pretrained tag 'nope'; choose one of: .*a1_in1k"):
        get_base_spec("timm:resnet18.nope")


def _no_download(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("featurecache tried to download")

    for module in (huggingface_hub, huggingface_hub.file_download):
        monkeypatch.setattr(module, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_missing_weights_name_the_cache_path_and_weights_file(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _no_download(monkeypatch)
    with pytest.raises(FeaturecacheError) as caught:
        load_base("timm:resnet18")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path}/hub/models--timm--resnet18.a1_in1k/snapshots/*/model.safetensors" in message
    assert "--weights-file PATH" in message and "never downloads" in message


def test_weights_load_from_the_hugging_face_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    saved = load_base("timm:regnetx_002", weights="none", seed=9).model.state_dict()
    repo = tmp_path / "hub" / "models--timm--regnetx_002.pycls_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in saved.items()}, snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _no_download(monkeypatch)
    loaded = load_base("timm:regnetx_002")
    assert loaded.weights_id == "timm:timm/regnetx_002.pycls_in1k:0123456789ab/model.safetensors"
    assert loaded.tag == "timm:regnetx_002"
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_lite0_offline_weights_load_bit_identically_into_timm():
    default = load_base("efficientnet_lite0")
    mapped = load_base("timm:tf_efficientnet_lite0", weights="lite0-pip")
    assert mapped.tag == "timm:tf_efficientnet_lite0-lite0-pip"
    assert mapped.weights_id == default.weights_id  # the same file, in another layout
    theirs = mapped.model.state_dict()
    for key, value in default.model.state_dict().items():
        assert torch.equal(theirs[lite0_key_to_timm(key)], value), key
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(mapped.model(x), default.model(x))  # same ops in the same order: bit-identical


def test_reduction_is_the_declared_stride_when_the_input_is_not_a_multiple():
    loaded = load_base("timm:efficientnet_b1", weights="none")  # 240 px: the last map is 8x8, the stride 32
    taps = parse_taps("all-stages,blocks.6.0.conv_pwl", trace_base(loaded))
    assert [t.reduction for t in taps] == [2, 4, 8, 16, 32, 1, 240 // 8]  # a node outside feature_info: size // map
    assert taps[4].map_shape[-1] == 8


def test_extract_caches_timm_stage_taps_with_their_channels_and_reduction(tmp_path):
    from featurecache.config import Paths
    from featurecache.extract import ExtractOptions, ExtractRequest, extract
    from featurecache.store import load_features, read_metadata
    from tests.helpers import make_image_folder

    root = make_image_folder(tmp_path / "tiny", per_class={"train": 2, "val": 1, "test": 1})
    paths = Paths(tmp_path / "project")
    options = ExtractOptions(dtype="float32", workers=0, progress=False)
    results = extract(
        ExtractRequest(root, base="timm:regnetx_002", weights="none", splits=("train",)), options=options, paths=paths
    )
    assert results[0].path == paths.features / "tiny" / "timm:regnetx_002-random" / "train.h5"
    taps = read_metadata(results[0].path)["taps"]
    info = load_base("timm:regnetx_002", weights="none").model.feature_info
    stages = [t for t in taps.values() if t["layout"] == "chw"]
    assert [(t["map_shape"][0], t["reduction"]) for t in stages] == [(f["num_chs"], f["reduction"]) for f in info]
    features, labels, _ = load_features(results[0].path, "head.global_pool.flatten")
    assert features.shape == (6, 368) and len(labels) == 6
