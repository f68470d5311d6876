"""Fine-tuning: the rebuilt model reproduces the head, a short run works, and resume is exact."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch

from featurecache import FeaturecacheError
from featurecache import finetune as finetune_module
from featurecache.bases import load_base
from featurecache.config import Paths
from featurecache.extract import ExtractOptions, ExtractRequest, extract
from featurecache.finetune import FinetuneOptions, base_units, choose_units, finetune, holds_trainable_weights
from featurecache.layers import build_extractor, parse_taps, trace_base
from featurecache.leaderboard import leaderboard_rows
from featurecache.report import build_report
from featurecache.train import TrainOptions, train_heads
from tests.helpers import make_image_folder

BASE = "mobilenet_v2_offline"
LAYER = "features.13"  # a 14x14 map: the last block before it (features.13) is what gets unfrozen
QUICK = dict(max_epochs=2, max_batches=2, batch_size=8, progress=False, lr_base=1e-4, lr_head=1e-3)
# A learning rate that moves no float32 weight (a step of ~1e-30 rounds away; weight decay multiplies by 1 - 1e-34):
# the weights of a run stay those of the frozen head, as a rate of 0 did before a rate must be positive.
NO_STEP_LR = 1e-30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class={"train": 8, "val": 4, "test": 4})
    paths = Paths(tmp_path_factory.mktemp("project"))
    extract(
        ExtractRequest(root, base=BASE, layers=LAYER), paths=paths, options=ExtractOptions(workers=0, progress=False)
    )
    train_heads(dataset="shapes", base_tag=BASE, heads=["mlp", "logreg"], options=TrainOptions(progress=False),
                paths=paths)  # fmt: skip
    return paths


def copy_of(paths: Paths, tmp_path) -> Paths:
    shutil.copytree(paths.root, tmp_path / "p")
    return Paths(tmp_path / "p")


@pytest.mark.slow
def test_short_finetune_reproduces_head_then_trains(trained, tmp_path):
    paths = copy_of(trained, tmp_path)
    result = finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "max_epochs": 1}),
                      paths=paths)  # fmt: skip
    s = result.sidecar
    assert s["rebuilt_agreement"] >= 0.98
    assert s["params"]["unfrozen"] == ["features.13"] and len(s["history"]) == 1
    assert 0 <= s["test"]["accuracy"] <= 1 and s["gain_ci95_points"][0] <= s["gain_over_frozen_points"]
    assert (result.model_dir / "model.pt").is_file() and not (result.model_dir / "checkpoint.pt").exists()
    assert any(r["head"] == "finetuned-mlp" for r in leaderboard_rows("shapes", paths))

    build_report(["shapes"], [BASE], paths)
    summary = json.loads((paths.compare_dir("shapes") / "summary.json").read_text())
    assert "finetuned-mlp" not in {p["head"] for p in summary["curves"][BASE]}  # the curves stay frozen
    (row,) = summary["beyond_frozen"]
    assert row["route"] == "fine-tuned" and row["head"] == "finetuned-mlp" and row["layer"] == LAYER
    assert 100 * row["gain"][0] == pytest.approx(s["gain_over_frozen_points"])
    assert row["frozen"]["test_accuracy"] == pytest.approx(s["frozen_test_accuracy"])
    md = (paths.compare_dir("shapes") / "report.md").read_text()
    note = " (= the frozen head: no epoch beat it on val)" if s["best_epoch"] == 0 else ""  # a kept-frozen run says so
    assert f"| fine-tuned | `{LAYER} / finetuned-mlp`{note} |" in md


@pytest.mark.slow
def test_unreadable_images_are_no_answers_fine_tuning_scores_the_images_stage_2_scored(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class={"train": 8, "val": 4, "test": 4})
    for split in ("train", "val", "test"):
        (root / split / "circle" / "zero.png").write_bytes(b"")  # skipped by extract: a row marked invalid
    paths = Paths(tmp_path / "project")
    extract(
        ExtractRequest(root, base=BASE, layers=LAYER), paths=paths, options=ExtractOptions(workers=0, progress=False)
    )
    train_heads(dataset="shapes", base_tag=BASE, heads=["logreg"], options=TrainOptions(progress=False), paths=paths)
    frozen = json.loads((paths.head_dir("shapes", BASE, LAYER, "logreg") / "sidecar.json").read_text())
    options = FinetuneOptions(**{**QUICK, "head": "logreg", "max_epochs": 1, "max_batches": 1})
    result = finetune(dataset="shapes", base_tag=BASE, paths=paths, options=options)
    s = result.sidecar
    for split in ("val", "test"):
        n = frozen[split]["n"]
        assert n == 12 and s[split]["n"] == n and len(s[split]["predictions"]) == n
        assert sum(map(sum, s[split]["confusion_matrix"])) == n
    assert s["gain_over_frozen_points"] == pytest.approx(100 * (s["test"]["accuracy"] - frozen["test"]["accuracy"]))
    assert s["n_train"] == frozen["n_train"] == 24  # train's readable images, counted as stage 2 counts them


@pytest.mark.slow
def test_interrupt_and_resume_gives_the_same_weights(trained, tmp_path):
    straight = copy_of(trained, tmp_path / "a")
    finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**QUICK, patience=99), paths=straight)
    interrupted = copy_of(trained, tmp_path / "b")
    run_epoch = finetune_module.run_epoch
    epochs_started = []

    def interrupted_after_one_epoch(*args, **kwargs):  # Ctrl-C as the second epoch starts
        epochs_started.append(1)
        if len(epochs_started) == 2:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune_module, "run_epoch", interrupted_after_one_epoch)
        with pytest.raises(KeyboardInterrupt):
            finetune(dataset="shapes", base_tag=BASE, paths=interrupted, options=FinetuneOptions(**QUICK, patience=99))
    assert len(epochs_started) == 2
    resumed = finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**QUICK, patience=99),
                       paths=interrupted)  # fmt: skip
    assert resumed.resumed
    a = torch.load(straight.models / "shapes" / BASE / LAYER / "finetuned-mlp" / "model.pt")
    b = torch.load(resumed.model_dir / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
def test_logreg_head_folds_into_a_linear_layer(trained, tmp_path):
    paths = copy_of(trained, tmp_path)
    options = FinetuneOptions(**{**QUICK, "max_epochs": 1, "max_batches": 1}, head="logreg")
    result = finetune(dataset="shapes", base_tag=BASE, paths=paths, options=options)
    assert result.sidecar["rebuilt_agreement"] >= 0.98


@pytest.mark.parametrize(
    "option, message",
    [
        ({"max_epochs": 0}, "--epochs 0: must be at least 1"),
        ({"max_epochs": -1}, "--epochs -1: must be at least 1"),
        ({"patience": 0}, "--patience 0: must be at least 1"),
        ({"patience": -1}, "--patience -1: must be at least 1"),
        ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
        ({"max_batches": 0}, "--max-batches 0: must be at least 1"),  # 0 was read as "no limit"
        ({"unfreeze_last": -1}, "--unfreeze-last -1: must be 0"),
        ({"lr_base": -1.0}, "--lr-base -1.0: a learning rate must be positive"),
        ({"lr_base": 0.0}, "--lr-base 0.0: a learning rate must be positive"),
        ({"lr_head": 0.0}, "--lr-head 0.0: a learning rate must be positive"),
        ({"lr_head": float("nan")}, "--lr-head nan: a learning rate must be positive"),
        ({"lr_head": float("inf")}, "--lr-head inf: a learning rate must be positive"),
        ({"weight_decay": -1e-4}, "weight_decay -0.0001: must be 0 or a positive number"),
        ({"warmup_epochs": -1.0}, "warmup_epochs -1.0: must be 0 or a positive number"),
        ({"workers": -1}, "--workers -1: must be 0"),
        ({"seed": -1}, "--seed -1 is out of range"),
        ({"augment": "heavy"}, "unknown --augment 'heavy'"),
    ],
)
def test_options_no_run_can_use_are_refused_before_anything_is_read(option, message, tmp_path):
    """An empty home: the option is refused by FinetuneOptions.check, not by a missing cache further on."""
    with pytest.raises(FeaturecacheError, match=f"^{re.escape(message)}"):
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**option), paths=Paths(tmp_path))


def test_a_run_of_no_epoch_is_refused_and_saves_nothing(trained, tmp_path):
    """--epochs 0 ran nothing, then saved the frozen head as "fine-tuned" (replacing an earlier model), exit 0."""
    paths = copy_of(trained, tmp_path)
    with pytest.raises(FeaturecacheError, match="--epochs 0: must be at least 1"):
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "max_epochs": 0}), paths=paths)
    assert not (paths.models / "shapes" / BASE / LAYER / "finetuned-mlp").exists()


def test_a_multilayer_head_is_refused_in_one_line(trained, tmp_path):
    """It read the cache's taps under the pseudo-layer 'all-stages' and failed with a KeyError."""
    paths = copy_of(trained, tmp_path)
    train_heads(dataset="shapes", base_tag=BASE, heads=["multilayer"], options=TrainOptions(progress=False),
                paths=paths)  # fmt: skip
    with pytest.raises(FeaturecacheError, match="is a multilayer head .*; fine-tuning takes single-layer heads"):
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**QUICK, head="multilayer"), paths=paths)


def test_no_head_no_finetune(trained, tmp_path):
    with pytest.raises(FeaturecacheError, match="never starts from a random head"):
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(head="rbf_svm"), paths=trained)
    with pytest.raises(FeaturecacheError, match="matches no block; blocks: .*features.13"):
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**QUICK, unfreeze=("layer9",)),
                 paths=copy_of(trained, tmp_path))  # fmt: skip


@pytest.mark.slow
def test_training_sees_the_features_the_head_was_fitted_on(tmp_path):
    """Frozen base, learning rates that move no weight: train-mode accuracy must equal the head's own accuracy on
    train.

    EfficientNet-Lite0's train-mode graph applies stochastic depth to every block; fine-tuning must run the
    base's eval graph, or the head is fed features unlike those it was fitted on.
    """
    root = make_image_folder(tmp_path / "shapes", per_class={"train": 8, "val": 3, "test": 3})
    paths = Paths(tmp_path / "project")
    extract(
        ExtractRequest(root, base="efficientnet_lite0", layers="_blocks.14"),
        paths=paths,
        options=ExtractOptions(workers=0, progress=False, dtype="float32"),
    )
    train_heads(dataset="shapes", base_tag="efficientnet_lite0", heads=["logreg"], options=TrainOptions(progress=False),
                paths=paths)  # fmt: skip
    options = FinetuneOptions(max_epochs=1, batch_size=8, progress=False, unfreeze_last=0, lr_head=NO_STEP_LR,
                              lr_base=NO_STEP_LR, augment="none", head="logreg")  # fmt: skip
    s = finetune(dataset="shapes", base_tag="efficientnet_lite0", options=options, paths=paths).sidecar
    from featurecache import load_features
    from featurecache.persist import load_head

    head, _ = load_head(paths.models / "shapes" / "efficientnet_lite0" / "_blocks.14" / "logreg")
    X, y, _ = load_features(paths.feature_file("shapes", "efficientnet_lite0", "train"), "_blocks.14")
    expected = float((head.predict(X) == y).mean())
    assert s["history"][0]["train_accuracy"] == pytest.approx(expected, abs=1 / len(y) + 1e-9)


def test_a_run_without_gain_says_so(trained, tmp_path, caplog):
    """Learning rates that move no weight: no epoch can beat the frozen head, and the result says so in plain words;
    --patience ends the run after the first epoch, and the log says so (the run used to stop without a word)."""
    from featurecache.leaderboard import write_leaderboard

    options = FinetuneOptions(**{**QUICK, "max_epochs": 3, "patience": 1, "max_batches": 1, "lr_head": NO_STEP_LR,
                                 "lr_base": NO_STEP_LR})  # fmt: skip
    paths = copy_of(trained, tmp_path)
    with caplog.at_level(logging.INFO, logger="featurecache.finetune"):
        result = finetune(dataset="shapes", base_tag=BASE, paths=paths, options=options)
    assert len(result.sidecar["history"]) == 1
    said = "stopped after epoch 1/3 by --patience 1: no val gain in the last 1 epoch; best on val "
    assert re.search(f"{re.escape(said)}[0-9.]+%, the frozen head's: no epoch beat it", caplog.text), caplog.text
    assert not result.improved and result.sidecar["improved_on_val"] is False
    assert result.verdict.startswith("no gain: no epoch") and result.sidecar["best_epoch"] == 0
    assert "more epochs" not in result.verdict  # patience, not the epoch budget, ended it
    assert result.sidecar["verdict"] == result.verdict
    # The saved model is the frozen head rebuilt: the leaderboard says so rather than list it as a fine-tuned result.
    write_leaderboard("shapes", paths)
    board = paths.leaderboard_file("shapes", ".md").read_text()
    assert "| finetuned-mlp (= the frozen head: no epoch beat it on val) |" in board
    # So does the report, where it is the fine-tuned route against the frozen head it started from.
    build_report(["shapes"], [BASE], paths)
    (row,) = json.loads((paths.compare_dir("shapes") / "summary.json").read_text())["beyond_frozen"]
    assert row["head"] == "finetuned-mlp" and row["kept_frozen"] is True
    md = (paths.compare_dir("shapes") / "report.md").read_text()
    assert f"| fine-tuned | `{LAYER} / finetuned-mlp` (= the frozen head: no epoch beat it on val) |" in md


def test_the_advice_of_a_run_without_gain_follows_why_it_ended():
    """Advise "try more epochs" only where the epoch budget ended the run: not after --patience stopped it, and not
    where the frozen head is right on every val image (no epoch can beat it there: fine-tuning cannot be selected)."""
    from featurecache.finetune import TrainState, gain_verdict
    from featurecache.metrics import PairedGain

    gain = PairedGain(0.0, -0.1, 0.1)
    budget = gain_verdict(TrainState(epoch=4, best_val=0.9, stale=2), 0.9, gain)
    assert budget.startswith("no gain: no epoch beat the frozen head's val accuracy (90.0%)")
    assert "try more epochs" in budget
    patience = gain_verdict(TrainState(epoch=3, best_val=0.938, stale=3, stopped_early=True), 0.938, gain)
    assert "before --patience stopped the run after epoch 3" in patience and "try a larger --patience" in patience
    assert "more epochs" not in patience
    for stopped_early in (False, True):
        perfect = gain_verdict(TrainState(epoch=3, best_val=1.0, stale=3, stopped_early=stopped_early), 1.0, gain)
        assert perfect.startswith("no gain: no epoch can beat the frozen head on val, where it is already at 100.0%")
        assert "fine-tuning cannot be selected" in perfect and "try" not in perfect


def test_a_planted_checkpoint_is_refused_and_does_not_run(trained, tmp_path):
    """The checkpoint is loaded with weights_only=True: a pickle that would run code is refused, unexecuted."""
    paths = copy_of(trained, tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = paths.models / "shapes" / BASE / LAYER / "finetuned-mlp" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"config": {}, "state": Payload()}, checkpoint)
    with pytest.raises(FeaturecacheError, match="checkpoint.pt is not a checkpoint featurecache can load safely"):
        finetune(dataset="shapes", base_tag=BASE, paths=paths, options=FinetuneOptions(**QUICK))
    assert not marker.exists()
    assert checkpoint.is_file()  # the user's file is left for them to inspect


def test_default_unit_holds_trainable_weights():
    """EfficientNet-Lite0 ends in _conv_head -> _bn1 (a BatchNorm kept in eval mode): the default unit to unfreeze
    is the last one with conv/linear weights before the tap, _conv_head, not _bn1."""
    loaded = load_base("efficientnet_lite0")
    (tap,) = parse_taps("view", trace_base(loaded.model, loaded.spec.input_size))
    units = base_units(build_extractor(loaded.model, [tap]), loaded.model)
    assert units[-3:] == ["_blocks.15", "_conv_head", "_bn1"]
    assert choose_units(units, loaded.model, FinetuneOptions()) == ["_conv_head"]
    assert choose_units(units, loaded.model, FinetuneOptions(unfreeze_last=2)) == ["_blocks.15", "_conv_head"]
    assert choose_units(units, loaded.model, FinetuneOptions(unfreeze=("_bn1",))) == ["_bn1"]  # asked by name
    assert not holds_trainable_weights(loaded.model.get_submodule("_bn1"))


@pytest.mark.slow
def test_predict_classifies_with_a_finetuned_model(trained, tmp_path):
    """`featurecache predict --head .../finetuned-mlp` runs the whole fine-tuned model: its labels are the ones
    the model itself recorded for the test images; a changed, missing or unrebuildable model is refused truly."""
    from featurecache import read_metadata
    from featurecache.predict import predict_images
    from featurecache.store import read_paths, read_rows

    paths = copy_of(trained, tmp_path)
    result = finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "max_epochs": 1}),
                      paths=paths)  # fmt: skip
    test_file = paths.feature_file("shapes", BASE, "test")
    root = read_metadata(test_file)["dataset_root"]
    images = [f"{root}/{p}" for p, ok in zip(read_paths(test_file), read_rows(test_file)[2], strict=True) if ok]
    rows = predict_images(result.model_dir, images, batch_size=5)
    classes = result.record.class_names
    assert [r["label"] for r in rows] == [classes[i] for i in result.record.test["predictions"]]
    assert all(0 < r["probability"] <= 1 for r in rows)
    assert predict_images(result.model_dir / "model.pt", images[:2]) == rows[:2]

    model = result.model_dir / "model.pt"
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(FeaturecacheError, match="does not match the sha256 in its sidecar; it was modified"):
        predict_images(result.model_dir, images[:1])
    model.unlink()
    with pytest.raises(FeaturecacheError, match=r"model\.pt is missing .*featurecache finetune --dataset shapes"):
        predict_images(result.model_dir, images[:1])
    shutil.rmtree(result.model_dir.parent / "mlp")
    with pytest.raises(FeaturecacheError, match=r"the stage-2 head it started from \(.*/mlp\) is gone"):
        predict_images(result.model_dir, images[:1])


@pytest.mark.slow
def test_the_beyond_frozen_table_covers_every_base_not_only_the_recommended_one(trained, tmp_path):
    """With two bases the recommendation landed on the other base, and this base's fine-tuned model went
    unreported: the routes were looked up under the recommended base alone."""
    import dataclasses

    from featurecache.answer import compute_answer
    from featurecache.report import beyond_frozen

    paths = copy_of(trained, tmp_path)
    finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "max_epochs": 1}), paths=paths)
    answer = compute_answer("shapes", [BASE], paths)
    answer.recommended = dataclasses.replace(answer.recommended, base="another-base")  # as if it won on val
    answer.heads["another-base"] = [answer.recommended]
    (row,) = beyond_frozen(answer, paths)
    assert row.result.base == BASE and row.result.head == "finetuned-mlp" and row.route == "fine-tuned"


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logreg", "linear_svm"])
def test_a_two_class_linear_head_is_rebuilt_and_fine_tuned(tmp_path, head):
    """Two classes: scikit-learn keeps one score (coef_ of one row), and fine-tuning refused every two-class logreg,
    the usual recommendation of compare-layers there; compare-layers --finetune then lost its whole run."""
    root = make_image_folder(tmp_path / "two", per_class={"train": 8, "val": 4, "test": 4})
    for split in ("train", "val", "test"):
        shutil.rmtree(root / split / "stripes")
    paths = Paths(tmp_path / "project")
    extract(ExtractRequest(root, base=BASE, layers=LAYER), paths=paths,
            options=ExtractOptions(workers=0, progress=False))  # fmt: skip
    train_heads(dataset="two", base_tag=BASE, heads=[head], options=TrainOptions(progress=False), paths=paths)
    result = finetune(dataset="two", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "head": head, "max_epochs": 1}),
                      paths=paths)  # fmt: skip
    assert result.sidecar["rebuilt_agreement"] == 1.0  # the rebuilt two-logit layer predicts as the head did


def test_a_mistyped_layer_is_named_with_the_cached_ones_not_sent_to_train_heads(trained):
    """`finetune --layer vew` said "no trained 'mlp' head ... at layer vew; run featurecache train-heads ... first"."""
    with pytest.raises(FeaturecacheError, match=r"unknown --layer 'features.1' for shapes x .*did you mean: .*"
                                                r"Cached layers: features.13"):  # fmt: skip
        finetune(dataset="shapes", base_tag=BASE, options=FinetuneOptions(**{**QUICK, "layer": "features.1"}),
                 paths=trained)  # fmt: skip
