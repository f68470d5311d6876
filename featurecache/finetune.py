"""Fine-tuning: rebuild base (truncated at the chosen tap) + pooling + the trained head, unfreeze the top, train.

The recipe (Chollet; cs231n): the head is trained on frozen features first (stage 2), then the top block(s) of
the base are unfrozen and trained jointly with a small learning rate and augmentation. Never start with a
randomly initialised head: the rebuilt model is checked to reproduce the stage-2 head's predictions before
any training step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import persist, store
from featurecache.augment import AUGMENTATIONS, train_transform
from featurecache.bases import load_base
from featurecache.config import Paths, default_paths
from featurecache.data import ImageFiles, discover_splits
from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write, atomic_write_text, file_sha256
from featurecache.heads import FINETUNED_PREFIX
from featurecache.layers import TapSpec, build_extractor
from featurecache.metrics import bootstrap_ci, classification_scores
from featurecache.train import cache_files, feature_fingerprint

log = logging.getLogger(__name__)

CHECK_AGREEMENT = 0.98  # rebuilt model vs stage-2 head on val (float16 cache rounding flips a few near-ties)


@dataclass(frozen=True)
class FinetuneOptions:
    head: str = "mlp"  # which stage-2 head to start from: mlp, or logreg (folded into a linear layer)
    layer: str | None = None  # start from the head at this layer (default: the best on val over all layers)
    unfreeze: tuple[str, ...] = ()  # module-name prefixes of the base to train
    unfreeze_last: int = 1  # or: the last K blocks before the tap (used when ``unfreeze`` is empty)
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
    stop_after_epochs: int | None = None  # simulate an interruption (tests); a re-run resumes


def _head_module(estimator: Any, sidecar: dict[str, Any]) -> Any:
    """The stage-2 head as a torch module mapping pooled features to logits (standardization folded in)."""
    import torch
    from torch import nn

    class Standardized(nn.Module):
        def __init__(self, mean: np.ndarray, scale: np.ndarray, body: nn.Module) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body((x - self.mean) / self.scale)

    if sidecar["dense"]:
        body = estimator.module_
        import copy

        return Standardized(estimator.mean_, estimator.scale_, copy.deepcopy(body))
    pipeline = getattr(estimator, "pipeline_", None)
    clf = pipeline[-1] if pipeline is not None else None
    if clf is None or not hasattr(clf, "coef_") or not hasattr(clf, "intercept_") or len(estimator.classes_) == 2:
        raise FeaturecacheError(
            f"head {sidecar['head']!r} cannot be turned into a linear layer; fine-tune from --head mlp or logreg"
        )
    scaler = pipeline[0]
    linear = nn.Linear(clf.coef_.shape[1], clf.coef_.shape[0])
    # Fold StandardScaler into the layer: W' = W / scale, b' = b - W' @ mean.
    w = clf.coef_ / scaler.scale_[None, :]
    b = clf.intercept_ - w @ scaler.mean_
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return Standardized(np.zeros(w.shape[1]), np.ones(w.shape[1]), linear)


def _blocks_before(extractor: Any, model: Any) -> list[str]:
    """Parameterised units of the truncated base in execution order: children of the root, with containers
    (``_blocks``, ``features``, ``layer3``) expanded one level, so the 'last K' are the top blocks.

    Container types are read from the original ``model``: the traced graph module rebuilds its intermediate
    modules as plain ``nn.Module`` (the parameters are the same objects)."""
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    body = extractor.body
    used = []
    for node in body.graph.nodes:
        name = str(node.target) if node.op == "call_module" else ""
        if node.op == "call_function" and "." in node.name:  # functional convs (static padding) keep a qualname
            name = ""
        if not name:
            continue
        parts = name.split(".")
        unit = parts[0]
        module = model.get_submodule(unit)
        if isinstance(module, containers) and len(parts) > 1:
            unit = f"{parts[0]}.{parts[1]}"
        if unit not in used:
            used.append(unit)
    return [u for u in used if any(p.numel() for p in body.get_submodule(u).parameters())]


@dataclass
class FinetuneResult:
    sidecar: dict[str, Any]
    model_dir: Path
    resumed: bool


def finetune(
    *, dataset: str, base_tag: str, options: FinetuneOptions | None = None, paths: Paths | None = None
) -> FinetuneResult:
    """Fine-tune the best stage-2 head of ``dataset`` x ``base_tag`` together with the top of its base."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    options = options or FinetuneOptions()
    paths = paths or default_paths()
    if options.augment not in AUGMENTATIONS:
        raise FeaturecacheError(f"unknown --augment {options.augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    files = cache_files(dataset, base_tag, paths)
    head_dir = _pick_head(dataset, base_tag, options.head, paths, layer=options.layer)
    metas = {s: store.read_metadata(p) for s, p in files.items()}
    sidecar0 = persist.read_sidecar(head_dir)
    layer = sidecar0["layer"]
    expect = {s: feature_fingerprint(metas[s], layer) for s in files}
    estimator, head_sidecar = persist.load_head(head_dir, expect_features=expect)

    from featurecache.predict import _weights_for

    loaded = load_base(head_sidecar["base"], **_weights_for(head_sidecar, None), seed=options.seed)
    tap = TapSpec.from_attrs(head_sidecar["tap"])
    extractor = build_extractor(loaded, [tap])
    head = _head_module(estimator, head_sidecar)

    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          "cpu" if options.device == "auto" else options.device)  # fmt: skip

    class Finetuned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = extractor
            self.head = head

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.head(self.base(images)[tap.key])

    model = Finetuned().to(device)
    root = Path(metas["train"]["dataset_root"])
    index = discover_splits(root, record_path=paths.split_record(dataset))
    class_names = tuple(head_sidecar["class_names"])
    for split, ix in index.items():
        if ix.paths != tuple(store.read_paths(files[split])):
            raise FeaturecacheError(f"{root} changed since {files[split]} was extracted; re-run extract first")
        if ix.class_names != class_names:
            raise FeaturecacheError(f"class names of {root} differ from the head's; re-run extract and train-heads")

    eval_tf = loaded.spec.transforms()
    size = loaded.spec.input_size

    def loader(split: str, transform: Any, shuffle: bool, epoch: int = 0) -> DataLoader:
        data = ImageFiles(index[split], transform, input_size=size, rows=range(len(index[split])))
        generator = torch.Generator().manual_seed(options.seed * 1000 + epoch)
        return DataLoader(data, batch_size=options.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=options.workers)  # fmt: skip

    labels = {s: np.asarray(index[s].labels) for s in index}

    def evaluate(split: str) -> np.ndarray:
        model.eval()
        preds = []
        with torch.inference_mode():
            for images, _rows, _errors in loader(split, eval_tf, shuffle=False):
                preds.append(model(images.to(device)).argmax(1).cpu().numpy())
        return np.concatenate(preds)

    # 1. The rebuilt model must reproduce the stage-2 head before any training step.
    X_val, y_val, _ = store.load_features(files["val"], layer, include_invalid=True)
    head_pred = estimator.predict(X_val.astype(np.float32))
    rebuilt_pred = evaluate("val")
    agreement = float((head_pred == rebuilt_pred).mean())
    if agreement < CHECK_AGREEMENT:
        raise FeaturecacheError(
            f"the rebuilt model agrees with the stage-2 head on only {100 * agreement:.1f}% of val images "
            f"(need {100 * CHECK_AGREEMENT:.0f}%); the cache may be stale: re-run extract and train-heads"
        )
    log.info("rebuilt model reproduces the head: %.1f%% agreement on val", 100 * agreement)
    frozen_val = float((rebuilt_pred == labels["val"]).mean())

    # 2. Unfreeze.
    for p in model.parameters():
        p.requires_grad_(False)
    units = _blocks_before(extractor, loaded.model)
    chosen = [u for u in units if any(u == q or u.startswith(q + ".") for q in options.unfreeze)] if options.unfreeze \
        else units[-options.unfreeze_last:] if options.unfreeze_last > 0 else []  # fmt: skip
    if options.unfreeze and not chosen:
        raise FeaturecacheError(f"--unfreeze {','.join(options.unfreeze)} matches no block; blocks: {', '.join(units)}")
    base_params = [p for u in chosen for p in extractor.body.get_submodule(u).parameters()]
    for p in [*base_params, *head.parameters()]:
        p.requires_grad_(True)
    groups = [{"params": list(head.parameters()), "lr": options.lr_head}]
    if base_params:
        groups.append({"params": base_params, "lr": options.lr_base})
    if options.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    elif options.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=options.weight_decay)
    else:
        raise FeaturecacheError(f"unknown --optimizer {options.optimizer!r}; choose adamw or sgd")
    n_train = len(index["train"])
    steps_per_epoch = math.ceil(n_train / options.batch_size)
    if options.max_batches:
        steps_per_epoch = min(steps_per_epoch, options.max_batches)
    total = steps_per_epoch * options.max_epochs
    warmup = max(1, int(options.warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    config = {"head_dir": str(head_dir), "head_sha256": head_sidecar["files"][persist.HEAD_FILE],
              "unfrozen": chosen, **{k: v for k, v in dataclasses.asdict(options).items()
                                     if k not in ("progress", "stop_after_epochs", "workers", "device")}}  # fmt: skip
    out_dir = paths.models / dataset / base_tag / layer / f"{FINETUNED_PREFIX}{head_sidecar['head']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"

    state = {"epoch": 0, "best_val": frozen_val, "best_epoch": 0, "stale": 0, "history": []}
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    resumed = False
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] == config:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            state, best_weights = ckpt["state"], ckpt["best_weights"]
            resumed = True
            log.info("resuming fine-tuning after epoch %d", state["epoch"])
        else:
            log.info("discarding %s: made with other settings", ckpt_path)

    use_amp = options.amp and device.type == "cuda"
    t_start = time.perf_counter()
    loss_fn = torch.nn.CrossEntropyLoss()
    train_tf = train_transform(eval_tf, size, options.augment)
    epochs_this_run = 0
    while state["epoch"] < options.max_epochs and state["stale"] < options.patience:
        epoch = state["epoch"]
        # Every epoch's randomness derives from (seed, epoch): a resumed run repeats it exactly.
        torch.manual_seed(options.seed * 1000 + epoch)
        random.seed(options.seed * 1000 + epoch)
        # model.train() leaves the base on its eval graph (see layers.build_extractor): the head sees the features
        # it was fitted on; gradients flow through the eval graph all the same.
        model.train()
        if options.train_bn:
            for unit in chosen:
                for module in extractor.body.get_submodule(unit).modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.train()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{options.max_epochs}", disable=not options.progress)
        correct = seen = 0
        for step, (images, rows, errors) in enumerate(loader("train", train_tf, shuffle=True, epoch=epoch)):
            if options.max_batches and step >= options.max_batches:
                break
            y = torch.as_tensor(labels["train"][rows.numpy()], device=device)
            keep = torch.as_tensor([not e for e in errors], device=device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(images.to(device))
                loss = loss_fn(logits[keep].float(), y[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            correct += int((logits.argmax(1) == y)[keep].sum())
            seen += int(keep.sum())
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / max(seen, 1):.3f}")
            bar.update()
        bar.close()
        val_acc = float((evaluate("val") == labels["val"]).mean())
        state["history"].append({"epoch": epoch + 1, "train_accuracy": correct / max(seen, 1), "val_accuracy": val_acc})
        if val_acc > state["best_val"]:
            state.update(best_val=val_acc, best_epoch=epoch + 1, stale=0)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        checkpoint = {"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": scheduler.state_dict(), "state": state, "best_weights": best_weights}  # fmt: skip
        atomic_write(ckpt_path, lambda tmp, checkpoint=checkpoint: torch.save(checkpoint, tmp))
        epochs_this_run += 1
        if options.stop_after_epochs is not None and epochs_this_run >= options.stop_after_epochs:
            raise KeyboardInterrupt  # the simulated interruption; progress is in the checkpoint

    # 3. Best checkpoint, test once.
    model.load_state_dict(best_weights)
    test_pred = evaluate("test")
    frozen_test = head_sidecar["test"]
    n_classes = len(class_names)
    test_scores = classification_scores(labels["test"], test_pred, n_classes=n_classes, seed=options.seed)
    X_test, _, _ = store.load_features(files["test"], layer, include_invalid=True)
    frozen_correct = estimator.predict(X_test.astype(np.float32)) == labels["test"]
    gain = (test_pred == labels["test"]).astype(float) - frozen_correct.astype(float)
    low, high = bootstrap_ci(gain, seed=options.seed)  # paired: the same test images resampled together
    atomic_write(out_dir / "model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    sidecar = {
        "version": 1,
        "dataset": dataset,
        "base": head_sidecar["base"],
        "base_tag": base_tag,
        "weights": head_sidecar["weights"],
        "layer": layer,
        "tap": head_sidecar["tap"],
        "head": f"{FINETUNED_PREFIX}{head_sidecar['head']}",
        "dense": True,
        "class_names": list(class_names),
        "features": head_sidecar["features"],
        "params": {"unfrozen": chosen, **{k: config[k] for k in ("lr_head", "lr_base", "optimizer", "augment")}},
        "started_from": str(head_dir),
        "rebuilt_agreement": agreement,
        "selection_val_accuracy": state["best_val"],
        "best_epoch": state["best_epoch"],
        "history": state["history"],
        "test": test_scores,
        "frozen_test_accuracy": frozen_test["accuracy"],
        "gain_over_frozen_points": 100 * float(gain.mean()),
        "gain_ci95_points": [100 * low, 100 * high],
        "n_train": n_train,
        "timings": {"total_seconds": round(time.perf_counter() - t_start, 3)},
        "files": {"model.pt": file_sha256(out_dir / "model.pt")},
    }
    atomic_write_text(out_dir / persist.SIDECAR_FILE, json.dumps(sidecar, indent=1, default=str))
    ckpt_path.unlink(missing_ok=True)
    return FinetuneResult(sidecar=sidecar, model_dir=out_dir, resumed=resumed)


def _pick_head(dataset: str, base_tag: str, head: str, paths: Paths, *, layer: str | None = None) -> Path:
    """The stage-2 head to start from: the best (on val) of the requested kind for this base (and layer)."""
    candidates = []
    for sidecar_path in (paths.models / dataset / base_tag).glob(f"{layer or '*'}/{head}/{persist.SIDECAR_FILE}"):
        s = json.loads(sidecar_path.read_text())
        candidates.append((-s["selection_val_accuracy"], s["tap"]["relative_depth"], str(sidecar_path.parent)))
    if not candidates:
        raise FeaturecacheError(
            f"no trained {head!r} head for {dataset} x {base_tag}{f' at layer {layer}' if layer else ''}; run "
            f"`featurecache train-heads --dataset {dataset} "
            f"--bases {base_tag} --heads {head}` first (fine-tuning never starts from a random head)"
        )
    return Path(min(candidates)[2])  # ties: the shallower layer
