"""Fine-tuning: rebuild base (truncated at the chosen tap) + pooling + the trained head, unfreeze the top, train.

The recipe (Chollet; cs231n): the head is trained on frozen features first (stage 2), then the top block(s) of
the base are unfrozen and trained jointly with a small learning rate and augmentation. Never start with a
randomly initialised head: the rebuilt model is checked to reproduce the stage-2 head's predictions before
any training step.

:func:`finetune` runs six phases, one function each: rebuild, verify agreement, choose units, optimizer and
schedule, epochs (resumable from a checkpoint), score and record. This module imports torch when it is
imported; only the ``finetune`` entry point imports it, and only when it runs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from featurecache import persist, store
from featurecache.augment import AUGMENTATIONS, train_transform
from featurecache.bases import LoadedBase, load_base_of
from featurecache.config import Paths, default_paths
from featurecache.data import DEFAULT_DECODE, Decoding, ImageFiles, SplitIndex, discover_splits, images_folder
from featurecache.devices import resolve_device
from featurecache.errors import FeaturecacheError, check_seed, check_workers, close_names
from featurecache.fileio import atomic_write, file_sha256
from featurecache.freshness import current_heads, feature_fingerprint
from featurecache.heads import FINETUNED_PREFIX
from featurecache.layers import TapSpec, build_extractor
from featurecache.metrics import PairedGain, classification_scores, paired_difference
from featurecache.preprocess import Preprocessing, draft_for
from featurecache.progress import progress_bar
from featurecache.records import FINETUNED_KIND, FINETUNED_MODEL_FILE, HeadRecord
from featurecache.selection import candidate_of_record, pick_best
from featurecache.train import cache_files

log = logging.getLogger(__name__)

CHECK_AGREEMENT = 0.98  # rebuilt model vs stage-2 head on val (float16 cache rounding flips a few near-ties)
CHECKPOINT_FILE = "checkpoint.pt"
# Options that change how a run executes but not what it computes: a checkpoint made with other values resumes.
_EXECUTION_ONLY = ("progress", "workers", "device")


@dataclass(frozen=True)
class FinetuneOptions:
    head: str = "mlp"  # which stage-2 head to start from: mlp, or logreg (folded into a linear layer)
    layer: str | None = None  # start from the head at this layer (default: the best on val over all layers)
    unfreeze: tuple[str, ...] = ()  # module-name prefixes of the base to train
    unfreeze_last: int = 1  # or: the last K units with conv/linear weights before the tap (when ``unfreeze`` is empty)
    train_bn: bool = False  # BatchNorm layers stay in eval mode (frozen statistics) unless asked
    lr_head: float = 1e-4
    lr_base: float = 1e-5
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # or sgd (momentum 0.9)
    warmup_epochs: float = 0.5
    max_epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    max_batches: int | None = None  # per epoch; for smoke runs
    augment: str = "light"  # light: crop + small rotation/colour; standard adds flips; none
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    seed: int = 0
    workers: int = 0
    progress: bool = True

    def check(self) -> None:
        """Refuse what no fine-tuning run can do, before any file is read. A run of no epoch (``--epochs 0``,
        ``--patience 0``) would save the frozen head as the fine-tuned model, replacing an earlier one; a learning
        rate of zero or less trains nothing, or away from the head."""
        for flag, value, meaning in (("--epochs", self.max_epochs, "epochs to run"),
                                     ("--patience", self.patience, "epochs without a val gain before stopping"),
                                     ("--batch-size", self.batch_size, "images per step")):  # fmt: skip
            if value < 1:
                raise FeaturecacheError(f"{flag} {value}: must be at least 1 ({meaning})")
        if self.max_batches is not None and self.max_batches < 1:
            raise FeaturecacheError(f"--max-batches {self.max_batches}: must be at least 1 (leave it out: every batch)")
        if self.unfreeze_last < 0:
            raise FeaturecacheError(f"--unfreeze-last {self.unfreeze_last}: must be 0 (train the head only) or more")
        for flag, value, default in (("--lr-head", self.lr_head, FinetuneOptions.lr_head),
                                     ("--lr-base", self.lr_base, FinetuneOptions.lr_base)):  # fmt: skip
            if not (math.isfinite(value) and value > 0):
                raise FeaturecacheError(f"{flag} {value}: a learning rate must be positive (default {default:g})")
        for name, value in (("weight_decay", self.weight_decay), ("warmup_epochs", self.warmup_epochs)):
            if not (math.isfinite(value) and value >= 0):
                raise FeaturecacheError(f"{name} {value}: must be 0 or a positive number")
        if self.augment not in AUGMENTATIONS:
            raise FeaturecacheError(f"unknown --augment {self.augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
        check_workers(self.workers)
        check_seed(self.seed)


@dataclass
class FinetuneResult:
    record: HeadRecord
    model_dir: Path
    resumed: bool
    improved: bool  # some epoch beat the frozen head on val; False: the saved model is the frozen head rebuilt
    verdict: str  # one plain sentence on the gain, also in the sidecar and the log

    @property
    def sidecar(self) -> dict[str, Any]:
        """The record as written to ``sidecar.json``."""
        return self.record.to_json()


class StandardizedHead(nn.Module):
    """A stage-2 head as a torch module on pooled features: ``body((x - mean) / scale)``."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, body: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.scale)


class FinetunedModel(nn.Module):
    """Truncated base (one tap, pooled) followed by the head: images -> logits."""

    def __init__(self, base: nn.Module, head: nn.Module, tap_key: str) -> None:
        super().__init__()
        self.base = base
        self.head = head
        self.tap_key = tap_key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(images)[self.tap_key])


def head_module(estimator: Any, record: HeadRecord) -> StandardizedHead:
    """The stage-2 head as a torch module mapping pooled features to logits (standardization folded in)."""
    if record.dense:
        return StandardizedHead(estimator.mean_, estimator.scale_, copy.deepcopy(estimator.module_))
    pipeline = getattr(estimator, "pipeline_", None)
    clf = pipeline[-1] if pipeline is not None else None
    if clf is None or not hasattr(clf, "coef_") or not hasattr(clf, "intercept_"):
        raise FeaturecacheError(
            f"head {record.head!r} cannot be turned into a linear layer; fine-tune from --head mlp or logreg"
        )
    scaler = pipeline[0]
    coef, intercept = np.asarray(clf.coef_), np.asarray(clf.intercept_)
    if coef.shape[0] == 1:  # two classes: one score for the second. Logits (0, score): the same argmax, and
        # softmax gives the second class sigmoid(score), the logistic head's own probability. Refusing it had
        # refused every two-class dataset's logreg, compare-layers' usual recommendation there.
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    linear = nn.Linear(coef.shape[1], coef.shape[0])
    # Fold StandardScaler into the layer: W' = W / scale, b' = b - W' @ mean.
    w = coef / scaler.scale_[None, :]
    b = intercept - w @ scaler.mean_
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return StandardizedHead(np.zeros(w.shape[1]), np.ones(w.shape[1]), linear)


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: rebuild base + tap + head, and the image loaders of every split
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """The dataset's image files per split (checked against the caches), their labels and transforms."""

    index: dict[str, SplitIndex]
    labels: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]  # the caches' readable rows: every score counts these, as stage 2's heads did
    eval_transform: Any
    input_size: int
    batch_size: int
    seed: int
    workers: int
    decoding: Decoding  # how the caches decoded their images: decode exactly as they did (augmentations in full)

    def loader(self, split: str, transform: Any, *, shuffle: bool, epoch: int = 0) -> DataLoader:
        draft = draft_for(Preprocessing(transform), self.decoding.decode)
        data = ImageFiles(self.index[split], transform, input_size=self.input_size, rows=range(len(self.index[split])),
                          decoding=self.decoding, draft=draft)  # fmt: skip
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.workers)  # fmt: skip

    def valid_labels(self, split: str) -> np.ndarray:
        """The labels of the images of ``split`` the cache could read, in cache order (what predictions score)."""
        return self.labels[split][self.valid[split]]


@dataclass
class Rebuilt:
    """Everything phase 1 loads: the stage-2 head it starts from and the torch model that reproduces it."""

    dataset: str
    base_tag: str
    head_dir: Path
    head_record: HeadRecord
    estimator: Any
    files: dict[str, Path]
    loaded: LoadedBase
    model: FinetunedModel
    splits: Splits
    device: torch.device

    @property
    def layer(self) -> str:
        return self.head_record.layer


def build_model(
    record: HeadRecord, estimator: Any, *, seed: int = 0, weights_file: Any = None
) -> tuple[FinetunedModel, LoadedBase]:
    """Base (cut after the head's tap) + the stage-2 head as one torch model, on the CPU, from the head's record."""
    loaded = load_base_of(record, weights_file=weights_file, seed=seed)
    tap = TapSpec.from_attrs(record.tap)
    return FinetunedModel(build_extractor(loaded, [tap]), head_module(estimator, record), tap.key), loaded


def rebuild(dataset: str, base_tag: str, options: FinetuneOptions, paths: Paths) -> Rebuilt:
    """Load the chosen stage-2 head and rebuild base + tap + head as one torch model on the target device."""
    files = cache_files(dataset, base_tag, paths)
    head_dir = _pick_head(dataset, base_tag, options.head, paths, layer=options.layer)
    metas = {s: store.read_metadata(p) for s, p in files.items()}
    record = persist.require_record(head_dir)
    if record.taps:  # the features of several taps, concatenated: a fine-tuned model runs the base to one tap
        raise FeaturecacheError(
            f"{head_dir} is a multilayer head (taps {', '.join(record.taps)}); fine-tuning takes single-layer heads: "
            f"pass --head mlp or --head logreg (and --layer to pick one of those taps)"
        )
    layer = record.layer
    expect = {s: feature_fingerprint(metas[s], layer) for s in files}
    estimator, head_record = persist.load_head(head_dir, expect_features=expect)
    model, loaded = build_model(head_record, estimator, seed=options.seed)
    device = torch.device(resolve_device(options.device))
    root = images_folder(metas["train"].get("dataset_root"), dataset, paths) or Path(metas["train"]["dataset_root"])
    index = discover_splits(root, record_path=paths.split_record(dataset), seed=None)  # the split of the caches
    _check_dataset_unchanged(root, index, files, head_record.class_names)
    splits = Splits(index=index, labels={s: np.asarray(index[s].labels) for s in index},
                    valid={s: store.read_rows(files[s])[2] for s in index},
                    eval_transform=loaded.spec.transforms(), input_size=loaded.spec.input_size,
                    batch_size=options.batch_size, seed=options.seed, workers=options.workers,
                    decoding=_finetune_decoding(Decoding.recorded(metas["train"])))  # fmt: skip
    return Rebuilt(dataset, base_tag, head_dir, head_record, estimator, files, loaded, model.to(device), splits, device)


def _finetune_decoding(cached: Decoding) -> Decoding:
    """How fine-tuning decodes: as the caches did, except ``--decode gpu``, whose device resize fine-tuning's loaders
    do not run; they decode in full with PIL, and the fine-tuned model records that (predict follows it)."""
    if cached.decode != "gpu":
        return cached
    log.info(
        "the caches' JPEGs were decoded by nvjpeg and resized by torch (--decode gpu); fine-tuning decodes and "
        "resizes with PIL (full), the same images within 1-2 of 255 per pixel, and its model records that"
    )
    return dataclasses.replace(cached, decode=DEFAULT_DECODE)


def load_finetuned(directory: Path, *, weights_file: Any = None) -> tuple[FinetunedModel, HeadRecord, LoadedBase]:
    """A saved fine-tuned model, ready to classify images on the CPU: rebuilt as :func:`rebuild` does (from the
    stage-2 head it started from, which gives the head's architecture), then its ``model.pt`` state dict, checked
    against the sha256 in its sidecar and read with ``weights_only=True`` (no code runs)."""
    record = persist.require_record(directory)
    start = directory.parent / Path(record.started_from or "").name  # a sibling folder: same layer, the head kind
    if not record.started_from or persist.read_sidecar(start) is None:
        raise FeaturecacheError(
            f"{directory} cannot be rebuilt: the stage-2 head it started from ({start}) is gone, and the model's "
            f"architecture comes from it. Retrain that head, then fine-tune again"
        )
    model_path = persist.verified_file(directory, record, FINETUNED_MODEL_FILE)
    estimator, head_record = persist.load_head(start)
    model, loaded = build_model(head_record, estimator, weights_file=weights_file)
    try:
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise FeaturecacheError(
            f"{model_path} does not fit the model rebuilt from {start} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); the head was retrained since. Fine-tune again"
        ) from None
    return model.eval(), record, loaded


def _check_dataset_unchanged(
    root: Path, index: dict[str, SplitIndex], files: dict[str, Path], class_names: tuple[str, ...]
) -> None:
    for split, ix in index.items():
        if ix.paths != tuple(store.read_paths(files[split])):
            raise FeaturecacheError(f"{root} changed since {files[split]} was extracted; re-run extract first")
        if ix.class_names != class_names:
            raise FeaturecacheError(f"class names of {root} differ from the head's; re-run extract and train-heads")


def predict_split(model: nn.Module, splits: Splits, split: str, device: torch.device) -> np.ndarray:
    """Predicted class of every image of ``split`` the cache could read (eval transforms, cache order): an unreadable
    file is no answer, and stage 2 scored its heads without it."""
    model.eval()
    preds = []
    with torch.inference_mode():
        for images, _rows, _errors in splits.loader(split, splits.eval_transform, shuffle=False):
            preds.append(model(images.to(device)).argmax(1).cpu().numpy())
    return np.concatenate(preds)[splits.valid[split]]


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: the rebuilt model must reproduce the stage-2 head before any training step
# ---------------------------------------------------------------------------------------------------------------


def verify_agreement(rebuilt: Rebuilt) -> tuple[float, float]:
    """Agreement of the rebuilt model with the stage-2 head on val, and the frozen model's val accuracy."""
    X_val, _, _ = store.load_features(rebuilt.files["val"], rebuilt.layer)
    head_pred = rebuilt.estimator.predict(X_val.astype(np.float32))
    rebuilt_pred = predict_split(rebuilt.model, rebuilt.splits, "val", rebuilt.device)
    agreement = float((head_pred == rebuilt_pred).mean())
    if agreement < CHECK_AGREEMENT:
        raise FeaturecacheError(
            f"the rebuilt model agrees with the stage-2 head on only {100 * agreement:.1f}% of val images "
            f"(need {100 * CHECK_AGREEMENT:.0f}%); the cache may be stale: re-run extract and train-heads"
        )
    log.info("rebuilt model reproduces the head: %.1f%% agreement on val", 100 * agreement)
    return agreement, float((rebuilt_pred == rebuilt.splits.valid_labels("val")).mean())


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: which units of the base to train
# ---------------------------------------------------------------------------------------------------------------


def base_units(extractor: nn.Module, model: nn.Module) -> list[str]:
    """Parameterised units of the truncated base in execution order: children of the root, with containers
    (``_blocks``, ``features``, ``layer3``) expanded one level, so the 'last K' are the top blocks.

    A unit is seen through its modules (``call_module``) or its parameters (``get_attr``: a conv the tracer
    turned into a functional call, such as EfficientNet-Lite's static-padding ``_conv_head``). Container types
    are read from the original ``model``: the traced graph module rebuilds its intermediate modules as plain
    ``nn.Module`` (the parameters are the same objects)."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    body = extractor.body
    used: list[str] = []
    for node in body.graph.nodes:
        if node.op == "call_module":
            parts = str(node.target).split(".")
        elif node.op == "get_attr":
            parts = str(node.target).split(".")[:-1]  # drop the parameter name
        else:
            continue
        if not parts or not parts[0]:
            continue
        unit = parts[0]
        if isinstance(model.get_submodule(unit), containers) and len(parts) > 1:
            unit = f"{parts[0]}.{parts[1]}"
        if unit not in used:
            used.append(unit)
    return [u for u in used if any(p.numel() for p in body.get_submodule(u).parameters())]


def holds_trainable_weights(module: nn.Module) -> bool:
    """Whether ``module`` contains a convolution or a linear layer: a BatchNorm alone stays in eval mode."""
    return any(isinstance(m, nn.modules.conv._ConvNd | nn.Linear) for m in module.modules())


def choose_units(units: list[str], model: nn.Module, options: FinetuneOptions) -> list[str]:
    """The units to unfreeze: those named by ``--unfreeze`` (prefixes), else the last ``unfreeze_last`` units
    that hold conv/linear weights (the top of the base, skipping a trailing BatchNorm such as Lite0's ``_bn1``)."""
    if options.unfreeze:
        chosen = [u for u in units if any(u == q or u.startswith(q + ".") for q in options.unfreeze)]
        if not chosen:
            raise FeaturecacheError(
                f"--unfreeze {','.join(options.unfreeze)} matches no block; blocks: {', '.join(units)}"
            )
        return chosen
    if options.unfreeze_last <= 0:
        return []
    weighted = [u for u in units if holds_trainable_weights(model.get_submodule(u))]
    return weighted[-options.unfreeze_last :]


def unfreeze(model: FinetunedModel, chosen: list[str]) -> list[nn.Parameter]:
    """Freeze everything, then let the head and the chosen units train; returns the base's trainable params."""
    for p in model.parameters():
        p.requires_grad_(False)
    base_params = [p for u in chosen for p in model.base.body.get_submodule(u).parameters()]
    for p in [*base_params, *model.head.parameters()]:
        p.requires_grad_(True)
    return base_params


# ---------------------------------------------------------------------------------------------------------------
# Phase 4: optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------


def steps_per_epoch(n_train: int, options: FinetuneOptions) -> int:
    steps = math.ceil(n_train / options.batch_size)
    return steps if options.max_batches is None else min(steps, options.max_batches)


def make_optimizer(
    head: nn.Module, base_params: list[nn.Parameter], options: FinetuneOptions, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD with two learning rates (head, base); linear warmup, then cosine to zero."""
    groups = [{"params": list(head.parameters()), "lr": options.lr_head}]
    if base_params:
        groups.append({"params": base_params, "lr": options.lr_base})
    if options.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    elif options.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=options.weight_decay)
    else:
        raise FeaturecacheError(f"unknown --optimizer {options.optimizer!r}; choose adamw or sgd")
    total = steps * options.max_epochs
    warmup = max(1, int(options.warmup_epochs * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ---------------------------------------------------------------------------------------------------------------
# Phase 5: epochs, with a checkpoint after each (loaded with weights_only=True: it holds no code)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress of the epochs; plain types only, so the checkpoint loads with ``weights_only=True``."""

    epoch: int = 0
    best_val: float = 0.0
    best_epoch: int = 0  # 0: no epoch beat the frozen head on val
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False  # --patience ended the run before max_epochs


@dataclass
class Trainer:
    """The objects the epochs update, and the checkpoint that lets a re-run resume them exactly."""

    rebuilt: Rebuilt
    chosen: list[str]
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: dict[str, Any]  # what the run computes; a checkpoint made with another config is discarded
    checkpoint: Path
    options: FinetuneOptions

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.rebuilt.model.state_dict().items()}


def load_checkpoint(trainer: Trainer) -> tuple[TrainState, dict[str, torch.Tensor]] | None:
    """Resume state from ``trainer.checkpoint`` if it was made with the same config; refuse anything but tensors
    and plain Python values (a planted pickle would run code)."""
    path = trainer.checkpoint
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise FeaturecacheError(
            f"{path} is not a checkpoint featurecache can load safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); it was not loaded. Delete it to start fine-tuning afresh"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("config") != trainer.config:
        log.info("discarding %s: made with other settings", path)
        return None
    trainer.rebuilt.model.load_state_dict(ckpt["model"])
    trainer.opt.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    state = TrainState(**ckpt["state"])
    log.info("resuming fine-tuning after epoch %d", state.epoch)
    return state, ckpt["best_weights"]


def save_checkpoint(trainer: Trainer, state: TrainState, best_weights: dict[str, torch.Tensor]) -> None:
    checkpoint = {"config": trainer.config, "model": trainer.rebuilt.model.state_dict(),
                  "optimizer": trainer.opt.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                  "state": dataclasses.asdict(state), "best_weights": best_weights}  # fmt: skip
    atomic_write(trainer.checkpoint, lambda tmp: torch.save(checkpoint, tmp))


def run_epoch(trainer: Trainer, epoch: int, train_tf: Any) -> float:
    """One pass over the train split (or ``max_batches`` of it); returns the train accuracy."""

    model, splits, device = trainer.rebuilt.model, trainer.rebuilt.splits, trainer.rebuilt.device
    options = trainer.options
    # Every epoch's randomness derives from (seed, epoch): a resumed run repeats it exactly.
    torch.manual_seed(options.seed * 1000 + epoch)
    random.seed(options.seed * 1000 + epoch)
    # model.train() leaves the base on its eval graph (see layers.build_extractor): the head sees the features
    # it was fitted on; gradients flow through the eval graph all the same.
    model.train()
    if options.train_bn:
        for unit in trainer.chosen:
            for module in model.base.body.get_submodule(unit).modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
    use_amp = options.amp and device.type == "cuda"
    loss_fn = nn.CrossEntropyLoss()
    steps = steps_per_epoch(len(splits.index["train"]), options)
    bar = progress_bar(total=steps, desc=f"epoch {epoch + 1}/{options.max_epochs}", disable=not options.progress)
    correct = seen = 0
    for step, (images, rows, errors) in enumerate(splits.loader("train", train_tf, shuffle=True, epoch=epoch)):
        if options.max_batches is not None and step >= options.max_batches:
            break
        y = torch.as_tensor(splits.labels["train"][rows.numpy()], device=device)
        keep = torch.as_tensor([not e for e in errors], device=device)
        if not keep.any():  # every image of the batch unreadable: nothing to learn from (a loss of nan); the
            trainer.scheduler.step()  # schedule goes on, so that its steps stay those of the epoch
            bar.update()
            continue
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = model(images.to(device))
            loss = loss_fn(logits[keep].float(), y[keep])
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()
        trainer.scheduler.step()
        correct += int((logits.argmax(1) == y)[keep].sum())
        seen += int(keep.sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", train_acc=f"{correct / max(seen, 1):.3f}")  # augmented batches
        bar.update()
    bar.close()
    return correct / max(seen, 1)


def train_epochs(trainer: Trainer, frozen_val: float) -> tuple[TrainState, dict[str, torch.Tensor], bool]:
    """Epochs until ``max_epochs`` or ``patience`` epochs without a val gain, a checkpoint after each; returns the
    final state, the best weights (the frozen model's when no epoch beat it) and whether it resumed."""
    rebuilt, options = trainer.rebuilt, trainer.options
    resumed = load_checkpoint(trainer)
    state, best_weights = resumed or (TrainState(best_val=frozen_val), trainer.snapshot())
    train_tf = train_transform(rebuilt.splits.eval_transform, rebuilt.splits.input_size, options.augment)
    while state.epoch < options.max_epochs and state.stale < options.patience:
        train_acc = run_epoch(trainer, state.epoch, train_tf)
        val_pred = predict_split(rebuilt.model, rebuilt.splits, "val", rebuilt.device)
        val_acc = float((val_pred == rebuilt.splits.valid_labels("val")).mean())
        state.history.append({"epoch": state.epoch + 1, "train_accuracy": train_acc, "val_accuracy": val_acc})
        _log_epoch(state, options.max_epochs, val_acc, train_acc)
        if val_acc > state.best_val:
            state.best_val, state.best_epoch, state.stale = val_acc, state.epoch + 1, 0
            best_weights = trainer.snapshot()
        else:
            state.stale += 1
        state.epoch += 1
        save_checkpoint(trainer, state, best_weights)
    state.stopped_early = state.epoch < options.max_epochs  # the loop above ends early only on patience
    if state.stopped_early:
        _log_early_stop(state, options)
    return state, best_weights, resumed is not None


def _log_epoch(state: TrainState, max_epochs: int, val_acc: float, train_acc: float) -> None:
    """An epoch's val against what it must beat. Train accuracy is on augmented batches with dropout on, so it runs
    below val and alarms a first reader if shown alone: only val decides."""
    holder = "the frozen head's" if state.best_epoch == 0 else f"epoch {state.best_epoch}'s"
    log.info("epoch %d/%d: val %.1f%% (to beat: %s %.1f%%); train %.1f%% on augmented batches", state.epoch + 1,
             max_epochs, 100 * val_acc, holder, 100 * state.best_val, 100 * train_acc)  # fmt: skip


def _log_early_stop(state: TrainState, options: FinetuneOptions) -> None:
    """Why the run ended before ``max_epochs``: the epoch lines alone read as if it had stopped by itself."""
    best = f"{100 * state.best_val:.1f}%, " + ("the frozen head's: no epoch beat it" if state.best_epoch == 0
                                                else f"epoch {state.best_epoch}'s")  # fmt: skip
    epochs = f"{state.stale} epoch{'s' * (state.stale != 1)}"
    log.info("stopped after epoch %d/%d by --patience %d: no val gain in the last %s; best on val %s",
             state.epoch, options.max_epochs, options.patience, epochs, best)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Phase 6: best weights, test once, record
# ---------------------------------------------------------------------------------------------------------------


def gain_verdict(state: TrainState, frozen_val: float, gain: PairedGain) -> str:
    """One plain sentence: did fine-tuning help? (``gain``: over the frozen head on test, judged as every gain is)"""
    if state.best_epoch == 0:
        return _no_gain_verdict(state, frozen_val)
    interval = f"{100 * gain.difference:+.1f} points, 95% CI [{100 * gain.low:+.1f}, {100 * gain.high:+.1f}]"
    if gain.verdict == "no measurable gain":
        return f"no clear gain on test: {interval} includes 0"
    return f"{'gain' if gain.verdict == 'helps' else 'loss'} on test: {interval}"


def _no_gain_verdict(state: TrainState, frozen_val: float) -> str:
    """No epoch beat the frozen head on val. What to try depends on why: more epochs cannot help where the frozen
    head is already right on every val image, nor where --patience, not the epoch budget, ended the run."""
    kept = "the saved model is the frozen head rebuilt"
    if frozen_val >= 1:
        return (
            f"no gain: no epoch can beat the frozen head on val, where it is already at {100 * frozen_val:.1f}%, so "
            f"fine-tuning cannot be selected on this val split: {kept}"
        )
    if state.stopped_early:
        return (
            f"no gain: no epoch beat the frozen head's val accuracy ({100 * frozen_val:.1f}%) before --patience "
            f"stopped the run after epoch {state.epoch}, so {kept}; try a larger --patience, another --lr-base or "
            f"--lr-head, or --unfreeze-last 2"
        )
    return (
        f"no gain: no epoch beat the frozen head's val accuracy ({100 * frozen_val:.1f}%), so {kept}; try more epochs, "
        f"--lr-base, or --unfreeze-last 2"
    )


def paired_test_gain(rebuilt: Rebuilt, test_pred: np.ndarray) -> PairedGain:
    """Gain over the frozen head on test, with its paired interval (:func:`featurecache.metrics.paired_difference`)."""
    y_test = rebuilt.splits.valid_labels("test")
    X_test, _, _ = store.load_features(rebuilt.files["test"], rebuilt.layer)
    frozen_correct = rebuilt.estimator.predict(X_test.astype(np.float32)) == y_test
    return paired_difference(test_pred == y_test, frozen_correct)


def score_and_record(
    rebuilt: Rebuilt, trainer: Trainer, state: TrainState, *, out_dir: Path, agreement: float, frozen_val: float
) -> HeadRecord:
    """Score the model on test once (and on val); returns its record. ``model.pt`` must already be in ``out_dir``:
    the record holds its checksum (the caller writes the record last)."""
    hr, splits = rebuilt.head_record, rebuilt.splits
    preds = {split: predict_split(rebuilt.model, splits, split, rebuilt.device) for split in ("val", "test")}
    # With the per-image predictions (valid rows, cache order), as stage-2 heads record them: the report pairs models
    # on them.
    scores = {split: {**classification_scores(splits.valid_labels(split), pred, n_classes=len(hr.class_names)),
                      "predictions": pred.tolist()} for split, pred in preds.items()}  # fmt: skip
    gain = paired_test_gain(rebuilt, preds["test"])
    return HeadRecord(
        kind=FINETUNED_KIND,
        dataset=rebuilt.dataset,
        base=hr.base,
        base_tag=rebuilt.base_tag,
        weights=hr.weights,
        # predict decodes new images as the training images were
        alpha=rebuilt.splits.decoding.alpha,
        orientation=rebuilt.splits.decoding.orientation,
        decode=rebuilt.splits.decoding.decode,
        layer=hr.layer,
        tap=hr.tap,
        head=out_dir.name,
        dense=True,
        class_names=hr.class_names,
        features=hr.features,
        params={
            "unfrozen": trainer.chosen,
            **{k: trainer.config[k] for k in ("lr_head", "lr_base", "optimizer", "augment")},
        },
        started_from=str(rebuilt.head_dir),
        rebuilt_agreement=agreement,
        selection_val_accuracy=state.best_val,
        best_epoch=state.best_epoch,
        improved_on_val=state.best_epoch > 0,
        verdict=gain_verdict(state, frozen_val, gain),
        history=state.history,
        val=scores["val"],
        test=scores["test"],
        frozen_test_accuracy=hr.test["accuracy"],
        gain_over_frozen_points=100 * gain.difference,
        gain_ci95_points=(100 * gain.low, 100 * gain.high),
        n_train=int(rebuilt.splits.valid["train"].sum()),  # the images it could learn from, as stage 2 counts
        files={FINETUNED_MODEL_FILE: file_sha256(out_dir / FINETUNED_MODEL_FILE)},
    )


def finetune(
    *, dataset: str, base_tag: str, options: FinetuneOptions | None = None, paths: Paths | None = None
) -> FinetuneResult:
    """Fine-tune the best stage-2 head of ``dataset`` x ``base_tag`` together with the top of its base.

    Interrupted runs (Ctrl-C, kill) resume from the checkpoint after the last finished epoch when the same
    command is run again; the result is the same as an uninterrupted run's.
    """
    options = options or FinetuneOptions()
    paths = paths or default_paths()
    options.check()
    t_start = time.perf_counter()
    rebuilt = rebuild(dataset, base_tag, options, paths)
    agreement, frozen_val = verify_agreement(rebuilt)
    chosen = choose_units(base_units(rebuilt.model.base, rebuilt.loaded.model), rebuilt.loaded.model, options)
    base_params = unfreeze(rebuilt.model, chosen)
    steps = steps_per_epoch(len(rebuilt.splits.index["train"]), options)
    opt, scheduler = make_optimizer(rebuilt.model.head, base_params, options, steps)
    out_dir = paths.head_dir(dataset, base_tag, rebuilt.layer, f"{FINETUNED_PREFIX}{rebuilt.head_record.head}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"head_dir": str(rebuilt.head_dir),
              "head_sha256": rebuilt.head_record.files[persist.HEAD_FILE], "unfrozen": chosen,
              **{k: v for k, v in dataclasses.asdict(options).items() if k not in _EXECUTION_ONLY}}  # fmt: skip
    trainer = Trainer(rebuilt, chosen, opt, scheduler, config, out_dir / CHECKPOINT_FILE, options)

    state, best_weights, resumed = train_epochs(trainer, frozen_val)
    rebuilt.model.load_state_dict(best_weights)
    atomic_write(out_dir / FINETUNED_MODEL_FILE, lambda tmp: torch.save(rebuilt.model.state_dict(), tmp))
    record = score_and_record(rebuilt, trainer, state, out_dir=out_dir, agreement=agreement, frozen_val=frozen_val)
    record = dataclasses.replace(record, timings={"total_seconds": round(time.perf_counter() - t_start, 3)})
    persist.write_record(out_dir, record)
    trainer.checkpoint.unlink(missing_ok=True)
    (log.warning if state.best_epoch == 0 else log.info)("fine-tuning %s: %s", out_dir, record.verdict)
    return FinetuneResult(record, out_dir, resumed, improved=state.best_epoch > 0, verdict=record.verdict)


def _pick_head(dataset: str, base_tag: str, head: str, paths: Paths, *, layer: str | None = None) -> Path:
    """The stage-2 head to start from: the best of the requested kind for this base (and layer), under the one
    selection rule (:mod:`featurecache.selection`)."""
    # Only heads trained on the current caches (featurecache.freshness), as the leaderboard ranks them.
    folders = paths.head_dirs(dataset, base_tag, layer=layer or "*", head=head)
    records = [record for _directory, record in current_heads(folders, paths)]
    cached = (
        []
        if records or layer is None
        else list(store.read_metadata(paths.feature_file(dataset, base_tag, "train"))["taps"])
    )
    if cached and layer not in cached:  # a typo: "run train-heads first" would not help
        close = close_names(layer, cached)
        raise FeaturecacheError(
            f"unknown --layer {layer!r} for {dataset} x {base_tag}"
            + (f"; did you mean: {', '.join(close)}?" if close else ".")
            + f" Cached layers: {', '.join(cached)}"
        )
    if not records:
        raise FeaturecacheError(
            f"no trained {head!r} head for {dataset} x {base_tag}{f' at layer {layer}' if layer else ''}; run "
            f"`featurecache train-heads --dataset {dataset} "
            f"--bases {base_tag} --heads {head}` first (fine-tuning never starts from a random head)"
        )
    best = pick_best(records, candidate_of_record)
    return paths.head_dir(dataset, base_tag, best.layer, best.head)
