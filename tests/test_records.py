"""The head record and the weight identity: exact round trips of what is on disk, clear refusals of the rest."""

from __future__ import annotations

import copy
import json

import pytest

from featurecache.errors import FeaturecacheError
from featurecache.records import FINETUNED_KIND, HEAD_KIND, HeadRecord, SidecarVersionError
from featurecache.weights import WEIGHTS_DEFAULT, WEIGHTS_NONE, WeightsRef, base_of_tag, is_random_tag, random_tag

# A version-2 sidecar as train-heads wrote it (from a real run, lists shortened), "alpha" written as null.
V2_HEAD = {
    "version": 2,
    "dataset": "digits",
    "base": "efficientnet_lite0",
    "base_tag": "efficientnet_lite0-random",
    "weights": "random-init(seed=0)",
    "feature_dtype": "float32",
    "alpha": None,
    "layer": "_blocks.14.add",
    "tap": {
        "channels": 192,
        "key": "_blocks.14.add",
        "layout": "chw",
        "map_shape": [192, 7, 7],
        "node": "_blocks.14.add",
        "out_dim": 192,
        "pool": "avg",
        "query": "_blocks.14.add",
        "reduction": 32,
        "relative_depth": 0.9,
    },
    "head": "logreg",
    "head_spec": "logreg",
    "train_views": 0,
    "dense": False,
    "class_names": ["0", "1", "2"],
    "features": {
        "train": {
            "file": "/work/fc/data/features/digits/efficientnet_lite0-random/train.h5",
            "fingerprint": "4988ad471768532372089222107199aa:_blocks",
        },
        "val": {
            "file": "/work/fc/data/features/digits/efficientnet_lite0-random/val.h5",
            "fingerprint": "4649b7f253a2099c0edb7781749c2c6d:_blocks",
        },
        "test": {
            "file": "/work/fc/data/features/digits/efficientnet_lite0-random/test.h5",
            "fingerprint": "cf7bf70d94b380bdda154551d3c4016d:_blocks",
        },
    },
    "grid": [{"C": 0.0001}, {"C": 0.001}],
    "sweep": [
        {"params": {"C": 0.0001}, "val_accuracy": 0.6128133704735376, "fit_seconds": 21.0161},
        {"params": {"C": 0.001}, "val_accuracy": 0.8189415041782729, "fit_seconds": 1.3865},
    ],
    "params": {"C": 10.0},
    "refit": "train",
    "seed": 0,
    "selection_val_accuracy": 0.9526462395543176,
    "val": {
        "accuracy": 0.9526462395543176,
        "accuracy_ci95": [0.9254806550649473, 0.9702273521079756],
        "balanced_accuracy": 0.9526855426855427,
        "macro_f1": 0.9524496396288795,
        "confusion_matrix": [[35, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0, 34, 1, 0, 0, 0, 1, 0, 0, 0]],
        "n": 359,
        "predictions": [0, 0, 0, 0],
    },
    "test": {
        "accuracy": 0.9665738161559888,
        "accuracy_ci95": [0.9424909923937228, 0.9807772611537513],
        "balanced_accuracy": 0.9666537966537968,
        "macro_f1": 0.9665603129226312,
        "confusion_matrix": [[36, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 36, 0, 0, 0, 0, 0, 0, 0, 0]],
        "n": 359,
        "predictions": [0, 0, 0, 0],
    },
    "n_train": 1079,
    "streamed": False,
    "timings": {"sweep_seconds": 29.842, "refit_seconds": 0.0, "total_seconds": 30.362},
    "library_versions": {
        "featurecache": "0.1.0",
        "scikit-learn": "1.9.1",
        "torch": "2.14.1+cu130",
        "joblib": "1.6.0",
        "numpy": "2.4.6",
        "python": "3.11.7",
    },
    "files": {"head.skops": "472837296865fd0d68bfeaeced2a19803384b44df11771502d1e89109ee19b1f"},
}

# A version-2 sidecar as finetune wrote it (no alpha, no head_spec; model.pt instead of head.skops).
V2_FINETUNED = {
    "version": 2, "dataset": "shapes", "base": "mobilenet_v2_offline", "base_tag": "mobilenet_v2_offline",
    "weights": "offline:mobilenet_v2", "layer": "features.13", "tap": V2_HEAD["tap"], "head": "finetuned-mlp",
    "dense": True, "class_names": ["circle", "square", "stripes"], "features": V2_HEAD["features"],
    "params": {"unfrozen": ["features.13"], "lr_head": 0.001, "lr_base": 0.0001, "optimizer": "adamw",
               "augment": "light"},
    "started_from": "/p/models/shapes/mobilenet_v2_offline/features.13/mlp", "rebuilt_agreement": 1.0,
    "selection_val_accuracy": 0.75, "best_epoch": 1, "improved_on_val": True, "verdict": "no clear gain on test",
    "history": [{"epoch": 1, "train_accuracy": 0.5, "val_accuracy": 0.75}], "val": V2_HEAD["val"],
    "test": V2_HEAD["test"], "frozen_test_accuracy": 0.5, "gain_over_frozen_points": 8.3,
    "gain_ci95_points": [-8.3, 25.0], "n_train": 24, "files": {"model.pt": "ab" * 32},
    "timings": {"total_seconds": 3.2},
}  # fmt: skip


@pytest.mark.parametrize(("sidecar", "kind"), [(V2_HEAD, HEAD_KIND), (V2_FINETUNED, FINETUNED_KIND)])
def test_a_v2_sidecar_round_trips_exactly(sidecar, kind):
    record = HeadRecord.from_json(copy.deepcopy(sidecar))
    assert record.kind == kind and record.class_names == tuple(sidecar["class_names"])
    assert record.to_json() == sidecar
    assert json.loads(json.dumps(record.to_json())) == sidecar  # plain JSON values only
    assert HeadRecord.from_json(record.to_json()) == record


def test_unknown_keys_are_kept_and_the_weights_parse():
    record = HeadRecord.from_json({**V2_HEAD, "note": {"by": "a newer writer"}})
    assert record.extra == {"note": {"by": "a newer writer"}} and record.to_json()["note"] == {"by": "a newer writer"}
    assert record.weights_ref == WeightsRef.random_init(0) and record.model_file == "head.skops"


@pytest.mark.parametrize("version", [1, 3, None])
def test_another_version_is_one_line_naming_the_retrain_command(version):
    sidecar = {k: v for k, v in V2_HEAD.items() if k != "version"}
    if version is not None:
        sidecar["version"] = version
    with pytest.raises(SidecarVersionError) as info:
        HeadRecord.from_json(sidecar, source="models/x/sidecar.json")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, FeaturecacheError)
    assert (
        "featurecache train-heads --dataset digits --bases efficientnet_lite0-random --layers _blocks.14.add "
        "--heads logreg --overwrite" in message
    )


def test_a_sidecar_missing_fields_is_refused():
    with pytest.raises(FeaturecacheError, match=r"not a featurecache sidecar \(no tap\)"):
        HeadRecord.from_json({k: v for k, v in V2_HEAD.items() if k != "tap"})


@pytest.mark.parametrize(
    ("text", "kind", "is_random"),
    [
        ("random-init(seed=0)", "random", True),
        ("random-init(seed=17)", "random", True),
        ("file:r18.pth:sha256=0123456789ab", "file", False),
        ("file:my:weights.pt:sha256=00ff00ff00ff", "file", False),  # a colon in the file name
        ("torchvision:ResNet18_Weights.IMAGENET1K_V1", "pretrained", False),
        ("timm:timm/regnetx_002.pycls_in1k:0123456789ab/model.safetensors", "pretrained", False),
        ("none", "pretrained", False),  # the raw-pixel baseline
    ],
)
def test_weights_ref_round_trips_every_form(text, kind, is_random):
    ref = WeightsRef.parse(text)
    assert str(ref) == text and ref.kind == kind and ref.is_random == is_random and ref.is_file == (kind == "file")


def test_weights_ref_parts_and_load_arguments(tmp_path):
    random = WeightsRef.parse("random-init(seed=3)")
    assert random.seed == 3 and random.base_tag("resnet18") == "resnet18-random" == random_tag("resnet18")
    assert random.load_kwargs(base="resnet18", base_tag="resnet18-random") == {"weights": WEIGHTS_NONE, "seed": 3}

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    from_file = WeightsRef.from_file(weights)
    assert WeightsRef.parse(str(from_file)) == from_file and len(from_file.file_sha256) == 12
    assert from_file.name == "w.pt" and from_file.base_tag("resnet18", "v2") == "resnet18"
    assert from_file.load_kwargs(base="resnet18", base_tag="resnet18", weights_file=weights) == {
        "weights_file": weights
    }
    with pytest.raises(FeaturecacheError, match="pass the same --weights-file"):
        from_file.load_kwargs(base="resnet18", base_tag="resnet18")

    named = WeightsRef.parse("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert named.load_kwargs(base="resnet18", base_tag="resnet18") == {"weights": WEIGHTS_DEFAULT}
    assert named.load_kwargs(base="resnet18", base_tag="resnet18-IMAGENET1K_V2") == {"weights": "IMAGENET1K_V2"}
    assert named.base_tag("resnet18", "IMAGENET1K_V2") == "resnet18-IMAGENET1K_V2" and named.base_tag("a") == "a"


def test_base_tags_of_the_random_control():
    assert is_random_tag("efficientnet_lite0-random") and not is_random_tag("efficientnet_lite0")
    assert base_of_tag("efficientnet_lite0-random") == "efficientnet_lite0" == base_of_tag("efficientnet_lite0")
    assert base_of_tag("timm:regnetx_002-random") == "timm:regnetx_002"


def test_retrain_commands_quote_names_and_send_the_pixel_baseline_to_the_comparison():
    from featurecache.records import retrain_command

    head = {"dataset": "my shapes", "base_tag": "b", "layer": "l", "head": "logreg", "head_spec": "logreg"}
    assert retrain_command(head).startswith("featurecache train-heads --dataset 'my shapes' --bases b ")
    assert retrain_command({**head, "base_tag": "raw-pixels"}).startswith("featurecache compare-layers 'my shapes=")


def test_retrain_commands_ask_for_each_plain_head_once_and_keep_the_others_own():
    from featurecache.records import retrain_commands

    def head(layer, spec, **extra):
        return {"kind": "head", "dataset": "d", "base_tag": "b", "layer": layer, "head": spec, "head_spec": spec,
                **extra}  # fmt: skip

    commands = retrain_commands([
        head("l1", "knn"), head("l2", "knn"), head("l1", "logreg"),
        head("l1", "mlp", train_views=2, head="mlp+aug"),  # augmented: a command of its own
        head("all-stages", "multilayer", taps=["l1", "l2"]),  # multi-tap: its own command
        {"dataset": "d"},  # unreadable: the generic command
    ])  # fmt: skip
    assert commands[:2] == [
        "featurecache train-heads --dataset d --bases b --layers l1,l2 --heads knn,logreg --overwrite",
        "featurecache train-heads --dataset d --bases b --layers l1 --heads mlp --augmented --overwrite",
    ]
    multi = "featurecache train-heads --dataset d --bases b --layers all-stages --heads multilayer --overwrite"
    assert multi in commands
    assert any("..." in c for c in commands) and len(commands) == 4
