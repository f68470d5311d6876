"""The layer-depth comparison: which layer of which base transfers best, per dataset, and how much it matters.

Reads what stages 1 and 2 wrote (caches and head sidecars) and writes ``reports/compare/``:
``accuracy_vs_depth.png``, ``report.md``, ``report.html`` (figures inline), ``results.csv`` and ``summary.json``.
At every layer the head is the one selected on val; the recommended layer is chosen on val too, and the
oracle (best on test) is shown only to measure what that choice costs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import persist, store
from featurecache.config import Paths
from featurecache.errors import FeaturecacheError
from featurecache.fileio import atomic_write_text
from featurecache.heads import AUGMENTED_SUFFIX, FINETUNED_PREFIX, simplicity_rank
from featurecache.transferability import logme

log = logging.getLogger(__name__)

REFERENCE_BASE = "efficientnet_lite0"  # its ImageNet classifier measures how far a dataset is from ImageNet
REFERENCE_LOGITS = "_fc"
RANDOM_SUFFIX = "-random"


def _frozen_plain(head: str) -> bool:
    """Heads on frozen features of the plain train split: what the accuracy-vs-depth curves compare."""
    return not head.startswith(FINETUNED_PREFIX) and not head.endswith(AUGMENTED_SUFFIX)


@dataclass
class LayerPoint:
    """One dataset x base x layer: the val-selected head and what it scores."""

    dataset: str
    base: str
    layer: str
    depth: float
    head: str
    val_accuracy: float
    test_accuracy: float
    ci_low: float
    ci_high: float
    logme: float | None
    heads: dict[str, tuple[float, float]]  # every head at this layer: (val, test)


def _sidecars(models: Path, dataset: str, base: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((models / dataset / base).glob(f"*/*/{persist.SIDECAR_FILE}"))]


def layer_points(
    dataset: str, base: str, paths: Paths, *, heads: Sequence[str] | None = None, with_logme: bool = True
) -> list[LayerPoint]:
    """The curve of one dataset x base: per layer, the head with the best val accuracy (ties: simpler head)."""
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for s in _sidecars(paths.models, dataset, base):
        if _frozen_plain(s["head"]) and (heads is None or s["head"] in heads):
            by_layer.setdefault(s["layer"], []).append(s)
    points = []
    train_file = paths.feature_file(dataset, base, "train")
    for layer, sidecars in by_layer.items():
        best = min(sidecars, key=lambda s: (-s["selection_val_accuracy"], simplicity_rank(s["head"])))
        score = None
        if with_logme and train_file.is_file():
            X, y, _ = store.load_features(train_file, layer)
            score = logme(X.astype(np.float64), y)
        points.append(
            LayerPoint(
                dataset=dataset,
                base=base,
                layer=layer,
                depth=float(best["tap"]["relative_depth"]),
                head=best["head"],
                val_accuracy=float(best["selection_val_accuracy"]),
                test_accuracy=float(best["test"]["accuracy"]),
                ci_low=float(best["test"]["accuracy_ci95"][0]),
                ci_high=float(best["test"]["accuracy_ci95"][1]),
                logme=score,
                heads={s["head"]: (s["selection_val_accuracy"], s["test"]["accuracy"]) for s in sidecars},
            )
        )
    return sorted(points, key=lambda p: p.depth)


def imagenet_distance(dataset: str, paths: Paths) -> dict[str, float] | None:
    """How the pretrained ImageNet classifier sees a dataset, from its cached logits (train split).

    ``confidence`` is the mean max-softmax probability (near-ImageNet photos get confident predictions);
    ``distance`` is 1 - confidence; ``classes_used`` is exp(entropy) of the mean predicted distribution (how
    spread the predictions are over ImageNet's 1000 classes).
    """
    path = paths.feature_file(dataset, REFERENCE_BASE, "train")
    if not path.is_file() or REFERENCE_LOGITS not in store.read_metadata(path)["taps"]:
        return None
    logits, _, _ = store.load_features(path, REFERENCE_LOGITS)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    confidence = float(p.max(axis=1).mean())
    mean = p.mean(axis=0)
    entropy = float(-(mean * np.log(mean + 1e-12)).sum())
    return {"confidence": confidence, "distance": 1.0 - confidence, "classes_used": float(np.exp(entropy))}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant input."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


@dataclass
class CurveSummary:
    dataset: str
    base: str
    recommended: LayerPoint  # best on val
    oracle: LayerPoint  # best on test (for measuring the cost of choosing on val only)
    worst: LayerPoint
    logme_spearman: float
    random_best: LayerPoint | None  # the random-init control at its own val-selected layer
    top_depth: float  # depth of the curve's deepest layer

    @property
    def gap_points(self) -> float:
        return 100 * (self.oracle.test_accuracy - self.recommended.test_accuracy)


def summarize(points: list[LayerPoint], random_points: list[LayerPoint]) -> CurveSummary:
    recommended = min(points, key=lambda p: (-p.val_accuracy, -p.depth))
    oracle = max(points, key=lambda p: p.test_accuracy)
    worst = min(points, key=lambda p: p.test_accuracy)
    scores = [(p.logme, p.test_accuracy) for p in points if p.logme is not None]
    rho = spearman([s[0] for s in scores], [s[1] for s in scores]) if scores else float("nan")
    random_best = min(random_points, key=lambda p: -p.val_accuracy) if random_points else None
    top = max(p.depth for p in points)
    return CurveSummary(points[0].dataset, points[0].base, recommended, oracle, worst, rho, random_best, top)


# ------------------------------------------------------------------------------------------- beyond frozen


def beyond_frozen(dataset: str, base: str, paths: Paths, *, seed: int = 0) -> list[dict[str, Any]]:
    """The routes past a frozen head on plain features, each against the frozen head it starts from.

    * ``finetuned-<head>``: the fine-tune stage's model; its sidecar holds the paired gain and interval.
    * ``<head>+aug``: the best head (on val) trained with the cached augmented views, against the same head at the
      same layer without them; the gain and its paired 95% bootstrap interval are computed here on the test cache.
    """
    from featurecache.metrics import bootstrap_ci

    rows = []
    sidecars = _sidecars(paths.models, dataset, base)
    for s in sidecars:
        if s["head"].startswith(FINETUNED_PREFIX):
            rows.append({
                "route": "fine-tuned", "head": s["head"], "layer": s["layer"], "depth": s["tap"]["relative_depth"],
                "detail": f"unfrozen {', '.join(s['params']['unfrozen'])}; augment {s['params']['augment']}; "
                          f"best epoch {s['best_epoch']}",
                "val_accuracy": s["selection_val_accuracy"], "test_accuracy": s["test"]["accuracy"],
                "test_ci95": s["test"]["accuracy_ci95"], "frozen_test_accuracy": s["frozen_test_accuracy"],
                "gain_points": s["gain_over_frozen_points"], "gain_ci95_points": s["gain_ci95_points"],
            })  # fmt: skip
    augmented = [
        s for s in sidecars if s["head"].endswith(AUGMENTED_SUFFIX) and not s["head"].startswith(FINETUNED_PREFIX)
    ]
    if augmented:
        best = min(augmented, key=lambda s: (-s["selection_val_accuracy"], simplicity_rank(s["head"])))
        plain_dir = paths.models / dataset / base / best["layer"] / best["head_spec"]
        if (plain_dir / persist.SIDECAR_FILE).is_file():
            test_file = paths.feature_file(dataset, base, "test")
            X, y, _ = store.load_features(test_file, best["layer"])
            X = X.astype(np.float32)
            aug_head, _ = persist.load_head(paths.models / dataset / base / best["layer"] / best["head"])
            plain_head, plain = persist.load_head(plain_dir)
            gain = (aug_head.predict(X) == y).astype(float) - (plain_head.predict(X) == y).astype(float)
            low, high = bootstrap_ci(gain, seed=seed)
            rows.append({
                "route": "augmented views", "head": best["head"], "layer": best["layer"],
                "depth": best["tap"]["relative_depth"],
                "detail": f"{best['train_views']} cached views + the plain train split ({best['n_train']} rows)",
                "val_accuracy": best["selection_val_accuracy"], "test_accuracy": best["test"]["accuracy"],
                "test_ci95": best["test"]["accuracy_ci95"], "frozen_test_accuracy": plain["test"]["accuracy"],
                "gain_points": 100 * float(gain.mean()), "gain_ci95_points": [100 * low, 100 * high],
            })  # fmt: skip
        else:
            log.warning("no plain %s head at %s to compare %s with", best["head_spec"], best["layer"], best["head"])
    return rows


# ------------------------------------------------------------------------------------------- figure


def plot_accuracy_vs_depth(
    curves: dict[tuple[str, str], list[LayerPoint]], distances: dict[str, dict | None], out: Path
) -> None:
    """One panel per base; a line per dataset (test accuracy of the val-selected head), 95% bands, and the
    random-init control dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({b for _, b in curves if not b.endswith(RANDOM_SUFFIX)})
    datasets = sorted({d for d, _ in curves}, key=lambda d: (distances.get(d) or {}).get("distance", 2.0))
    colours = dict(zip(datasets, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, len(bases), figsize=(6.5 * len(bases) + 3.2, 5.2), squeeze=False, sharey=True)
    for ax, base in zip(axes[0], bases, strict=True):
        for ds in datasets:
            for tag, style in ((base, "-"), (base + RANDOM_SUFFIX, "--")):
                pts = curves.get((ds, tag))
                if not pts:
                    continue
                x = [p.depth for p in pts]
                y = [100 * p.test_accuracy for p in pts]
                dist = distances.get(ds)
                label = f"{ds} (ImageNet conf. {dist['confidence']:.2f})" if dist and style == "-" else ds
                ax.plot(x, y, style, marker="o" if style == "-" else None, ms=4, color=colours[ds],
                        label=label if style == "-" else None, lw=1.8 if style == "-" else 1.1)  # fmt: skip
                if style == "-":
                    ax.fill_between(x, [100 * p.ci_low for p in pts], [100 * p.ci_high for p in pts],
                                    color=colours[ds], alpha=0.10, lw=0)  # fmt: skip
                    rec = max(pts, key=lambda p: (p.val_accuracy, p.depth))
                    ax.plot([rec.depth], [100 * rec.test_accuracy], marker="*", ms=13, color=colours[ds], mec="k")
        ax.set_title(f"{base}: test accuracy of the val-selected head per layer")
        ax.set_xlabel("relative depth (share of the base's conv/linear ops)")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), 95% bootstrap band")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="grey", ls="--"), Line2D([], [], color="grey", marker="*", ls="", ms=11, mec="k")]
    labels += ["random-init control", "layer recommended on val"]
    # Outside the panels, nearest-to-ImageNet first, so no curve is hidden and nothing is clipped.
    axes[0][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- report


def _reading(summaries: list[CurveSummary], distances: dict[str, dict | None]) -> str:
    """A paragraph that reads the curves, computed from the numbers (no canned conclusions)."""
    pretrained = [s for s in summaries if not s.base.endswith(RANDOM_SUFFIX)]
    if not pretrained:
        return "No pretrained curves yet."
    parts = []
    measured = [s for s in pretrained if distances.get(s.dataset)]
    if len(measured) >= 3:
        rho = spearman([distances[s.dataset]["confidence"] for s in measured], [s.recommended.depth for s in measured])
        near = max(measured, key=lambda s: distances[s.dataset]["confidence"])
        far = min(measured, key=lambda s: distances[s.dataset]["confidence"])
        parts.append(
            f"Across {len(measured)} dataset/base pairs, the depth recommended on val and the ImageNet classifier's "
            f"confidence on the dataset have a rank correlation of {rho:+.2f}: {near.dataset} (confidence "
            f"{distances[near.dataset]['confidence']:.2f}) peaks at depth {near.recommended.depth:.2f}, {far.dataset} "
            f"(confidence {distances[far.dataset]['confidence']:.2f}) at depth {far.recommended.depth:.2f}."
        )
    top_wins = [s for s in pretrained if s.recommended.depth >= s.top_depth]
    middle = [s for s in pretrained if s.recommended.depth < 0.85]
    parts.append(
        f"The deepest tap is recommended for {len(top_wins)} of {len(pretrained)} curves; a layer below depth 0.85 for "
        f"{len(middle)} ({', '.join(f'{s.dataset} {s.recommended.depth:.2f}' for s in middle) or 'none'})."
    )
    spread = np.mean([100 * (s.oracle.test_accuracy - s.worst.test_accuracy) for s in pretrained])
    gap = np.mean([s.gap_points for s in pretrained])
    parts.append(
        f"The choice matters: best minus worst layer is {spread:.1f} points of test accuracy on average, while picking "
        f"the layer on val costs {gap:.1f} points against the test oracle."
    )
    gains = [
        (s.dataset, 100 * (s.recommended.test_accuracy - s.random_best.test_accuracy))
        for s in pretrained
        if s.random_best is not None
    ]
    if gains:
        parts.append(
            "Pretraining against the random-init control at each side's val-selected layer: "
            + ", ".join(f"{d} {g:+.1f}" for d, g in gains)
            + " points."
        )
    rhos = [s.logme_spearman for s in pretrained if not np.isnan(s.logme_spearman)]
    if rhos:
        parts.append(
            f"LogME, computed from the cached features without training, ranks layers with a median Spearman "
            f"correlation of {np.median(rhos):+.2f} to the trained test accuracy (range {min(rhos):+.2f} to "
            f"{max(rhos):+.2f}): a shortlist, not a verdict."
        )
    return " ".join(parts)


def build_report(
    datasets: Sequence[str],
    bases: Sequence[str],
    paths: Paths,
    *,
    heads: Sequence[str] | None = None,
    licenses: dict[str, str] | None = None,
    expected: dict[str, str] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Write ``reports/compare/`` from trained heads of ``datasets`` x ``bases`` (plus their ``-random`` controls)."""
    curves: dict[tuple[str, str], list[LayerPoint]] = {}
    for ds in datasets:
        for base in bases:
            for tag in (base, base + RANDOM_SUFFIX):
                pts = layer_points(ds, tag, paths, heads=heads, with_logme=not tag.endswith(RANDOM_SUFFIX))
                if pts:
                    curves[(ds, tag)] = pts
    if not any(not b.endswith(RANDOM_SUFFIX) for _, b in curves):
        raise FeaturecacheError(
            f"no trained heads for {', '.join(datasets)} x {', '.join(bases)} under {paths.models}; run "
            f"`make compare-layers` (it extracts and trains first)"
        )
    distances = {ds: imagenet_distance(ds, paths) for ds in datasets}
    summaries = [
        summarize(pts, curves.get((ds, tag + RANDOM_SUFFIX), []))
        for (ds, tag), pts in curves.items()
        if not tag.endswith(RANDOM_SUFFIX)
    ]
    out = paths.reports / "compare"
    out.mkdir(parents=True, exist_ok=True)
    png = out / "accuracy_vs_depth.png"
    plot_accuracy_vs_depth(curves, distances, png)
    beyond = {
        (ds, tag): rows
        for (ds, tag) in curves
        if not tag.endswith(RANDOM_SUFFIX) and (rows := beyond_frozen(ds, tag, paths))
    }
    _write_tables(out, curves, summaries, distances, beyond)
    blocks = _blocks(summaries, curves, distances, licenses or {}, expected or {}, command, beyond)
    atomic_write_text(out / "report.md", _markdown(blocks))
    atomic_write_text(out / "report.html", _html(blocks, {png.name: png}))
    return json.loads((out / "summary.json").read_text())


def _write_tables(out: Path, curves: dict, summaries: list[CurveSummary], distances: dict, beyond: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "base", "layer", "relative_depth", "head", "val_accuracy", "test_accuracy",
                     "test_ci_low", "test_ci_high", "logme", "selected_head_at_layer"])  # fmt: skip
    for pts in curves.values():
        for p in pts:
            for head, (val, test) in sorted(p.heads.items()):
                writer.writerow([p.dataset, p.base, p.layer, p.depth, head, round(val, 4), round(test, 4),
                                 round(p.ci_low, 4) if head == p.head else "", round(p.ci_high, 4) if head == p.head
                                 else "", "" if p.logme is None else round(p.logme, 5), head == p.head])  # fmt: skip
    atomic_write_text(out / "results.csv", buffer.getvalue())
    summary = {
        "datasets": {ds: {"imagenet": d} for ds, d in distances.items()},
        "curves": [
            {
                "dataset": s.dataset,
                "base": s.base,
                "recommended": {
                    "layer": s.recommended.layer,
                    "depth": s.recommended.depth,
                    "val_accuracy": s.recommended.val_accuracy,
                    "test_accuracy": s.recommended.test_accuracy,
                    "test_ci95": [s.recommended.ci_low, s.recommended.ci_high],
                    "head": s.recommended.head,
                },
                "oracle": {"layer": s.oracle.layer, "depth": s.oracle.depth, "test_accuracy": s.oracle.test_accuracy},
                "gap_points": s.gap_points,
                "best_minus_worst_points": 100 * (s.oracle.test_accuracy - s.worst.test_accuracy),
                "logme_spearman": None if np.isnan(s.logme_spearman) else s.logme_spearman,
                "random_init": None
                if s.random_best is None
                else {
                    "layer": s.random_best.layer,
                    "depth": s.random_best.depth,
                    "test_accuracy": s.random_best.test_accuracy,
                },
                "points": [p.__dict__ for p in curves[(s.dataset, s.base)]],
            }  # fmt: skip
            for s in summaries
        ],
        "beyond_frozen": [{"dataset": ds, "base": base, **row} for (ds, base), rows in beyond.items() for row in rows],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))


def _blocks(summaries, curves, distances, licenses, expected, command, beyond) -> list[tuple[str, Any]]:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    blocks: list[tuple[str, Any]] = [
        ("h1", "Which layer transfers? Accuracy versus depth"),
        ("p", f"Generated by `{command}`." if command else "Generated by featurecache."),
        ("img", "accuracy_vs_depth.png"),
        ("h2", "Reading the curves"),
        ("p", _reading(summaries, distances)),
        ("h2", "Datasets and their measured distance from ImageNet"),
        ("p", "Confidence = mean max-softmax of EfficientNet-Lite0's ImageNet classifier on the train split; classes "
              "used = exp(entropy) of its mean prediction. Folklore's placement is shown beside the measurement."),
    ]  # fmt: skip
    rows = []
    for ds, d in sorted(distances.items(), key=lambda kv: -(kv[1] or {}).get("confidence", -1)):
        rows.append([ds, expected.get(ds, ""), f"{d['confidence']:.3f}" if d else "n/a",
                     f"{d['classes_used']:.0f}" if d else "n/a", licenses.get(ds, "")])  # fmt: skip
    blocks.append(("table", (["dataset", "folklore", "ImageNet confidence", "classes used", "license"], rows)))
    blocks.append(("h2", "Recommended layer (chosen on val) against the test oracle"))
    rows = []
    for s in sorted(summaries, key=lambda s: (s.base, -((distances.get(s.dataset) or {}).get("confidence", 0)))):
        r, o = s.recommended, s.oracle
        rows.append([s.dataset, s.base, f"{r.layer} ({r.depth:.2f})", r.head,
                     f"{pct(r.test_accuracy)} [{pct(r.ci_low)}, {pct(r.ci_high)}]", f"{o.layer} ({o.depth:.2f})",
                     pct(o.test_accuracy), f"{s.gap_points:.1f}",
                     f"{100 * (o.test_accuracy - s.worst.test_accuracy):.1f}",
                     "n/a" if s.random_best is None else pct(s.random_best.test_accuracy),
                     "n/a" if np.isnan(s.logme_spearman) else f"{s.logme_spearman:+.2f}"])  # fmt: skip
    blocks.append(("table", (["dataset", "base", "recommended (depth)", "head", "test % [95% CI]",
                              "oracle (depth)", "oracle test %", "gap (pts)", "best-worst (pts)",
                              "random-init test %", "LogME ρ"], rows)))  # fmt: skip
    if beyond:
        blocks.append(("h2", "Beyond frozen features: augmented views and fine-tuning"))
        blocks.append(("p", "Each route against the frozen head it starts from, on the same test images: the gain is "
                            "the mean paired difference in correctness, with a paired 95% bootstrap interval. An "
                            "interval that straddles 0 means the route did not measurably pay."))  # fmt: skip
        rows = []
        for (ds, base), routes in sorted(beyond.items()):
            for r in routes:
                lo, hi = r["test_ci95"]
                glo, ghi = r["gain_ci95_points"]
                gain = f"{r['gain_points']:+.1f} [{glo:+.1f}, {ghi:+.1f}]"
                rows.append([ds, base, r["route"], r["head"], f"{r['layer']} ({r['depth']:.2f})", r["detail"],
                             pct(r["val_accuracy"]), f"{pct(r['test_accuracy'])} [{pct(lo)}, {pct(hi)}]",
                             pct(r["frozen_test_accuracy"]), gain])  # fmt: skip
        blocks.append(("table", (["dataset", "base", "route", "model", "layer (depth)", "how", "val %",
                                  "test % [95% CI]", "frozen test %", "gain pts [95% CI]"], rows)))  # fmt: skip
    blocks.append(("h2", "Every layer"))
    blocks.append(("p", "Test accuracy of each head; ✓ marks the head selected on val at that layer. LogME from the "
                        "cached train features, no training."))  # fmt: skip
    for (ds, base), pts in sorted(curves.items()):
        heads = sorted({h for p in pts for h in p.heads})
        rows = [[p.layer, f"{p.depth:.2f}", "" if p.logme is None else f"{p.logme:.3f}"]
                + [f"{pct(p.heads[h][1])}{' ✓' if h == p.head else ''}" if h in p.heads else "" for h in heads]
                for p in pts]  # fmt: skip
        blocks.append(("h3", f"{ds} × {base}"))
        blocks.append(("table", (["layer", "depth", "LogME", *heads], rows)))
    return blocks


def _markdown(blocks: list[tuple[str, Any]]) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content)
        elif kind == "p":
            out.append(content)
        elif kind == "img":
            out.append(f"![{content}]({content})")
        else:
            header, rows = content
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple[str, Any]], images: dict[str, Path]) -> str:
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>featurecache: which layer?</title>",
           "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.45}"
           "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}"
           "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}</style></head><body>"]  # fmt: skip
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(content)}</p>")
        elif kind == "img":
            data = base64.b64encode(images[content].read_bytes()).decode()
            out.append(f"<img alt='{html.escape(content)}' src='data:image/png;base64,{data}'>")
        else:
            header, rows = content
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
