"""A small dense network in torch, wrapped as a scikit-learn classifier (skorch's shape, ~150 lines of ours).

Plain parameters (``hidden_units``, ``dropout``, ``lr``, ``weight_decay``, ``max_epochs``, ``batch_size``,
``device``), early stopping on a validation set with best-epoch restore (better: higher accuracy, or the same accuracy
with lower loss), seedable, CPU or CUDA. ``fit`` takes
``eval_set=(X_val, y_val)``; without one it holds out ``validation_fraction`` of the training rows. ``fit_stream``
trains from chunks read off the HDF5 cache when a split does not fit in memory.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurecache.devices import resolve_device

# A split as lazy chunks: each callable reads one block of rows, so epochs can visit blocks in a random
# order while only one block is in memory.
ChunkLoader = Callable[[], tuple[np.ndarray, np.ndarray]]


def _mlp(n_in: int, hidden_units: tuple[int, ...], n_out: int, dropout: float) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden_units:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class DenseClassifier(ClassifierMixin, BaseEstimator):
    """MLP head: standardize -> [Linear, ReLU, Dropout] x len(hidden_units) -> Linear.

    Args:
        hidden_units: widths of the hidden layers; ``()`` is multinomial logistic regression in torch.
        dropout: dropout after every hidden layer.
        lr, weight_decay: AdamW learning rate and decoupled weight decay.
        max_epochs: upper bound on epochs; early stopping usually ends sooner.
        batch_size: rows per step.
        patience: epochs without validation improvement before stopping.
        validation_fraction: share of training rows held out for early stopping when ``fit`` gets no eval_set.
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch intra-op threads while fitting on the CPU (restored afterwards); ``None`` keeps the
            process's setting. One by default: these matmuls are too small to gain much from a second thread, and
            on a shared machine two spinning threads made a fit several times slower (see BENCHMARKS.md); parallel
            jobs (``train-heads --n-jobs``) use the cores instead, and the numbers no longer depend on the count.
        random_state: seeds initialisation, shuffling and the hold-out split.
    """

    def __init__(
        self,
        hidden_units: tuple[int, ...] = (256,),
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 100,
        batch_size: int = 128,
        patience: int = 10,
        validation_fraction: float = 0.1,
        device: str = "cpu",
        threads: int | None = 1,
        random_state: int | None = 0,
    ) -> None:
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.threads = threads
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None) -> DenseClassifier:
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        rng = np.random.default_rng(self.random_state)
        if eval_set is not None:
            X_val = validate_data(self, eval_set[0], dtype=np.float32, reset=False)
            y_val = self._encode(eval_set[1])
            X_tr, y_tr = X, y_idx
        elif self.validation_fraction > 0 and len(X) >= 10:
            order = rng.permutation(len(X))
            n_val = max(1, int(round(self.validation_fraction * len(X))))
            X_val, y_val, X_tr, y_tr = X[order[:n_val]], y_idx[order[:n_val]], X[order[n_val:]], y_idx[order[n_val:]]
        else:
            X_val = y_val = None
            X_tr, y_tr = X, y_idx
        self.mean_ = X_tr.mean(axis=0)
        self.scale_ = _safe_scale(X_tr.std(axis=0))

        return self._train([lambda: (X_tr, y_tr)], X_val, y_val, rng)

    def fit_stream(
        self,
        chunks: Sequence[ChunkLoader],
        *,
        classes: np.ndarray,
        n_features: int,
        eval_set: tuple[Any, Any] | None = None,
    ) -> DenseClassifier:
        """Fit from lazily loaded ``(X_chunk, y_chunk)`` blocks without holding the split in memory.

        Standardization statistics come from one streaming pass (Chan et al.'s parallel mean/variance);
        each epoch then visits the chunks in a shuffled order and shuffles rows within each chunk.
        """
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = n_features
        rng = np.random.default_rng(self.random_state)
        count, mean, m2 = 0, np.zeros(n_features), np.zeros(n_features)
        for load in chunks:
            X_chunk = np.asarray(load()[0], dtype=np.float64)
            n_b, mean_b = len(X_chunk), X_chunk.mean(axis=0)
            m2_b = ((X_chunk - mean_b) ** 2).sum(axis=0)
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * n_b / max(total, 1)
            m2 = m2 + m2_b + delta**2 * count * n_b / max(total, 1)
            count = total
        self.mean_ = mean.astype(np.float32)
        self.scale_ = _safe_scale(np.sqrt(m2 / max(count, 1)).astype(np.float32))

        def encoded(load: ChunkLoader) -> ChunkLoader:
            def read() -> tuple[np.ndarray, np.ndarray]:
                X_chunk, y_chunk = load()
                return np.asarray(X_chunk, dtype=np.float32), self._encode(y_chunk)

            return read

        X_val, y_val = (None, None)
        if eval_set is not None:
            X_val, y_val = np.asarray(eval_set[0], dtype=np.float32), self._encode(eval_set[1])
        return self._train([encoded(c) for c in chunks], X_val, y_val, rng)

    def _encode(self, y: Any) -> np.ndarray:
        y = np.asarray(y)
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[idx], y):
            raise ValueError("validation labels contain classes not seen in training")
        return idx

    def _train(
        self, chunks: Sequence[ChunkLoader], X_val: Any, y_val: Any, rng: np.random.Generator
    ) -> DenseClassifier:
        device = _device(self.device)
        with _torch_threads(self.threads if device.type == "cpu" else None):
            return self._train_loop(chunks, X_val, y_val, rng, device)

    def _train_loop(
        self, chunks: Sequence[ChunkLoader], X_val: Any, y_val: Any, rng: np.random.Generator, device: Any
    ) -> DenseClassifier:
        import torch

        torch.manual_seed(int(rng.integers(2**31)))
        model = _mlp(self.n_features_in_, tuple(self.hidden_units), len(self.classes_), self.dropout).to(device)
        # foreach: one fused update per parameter group instead of a Python loop per tensor (most of a step's
        # overhead on the narrow layers).
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        mean = torch.as_tensor(self.mean_, device=device)
        scale = torch.as_tensor(self.scale_, device=device)
        # In memory (one chunk): standardized once into a float32 tensor, not once per epoch.
        resident = [_standardized(*chunks[0](), mean, scale, device)] if len(chunks) == 1 else None
        val = None if X_val is None else (_standardized(X_val, y_val, mean, scale, device))
        best_state, best_key, best_epoch, stale = None, (-math.inf, -math.inf), 0, 0  # key: (val accuracy, -loss)
        self.history_ = []
        for epoch in range(1, self.max_epochs + 1):
            model.train()
            total = torch.zeros((), device=device)
            seen = 0
            blocks = resident or (_standardized(X, y, mean, scale, device) for X, y in _chunk_order(chunks, rng))
            for Xt, yt in blocks:
                order = torch.as_tensor(rng.permutation(len(Xt)), device=device)
                for start in range(0, len(Xt), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(Xt[rows]), yt[rows])
                    loss.backward()
                    opt.step()
                    total += loss.detach() * len(rows)  # summed on the device: no sync per step
                    seen += len(rows)
            record = {"epoch": epoch, "train_loss": float(total) / max(seen, 1)}
            if val is not None:
                model.eval()
                with torch.inference_mode():
                    logits = model(val[0])
                    score = float((logits.argmax(1) == val[1]).float().mean())
                    val_loss = float(loss_fn(logits, val[1]))
                record["val_accuracy"], record["val_loss"] = score, val_loss
                # Better = higher val accuracy, or equal accuracy and lower val loss. On small easy data accuracy hits
                # 100% in a few epochs; judged by accuracy alone, patience stopped there and the first such epoch was
                # restored, whose small logits gave p = 0.39 on average to test images a 4-class head got 94% right.
                if (score, -val_loss) > best_key:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best_epoch, best_key, stale = epoch, (score, -val_loss), 0
                else:
                    stale += 1
            self.history_.append(record)
            if val is not None and stale >= self.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)  # best-epoch restore
        self.best_epoch_ = best_epoch or len(self.history_)
        self.module_ = model.cpu().eval()
        return self

    # ------------------------------------------------------------------ inference

    def _logits(self, model: Any, X: np.ndarray, device: Any) -> Any:
        import torch

        model.eval()
        out = []
        with torch.inference_mode():
            mean = torch.as_tensor(self.mean_, device=device)
            scale = torch.as_tensor(self.scale_, device=device)
            for start in range(0, len(X), 4096):
                xb = torch.as_tensor(np.ascontiguousarray(X[start : start + 4096]), device=device)
                out.append(model((xb - mean) / scale).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes_))

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "module_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        logits = self._logits(self.module_, X, "cpu").numpy()
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        import torch

        check_is_fitted(self, "module_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return torch.softmax(self._logits(self.module_, X, "cpu"), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "module_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    # ------------------------------------------------------------------ persistence

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the torch module as a state_dict (portable across devices and torch versions).
        state = self.__dict__.copy()
        if "module_" in state:
            import torch

            buffer = io.BytesIO()
            torch.save(state.pop("module_").state_dict(), buffer)
            state["_module_state"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_module_state", None)
        self.__dict__.update(state)
        if blob is not None:
            import torch

            module = _mlp(self.n_features_in_, tuple(self.hidden_units), len(self.classes_), self.dropout)
            module.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            self.module_ = module.eval()


def _safe_scale(std: np.ndarray) -> np.ndarray:
    return np.where(std > 1e-12, std, 1.0).astype(np.float32)


def _device(name: str) -> Any:
    import torch

    return torch.device(resolve_device(name))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk_order(chunks: Sequence[ChunkLoader], rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks in a random order (rows are shuffled within each by the caller); one chunk is a full shuffle."""
    for i in rng.permutation(len(chunks)):
        yield chunks[i]()


def _standardized(X: np.ndarray, y: np.ndarray, mean: Any, scale: Any, device: Any) -> tuple[Any, Any]:
    """``(X - mean) / scale`` as a float32 tensor and the labels as a long tensor, on ``device``."""
    import torch

    Xt = (torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device) - mean) / scale
    return Xt, torch.as_tensor(y, device=device, dtype=torch.long)
