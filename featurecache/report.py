"""The layer comparison's reports: one per dataset (the answer first), plus a cross-dataset page.

``reports/compare/<dataset>/``: ``report.md``, ``report.html`` (figure inline, opens offline),
``accuracy_vs_depth.png``, ``results.csv`` (every head) and ``summary.json`` (the answer as data).
``reports/compare/``: the same for all datasets of the run, with one small-multiples figure. The numbers come
from :mod:`featurecache.answer`, the words from :mod:`featurecache.advice`; this module only renders them.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import logging
import math
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache import store
from featurecache.advice import explain, gain_text, names, transfer_sentence
from featurecache.answer import (
    ALPHA,
    Answer,
    Comparison,
    HeadResult,
    LabelReader,
    compute_answer,
    is_frozen_plain,
    result_of_record,
    versus_recommended,
)
from featurecache.config import Paths
from featurecache.fileio import atomic_write_text
from featurecache.freshness import current_heads
from featurecache.heads import AUGMENTED_SUFFIX, FINETUNED_PREFIX
from featurecache.layer_scores import SCORES, UNDEFINED_WITHOUT_SPREAD, cross_dataset_summary, layer_tau_table
from featurecache.metrics import paired_difference, pts
from featurecache.plots import PAGE_WIDTH_PX, plot_answers
from featurecache.records import KEPT_FROZEN_NOTE
from featurecache.selection import candidate_of_record, pick_best
from featurecache.weights import is_control

log = logging.getLogger(__name__)

REFERENCE_BASE = "efficientnet_lite0"  # its ImageNet classifier measures how far a dataset is from ImageNet
FIGURE = "accuracy_vs_depth.png"

Block = tuple[str, Any]  # ("h1"|"h2"|"h3"|"p"|"box"|"ul"|"img"|"table", content)


def imagenet_distance(dataset: str, paths: Paths) -> dict[str, float] | None:
    """How the pretrained ImageNet classifier sees a dataset, from its cached logits (train split).

    ``confidence`` is the mean max-softmax probability (near-ImageNet photos get confident predictions);
    ``distance`` is 1 - confidence; ``classes_used`` is exp(entropy) of the mean predicted distribution (how
    spread the predictions are over ImageNet's 1000 classes).
    """
    path = paths.feature_file(dataset, REFERENCE_BASE, "train")
    logits_key = store.imagenet_logits_key(store.read_metadata(path)) if path.is_file() else None
    if logits_key is None:
        return None
    logits, _, _ = store.load_features(path, logits_key)
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


def spearman_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided permutation p-value of :func:`spearman`: every pairing up to 7 points (exact), else 9,999 seeded
    ones. With a handful of datasets rho takes few values (at 3 points only +-1 and +-0.5), so the p-value, not rho,
    says whether a trend is there."""
    from scipy.stats import permutation_test, spearmanr

    if math.isnan(spearman(a, b)):
        return float("nan")
    result = permutation_test((list(a),), lambda x: spearmanr(x, b).statistic, permutation_type="pairings",
                              n_resamples=9999, rng=0)  # fmt: skip
    return float(result.pvalue)


# ------------------------------------------------------------------------------------------- beyond frozen


def beyond_frozen(answer: Answer, paths: Paths) -> list[Comparison]:
    """Fine-tuned models, and each base's best head trained with augmented views, each against the frozen head it
    starts from (same base, layer and head kind) on the same test images: paired difference with its 95% interval.
    Every pretrained base of the comparison, not the recommended one alone (with two bases, the routes saved under
    the other one went unreported)."""
    labels = LabelReader()
    return [
        row for base in answer.heads if not is_control(base) for row in _routes(answer.dataset, base, paths, labels)
    ]


def _routes(dataset: str, base: str, paths: Paths, labels: LabelReader) -> list[Comparison]:
    routes, plain = [], {}
    for _directory, r in current_heads(paths.head_dirs(dataset, base), paths):
        if not is_frozen_plain(r.head):
            routes.append(r)
        else:
            plain[(r.layer, r.head)] = r
    augmented = [r for r in routes if not r.head.startswith(FINETUNED_PREFIX)]
    chosen = [r for r in routes if r.head.startswith(FINETUNED_PREFIX)] + (
        [pick_best(augmented, candidate_of_record)] if augmented else []
    )
    rows = []
    for r in chosen:
        start = plain.get((r.layer, r.head.removeprefix(FINETUNED_PREFIX).removesuffix(AUGMENTED_SUFFIX)))
        if start is None or "predictions" not in r.test:
            log.warning("cannot compare %s at %s / %s with its frozen head (missing, or saved without predictions)",
                        r.head, base, r.layer)  # fmt: skip
            continue
        result, frozen = result_of_record(r, labels, paths), result_of_record(start, labels, paths)
        route = "fine-tuned" if r.head.startswith(FINETUNED_PREFIX) else "augmented views"
        rows.append(Comparison(result, frozen, paired_difference(result.test_correct, frozen.test_correct), route))
    return rows


# ------------------------------------------------------------------------------------------- blocks


def answer_block(answer: Answer) -> list[str]:
    """The answer as lines of markdown: the recommendation, the tie set, the sentence, transfer, the 2x2 rule."""
    rec, q = answer.recommended, answer.quadrant
    lo, hi = rec.test_interval
    n_test = len(rec.test_correct)
    lines = [
        f"**Recommended: `{rec.name(with_base=True)}`**: test {pts(rec.test_accuracy)}% [{pts(lo)}, {pts(hi)}] "
        f"(95% Wilson, {n_test} test images), chosen on val ({pts(rec.val_accuracy)}%).",
        f"**Tied with it** ({len(answer.ties)} of {_candidates(answer)} other heads not significantly different on the "
        f"same test images; two-sided exact McNemar, Holm-adjusted over them, α = {ALPHA}): "
        + (names(answer.ties, with_base=answer.several_bases, accuracy=True, limit=8) if answer.ties else "none."),
        answer.sentence,
        f"**Does transfer help?** {transfer_sentence(answer)}",
    ]  # fmt: skip
    if q is not None and q.confidence is not None:
        lines.append(
            f"**The 2×2 rule:** {q.size} ({q.images_per_class} train images in the smallest class) and "
            f"{'similar to' if q.similarity == 'similar' else 'different from'} ImageNet (classifier confidence "
            f"{q.confidence:.2f}) → {q.advice}; the measurement {q.verdict}."
        )
    if answer.finetune is not None:
        lines.append(_finetune_line(answer.finetune))
    return lines


def _finetune_line(f: Comparison) -> str:
    """compare-layers --finetune in one line; a model that kept its frozen head says so before any number, as its
    gain over the recommendation is then no gain of fine-tuning's."""
    scores = (
        f"test {pts(f.result.test_accuracy)}%, {f.gain.points()} points over the recommendation (paired 95% interval)"
    )
    if not f.result.kept_frozen:
        return f"**Fine-tuning** (`{f.result.name()}`): {scores}."
    start = f"{f.result.layer} / {f.result.head.removeprefix(FINETUNED_PREFIX)}"
    return (
        f"**Fine-tuning** (`{f.result.name()}`) kept the frozen head it started from (`{start}`): no epoch beat it "
        f"on val, so this model is that frozen head, not a fine-tuned one; {scores}."
    )


def _depth(r: HeadResult) -> str:
    return f"{r.n_taps} taps" if r.multi_tap else f"{r.depth:.2f}"


def _candidates(answer: Answer) -> int:
    return len(answer.compared) - 1


def dataset_blocks(answer: Answer, paths: Paths, *, command: str = "") -> list[Block]:
    """The per-dataset report: the answer first, then warnings, the figure, and every number behind them."""
    blocks: list[Block] = [
        ("h1", f"{answer.dataset}: which layer, which head, and how sure"),
        ("p", f"Generated by `{command}`." if command else "Generated by featurecache."),
        ("h2", "The answer"),
        ("box", answer_block(answer)),
    ]
    if answer.warnings:
        blocks += [("h2", "Warnings"), ("ul", answer.warnings)]
    blocks += [("img", FIGURE), *_tie_table(answer), *_control_table(answer), *_multilayer_table(answer)]
    blocks += _beyond_table(answer)
    blocks += _score_blocks(answer)
    blocks += _layer_tables(answer)
    return blocks


def _tie_table(answer: Answer) -> list[Block]:
    rec = answer.recommended
    p = {id(r): p for r, p in versus_recommended(rec, answer.compared)}
    rows = [[f"`{r.name(with_base=answer.several_bases)}`", _depth(r), pts(r.val_accuracy),
             f"{pts(r.test_accuracy)} [{pts(r.test_interval[0])}, {pts(r.test_interval[1])}]",
             "–" if r is rec else f"{p[id(r)]:.3f}"]
            for r in [rec, *answer.ties]]  # fmt: skip
    return [("h2", "The recommendation and its tie set"),
            ("p", "p = two-sided exact McNemar p-value that the head is as accurate as the recommendation on the same "
                  f"test images, Holm-adjusted over the {_candidates(answer)} heads compared; every row has p ≥ "
                  f"{ALPHA}. Heads significantly better are named under Warnings."),
            ("table", (["head", "depth", "val %", "test % [95% Wilson]", "p (Holm)"], rows))]  # fmt: skip


def _control_table(answer: Answer) -> list[Block]:
    t = answer.transfer
    rows = []
    for label, r in (("random-init base", t.random_init), ("raw pixels", t.pixels)):
        if r is not None:
            rows.append([label, f"`{r.name()}`", pts(r.val_accuracy), pts(r.test_accuracy)])
    rows.append(["chance (largest class)", "", "", pts(t.chance)])
    return [("h2", "Does transfer help at all?"), ("p", transfer_sentence(answer)),
            ("table", (["control", "best head (val)", "val %", "test %"], rows))]  # fmt: skip


def _multilayer_table(answer: Answer) -> list[Block]:
    rows = [[f"`{m.result.name(with_base=True)}`", pts(m.result.val_accuracy), pts(m.result.test_accuracy),
             f"`{m.reference.name()}`", pts(m.reference.test_accuracy), m.gain.points()]
            for m in answer.multilayer]  # fmt: skip
    if not rows:
        return []
    return [("h2", "A head on several layers at once"),
            ("p", "The multilayer head (the stage taps trained, standardized per tap, features selected on train "
                  "with the kept fraction swept on val, then logistic regression) against the best single-layer head "
                  "chosen on val, on the same test images (paired 95% interval, Newcombe's hybrid score). One planned "
                  "comparison, not adjusted for the other heads as the tie set is, so the two can differ near the "
                  "edge."),
            ("table", (["multilayer", "val %", "test %", "best single layer (val)", "its test %",
                        "difference pts [95% CI]"], rows))]  # fmt: skip


def _beyond_table(answer: Answer) -> list[Block]:
    rows = [[r.route, f"`{r.result.name(with_base=answer.several_bases)}`"
             + (f" ({KEPT_FROZEN_NOTE})" if r.result.kept_frozen else ""),
             pts(r.result.val_accuracy), pts(r.result.test_accuracy), pts(r.reference.test_accuracy), r.gain.points()]
            for r in answer.beyond]  # fmt: skip
    if not rows:
        return []
    return [("h2", "Beyond frozen features"),
            ("p", "Each route against the frozen head it starts from (same layer and head) on the same test images, "
                  "paired 95% interval; an interval that straddles 0 means it did not measurably pay."),
            ("table", (["route", "model", "val %", "test %", "frozen test %", "gain pts [95% CI]"], rows))]  # fmt: skip


def _layer_tables(answer: Answer) -> list[Block]:
    blocks: list[Block] = [("h2", "Every layer"),
                           ("p", "Test accuracy of each head; ✓ = the head chosen on val at that layer, = = tied with "
                                 "the recommendation, ★ = the recommendation.")]  # fmt: skip
    tied = {(r.base, r.layer, r.head) for r in answer.ties}
    for base, heads in answer.heads.items():
        head_names = sorted({r.head for r in heads if not r.multi_tap})
        rows = []
        for chosen in answer.curves[base]:
            at = {r.head: r for r in heads if r.layer == chosen.layer}
            cells = [_cell(at.get(h), chosen, answer.recommended, tied) for h in head_names]
            rows.append([f"`{chosen.layer}`", f"{chosen.depth:.2f}", *cells])
        blocks += [("h3", base), ("table", (["layer", "depth", *head_names], rows))]
    return blocks


def _score_blocks(answer: Answer) -> list[Block]:
    """Training-free scores per layer and how well each ranks the layers (Kendall tau against trained accuracy)."""
    table = answer.layer_scores
    if table is None:
        return []
    undefined = [s for s in SCORES if s in table.scores and all(math.isnan(v) for v in table.scores[s].values())]
    score_names = [s for s in SCORES if s in table.scores and s not in undefined]
    rows = [[f"`{k}`", f"{table.relative_depth[k]:.2f}", pts(table.test_accuracy[k]),
             *[f"{table.scores[s].get(k, float('nan')):.3f}" for s in score_names]] for k in table.layers]  # fmt: skip
    agree = [[s, _tau(table.agreement[s].kendall_tau), _tau(table.agreement[s].weighted_tau),
              ", ".join(f"`{k}`" for k in table.agreement[s].top), "yes" if table.agreement[s].best_in_top else "no",
              f"{table.scoring_seconds.get(s, float('nan')):.1f}"] for s in score_names]  # fmt: skip
    return [("h2", "Which layer, before training anything"),
            ("p", f"Scores computed from the cached train features of {table.base_tag} alone (no training), against "
                  f"the test accuracy of each layer's val-selected head. The trained-best layer (chosen on val) is "
                  f"`{table.best_layer}`"
                  + (f" (the same val accuracy as {', '.join(f'`{k}`' for k in table.tied_with_best)}: a top 3 "
                     "holding any of them counts)" if table.tied_with_best else "")
                  + f"; training the heads on these layers took {table.training_seconds:.0f} s."
                  + (f" {', '.join(undefined)}: undefined here (no class has two train images to measure spread "
                     f"within classes)." if undefined and set(undefined) <= set(UNDEFINED_WITHOUT_SPREAD) else "")
                  + (f" {', '.join(undefined)}: undefined here." if set(undefined) - set(UNDEFINED_WITHOUT_SPREAD)
                     else "")),
            ("table", (["layer", "depth", "test %", *score_names], rows)),
            ("table", (["score", "Kendall τ", "weighted τ", "top 3", "best layer in top 3", "seconds"],
                       agree))]  # fmt: skip


def _cell(r: HeadResult | None, chosen: HeadResult, rec: HeadResult, tied: set) -> str:
    if r is None:
        return ""
    marks = ("✓" if r is chosen else "") + ("★" if r is rec else "=" if (r.base, r.layer, r.head) in tied else "")
    return f"{pts(r.test_accuracy)} {marks}".strip()


# ------------------------------------------------------------------------------------------- data files


def answer_summary(answer: Answer) -> dict[str, Any]:
    """The answer as JSON-able data (``summary.json``)."""

    def head(r: HeadResult | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"base": r.base, "layer": r.layer, "head": r.head, "depth": r.depth, "val_accuracy": r.val_accuracy,
                "test_accuracy": r.test_accuracy, "test_ci95": list(r.test_interval),
                "n_test": len(r.test_correct)}  # fmt: skip

    t = answer.transfer
    return {
        "dataset": answer.dataset,
        "recommended": head(answer.recommended),
        "ties": [head(r) for r in answer.ties],
        "tie_test": f"two-sided exact McNemar on the same test images, Holm-adjusted over the heads, alpha {ALPHA}",
        "better_on_test": [head(r) for r in answer.better_on_test],
        "copies_of_train": answer.copies_of_train,
        "val_ties": [head(r) for r in answer.val_ties],
        "sentence": answer.sentence,
        "warnings": answer.warnings,
        "transfer": {
            "random_init": head(t.random_init),
            "pixels": head(t.pixels),
            "chance": t.chance,
            "control": head(t.control),
            "gain": None if t.gain is None else list(t.gain),
            "verdict": t.verdict,
        },  # fmt: skip
        "quadrant": None if answer.quadrant is None else dataclasses.asdict(answer.quadrant),
        "finetune": None if answer.finetune is None else _finetune_summary(answer.finetune),
        "class_counts_min": answer.class_counts,
        "imagenet": answer.distance,
        "curves": {b: [head(r) for r in c] for b, c in answer.curves.items()},
        "multilayer": [
            {**head(m.result), "best_single": head(m.reference), "gain": list(m.gain)} for m in answer.multilayer
        ],
        "beyond_frozen": [
            {
                "route": r.route,
                **head(r.result),
                "kept_frozen": r.result.kept_frozen,
                "frozen": head(r.reference),
                "gain": list(r.gain),
            }
            for r in answer.beyond
        ],
        "seconds": answer.seconds,
        "layer_scores": None if answer.layer_scores is None else _tau_summary(answer.layer_scores),
    }


def _finetune_summary(finetune: Comparison) -> dict[str, Any]:
    return {"name": finetune.result.name(), "route": finetune.route, "test_accuracy": finetune.result.test_accuracy,
            "gain": list(finetune.gain), "verdict": finetune.gain.verdict,
            "kept_frozen": finetune.result.kept_frozen}  # fmt: skip


def _tau_summary(table: Any) -> dict[str, Any]:
    return {"base": table.base_tag, "layers": table.layers, "test_accuracy": table.test_accuracy,
            "best_layer": table.best_layer, "same_val_accuracy": table.tied_with_best, "scores": table.scores,
            "scoring_seconds": table.scoring_seconds,
            "training_seconds": table.training_seconds,
            "agreement": {s: {"kendall_tau": a.kendall_tau, "weighted_tau": a.weighted_tau, "top": a.top,
                              "best_in_top": a.best_in_top} for s, a in table.agreement.items()}}  # fmt: skip


def results_csv(answers: Sequence[Answer]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "base", "layer", "relative_depth", "head", "val_accuracy", "test_accuracy",
                     "test_ci_low", "test_ci_high", "selected_at_layer", "recommended", "tied"])  # fmt: skip
    for a in answers:
        tied = {id(r) for r in a.ties}
        chosen = {id(r) for c in a.curves.values() for r in c}
        for heads in a.heads.values():
            for r in heads:
                writer.writerow([a.dataset, r.base, r.layer, r.depth, r.head, round(r.val_accuracy, 4),
                                 round(r.test_accuracy, 4), round(r.test_interval[0], 4), round(r.test_interval[1], 4),
                                 id(r) in chosen, r is a.recommended, id(r) in tied])  # fmt: skip
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- writing


def build_report(datasets: Sequence[str], base_tags: Sequence[str], paths: Paths, *, command: str = "") -> list[Answer]:
    """Answer and report ``datasets`` from what is already saved (no extraction, no training); returns the answers."""
    answers = [explain(compute_answer(ds, base_tags, paths, distance=imagenet_distance(ds, paths))) for ds in datasets]
    for answer in answers:
        write_dataset_report(answer, paths, command=command)
    if len(answers) > 1:
        write_index(answers, paths, command=command)
    return answers


def write_dataset_report(answer: Answer, paths: Paths, *, command: str = "") -> Path:
    """Write ``reports/compare/<dataset>/``; returns the folder."""
    answer.beyond = beyond_frozen(answer, paths)
    answer.layer_scores = layer_tau_table(answer.dataset, answer.recommended.base, paths, scope=answer.scope)
    out = paths.compare_dir(answer.dataset)
    out.mkdir(parents=True, exist_ok=True)
    plot_answers([answer], out / FIGURE, reference=REFERENCE_BASE)
    blocks = dataset_blocks(answer, paths, command=command)
    atomic_write_text(paths.compare_report(answer.dataset, ".md"), render_markdown(blocks))
    atomic_write_text(
        paths.compare_report(answer.dataset), render_html(blocks, {FIGURE: out / FIGURE}, title=answer.dataset)
    )
    atomic_write_text(out / "results.csv", results_csv([answer]))
    atomic_write_text(out / "summary.json", json.dumps(answer_summary(answer), indent=1, default=float))
    return out


def write_index(answers: Sequence[Answer], paths: Paths, *, command: str = "") -> Path:
    """Write the cross-dataset page ``reports/compare/`` (one row and one panel per dataset)."""
    out = paths.compare_dir()
    out.mkdir(parents=True, exist_ok=True)
    plot_answers(answers, out / FIGURE, reference=REFERENCE_BASE)
    rows = []
    for a in answers:
        r, q = a.recommended, a.quadrant
        rows.append([a.dataset, f"`{r.name(with_base=a.several_bases)}`", _depth(r),
                     f"{pts(r.test_accuracy)} [{pts(r.test_interval[0])}, {pts(r.test_interval[1])}]",
                     f"{len(a.ties)} of {_candidates(a)}",
                     gain_text(a.transfer.gain), f"{q.size}/{q.similarity}" if q else "n/a", str(len(a.warnings)),
                     f"[report]({urllib.parse.quote(a.dataset)}/report.html)"])  # fmt: skip
    blocks: list[Block] = [
        ("h1", "Which layer transfers? The answer per dataset"),
        ("p", f"Generated by `{command}`." if command else "Generated by featurecache."),
        ("table", (["dataset", "recommended (val)", "depth", "test % [95% Wilson]", "tied", "gain over best control",
                    "2×2 cell", "warnings", "details"], rows)),
        ("p", _reading(answers)),
        ("img", FIGURE),
    ]  # fmt: skip
    for a in answers:
        blocks += [("h2", a.dataset), ("box", [a.sentence, *[f"⚠ {w}" for w in a.warnings]])]
    blocks += _score_summary_blocks(answers)
    atomic_write_text(paths.compare_report(suffix=".md"), render_markdown(blocks))
    atomic_write_text(paths.compare_report(), render_html(blocks, {FIGURE: out / FIGURE}, title="compare-layers"))
    atomic_write_text(out / "results.csv", results_csv(answers))
    atomic_write_text(out / "summary.json", json.dumps({"datasets": [answer_summary(a) for a in answers]}, indent=1))
    return out


def _tau(tau: float) -> str:
    """A rank correlation for a reader: undefined (nan) where every layer's test accuracy ties, which says so."""
    return "n/a (layers tie)" if math.isnan(tau) else f"{tau:+.2f}"


def _score_summary_blocks(answers: Sequence[Answer]) -> list[Block]:
    """The per-layer tau table averaged over datasets: which training-free score ranks layers best."""
    tables = [a.layer_scores for a in answers if a.layer_scores is not None]
    if len(tables) < 2:
        return []
    rows = [[name, _tau(s.mean_kendall_tau), _tau(s.mean_weighted_tau), f"{s.top_hits} of {s.n_datasets}",
             ", ".join(f"{d} {_tau(t)}" for d, t in s.per_dataset_tau.items())]
            for name, s in cross_dataset_summary(tables).items()]  # fmt: skip
    return [("h2", "Which layer before training: the training-free scores across datasets"),
            ("p", "Kendall τ between each score and the test accuracy of every layer's val-selected head, averaged "
                  "over datasets; top 3 = datasets whose trained-best layer, or one with the same val accuracy, is "
                  "among the score's three best."),
            ("table", (["score", "mean Kendall τ", "mean weighted τ", "best layer in top 3", "τ per dataset"],
                       rows))]  # fmt: skip


def _reading(answers: Sequence[Answer]) -> str:
    """Across datasets: does the recommended depth follow the measured distance from ImageNet?"""
    measured = [a for a in answers if a.distance and not a.recommended.multi_tap]  # a multi-tap head has no depth
    if len(measured) < 3:
        return "Fewer than three datasets with a measured ImageNet distance: no cross-dataset trend is computed."
    confidence, depth = [a.distance["confidence"] for a in measured], [a.recommended.depth for a in measured]
    rho, p = spearman(confidence, depth), spearman_p(confidence, depth)
    if math.isnan(rho):
        return (f"Across {len(measured)} datasets the recommended depth or the ImageNet confidence does not vary: no "
                "cross-dataset trend is computed.")  # fmt: skip
    trend = "a trend" if p < ALPHA else "no trend these datasets can tell from chance"
    return (f"Across {len(measured)} datasets, the recommended depth and the ImageNet classifier's confidence on the "
            f"data have a Spearman correlation of {rho:+.2f} (positive: nearer-to-ImageNet data prefers deeper "
            f"layers; permutation p = {p:.2f}: {trend}). Each dataset counts its recommended layer's depth only; its "
            f"tie set may span other depths.")  # fmt: skip


# ------------------------------------------------------------------------------------------- rendering


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + content)
        elif kind == "p":
            out.append(content)
        elif kind == "box":
            out.append("\n>\n".join(f"> {line}" for line in content))
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content))
        elif kind == "img":
            out.append(f"![{content}]({content})")
        else:
            header, rows = content
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---:" if numeric else "---" for numeric in _numeric_columns(header, rows)) + "|")
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        out.append("")
    return "\n".join(out)


NUMERIC = re.compile(r"^[+\-−]?\d[\d.]*( ?[✓★=]+| \[[^\]]*\])?$")
CSS = (f"body{{font-family:system-ui,sans-serif;max-width:{PAGE_WIDTH_PX}px;margin:2em auto;line-height:1.45;"
       "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.88em}"
       "td,th{border:1px solid #ccc;padding:3px 8px}"
       "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"
       "code{background:#f3f3f3;padding:0 3px;border-radius:3px}.answer{border-left:5px solid #1f77b4;"
       "background:#f5f9fd;padding:0.6em 1.2em;margin:1em 0}.answer p{margin:0.45em 0}li{margin:0.3em 0}")  # fmt: skip


def _numeric(cell: Any) -> bool:
    return bool(NUMERIC.match(str(cell).strip()))


def _numeric_columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[bool]:
    """Right-align a column when every filled cell of it is a number (blanks and dashes don't count)."""
    filled = [[c for c in col if str(c).strip() not in ("", "–", "n/a")] for col in zip(*rows, strict=True)]
    return [bool(cells) and all(_numeric(c) for c in cells) for cells in filled] if rows else [False] * len(header)


def inline(text: str) -> str:
    """Markdown inline markup (``code``, **bold**, [text](link)) as escaped HTML."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", text)


def render_html(blocks: Sequence[Block], images: dict[str, Path], *, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>featurecache: {html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>"]  # fmt: skip
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{inline(content)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{inline(content)}</p>")
        elif kind == "box":
            out.append("<div class='answer'>" + "".join(f"<p>{inline(line)}</p>" for line in content) + "</div>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in content) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(images[content].read_bytes()).decode()
            out.append(f"<img alt='{html.escape(content)}' src='data:image/png;base64,{data}'>")
        else:
            header, rows = content
            numeric = _numeric_columns(header, rows)
            out.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                cells = (f"<td class='num'>{inline(c)}</td>" if num else f"<td>{inline(c)}</td>"
                         for c, num in zip(row, numeric, strict=True))  # fmt: skip
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def terminal_lines(answer: Answer) -> list[str]:
    """The answer block for the terminal: plain text, backticks and bold markers removed."""
    plain = [re.sub(r"\*\*|`", "", line) for line in answer_block(answer)]
    return [f"== {answer.dataset} ==", *plain, *[f"WARNING: {re.sub('`', '', w)}" for w in answer.warnings]]
