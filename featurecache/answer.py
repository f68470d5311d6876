"""The answer for one dataset: which base, layer and head; how sure that is; whether transfer helps at all.

Read from what stages 1 and 2 saved (each head's sidecar keeps its per-image val and test predictions; the caches
keep the labels); nothing is trained here. The statistics:

* the recommendation is chosen on val by the one selection rule (:mod:`featurecache.selection`);
* its test accuracy carries a 95% Wilson interval (it does not collapse to a point at 0% or 100%);
* the **tie set** is every other (base, layer, head) whose accuracy on the same test images cannot be told from the
  recommendation's: two-sided exact McNemar tests on the discordant images, Holm-adjusted over every head compared,
  alpha = 0.05 (uncorrected, ~20 equally good heads dropped one from the tie set, or named one "significantly
  better", in a quarter of answers); the significantly better ones are named apart, as the heads val missed;
* only the heads the comparison trained are ranked (:class:`Scope`): the answer is what its command gives on a
  fresh home, not whatever other heads are saved beside them;
* gains (pretrained over the best control, fine-tuned over the recommendation) are paired differences on the
  same test images with a paired 95% interval (Newcombe's hybrid score, :func:`featurecache.metrics.paired_difference`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurecache import store
from featurecache.config import Paths
from featurecache.errors import FeaturecacheError
from featurecache.freshness import cache_read, current_heads
from featurecache.heads import AUGMENTED_SUFFIX, FINETUNED_PREFIX
from featurecache.metrics import PairedGain, holm, mcnemar_p, paired_difference, wilson_interval
from featurecache.records import HeadRecord, retrain_command
from featurecache.selection import Candidate, pick_best, ranked
from featurecache.weights import PIXELS_TAG, is_control, is_random_tag, random_tag

log = logging.getLogger(__name__)

ALPHA = 0.05
MIN_IMAGES_PER_CLASS = 20  # below this in val or test, one image moves a class's accuracy by 5 points or more


@dataclass(frozen=True, eq=False)
class HeadResult:
    """One saved frozen head as the answer sees it: its selection fields and per-image correctness."""

    dataset: str
    base: str  # base tag (cache folder): efficientnet_lite0, efficientnet_lite0-random, raw-pixels
    layer: str
    head: str
    depth: float
    val_accuracy: float  # the selection score
    test_accuracy: float
    test_interval: tuple[float, float]  # Wilson 95%
    val_correct: np.ndarray
    test_correct: np.ndarray
    multi_tap: bool = False  # a head on several stage taps at once (``multilayer``): a candidate, not a curve point
    kept_frozen: bool = False  # a fine-tuned model that is its frozen head (HeadRecord.kept_frozen)
    n_taps: int = 1  # taps the head reads: every stage tap, or those a --layers / --shortlist run kept

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.base, self.layer, self.head, self.depth, self.val_accuracy)

    def name(self, *, with_base: bool = False) -> str:
        return f"{self.base} / {self.layer} / {self.head}" if with_base else f"{self.layer} / {self.head}"


def _candidate(result: HeadResult) -> Candidate:
    return result.candidate


def is_frozen_plain(head: str) -> bool:
    """Heads on frozen features of the plain train split: what the curves and the answer compare."""
    return not head.startswith(FINETUNED_PREFIX) and not head.endswith(AUGMENTED_SUFFIX)


class LabelReader:
    """Labels of the valid rows of cache files, read once per file."""

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, file: str) -> np.ndarray:
        if file not in self._cache:
            labels, _, valid = store.read_rows(file)
            self._cache[file] = labels[valid]
        return self._cache[file]


def result_of_record(record: HeadRecord, labels: LabelReader, paths: Paths) -> HeadResult:
    """A :class:`HeadResult` from a head's record (its per-image predictions) and its caches (the labels)."""
    correct = {}
    for split, scores in (("val", record.val), ("test", record.test)):
        predictions = scores.get("predictions")
        if predictions is None:
            raise FeaturecacheError(
                f"the {record.head} head at {record.dataset}/{record.base_tag}/{record.layer} was saved by an older "
                f"featurecache without per-image predictions; retrain it with `{retrain_command(record.to_json())}`"
            )
        correct[split] = np.asarray(predictions) == labels(str(cache_read(record, split, paths)))
    n_test = len(correct["test"])
    return HeadResult(
        dataset=record.dataset,
        base=record.base_tag,
        layer=record.layer,
        head=record.head,
        depth=float(record.tap["relative_depth"]),
        val_accuracy=float(record.selection_val_accuracy),
        test_accuracy=float(correct["test"].mean()),
        test_interval=wilson_interval(int(correct["test"].sum()), n_test),
        val_correct=correct["val"],
        test_correct=correct["test"],
        multi_tap=bool(record.tap.get("multi_tap", False)),
        kept_frozen=record.kept_frozen,
        n_taps=len(record.taps) if record.taps else 1,
    )


def head_results(dataset: str, base_tag: str, paths: Paths, labels: LabelReader | None = None) -> list[HeadResult]:
    """Every frozen plain head saved for ``dataset`` x ``base_tag``."""
    labels = labels or LabelReader()
    out = []
    for _directory, record in current_heads(paths.head_dirs(dataset, base_tag), paths):
        if is_frozen_plain(record.head):
            out.append(result_of_record(record, labels, paths))
    return out


def layer_curve(results: Sequence[HeadResult]) -> list[HeadResult]:
    """Per layer, the head chosen on val (the one rule), shallow to deep; multi-tap heads are no layer's point."""
    by_layer: dict[str, list[HeadResult]] = {}
    for r in results:
        if not r.multi_tap:
            by_layer.setdefault(r.layer, []).append(r)
    return sorted((pick_best(rs, _candidate) for rs in by_layer.values()), key=lambda r: (r.depth, r.layer))


def versus_recommended(
    recommended: HeadResult, others: Sequence[HeadResult], *, split: str = "test"
) -> list[tuple[HeadResult, float]]:
    """Each of ``others`` (the recommendation left out) with the p-value that it is as accurate as the recommendation
    on the same ``split`` images: two-sided exact McNemar, Holm-adjusted over all of them (one family per answer)."""
    rest = [r for r in others if r is not recommended]
    ref = getattr(recommended, f"{split}_correct")
    return list(zip(rest, holm([mcnemar_p(ref, getattr(r, f"{split}_correct")) for r in rest]), strict=True))


def tie_set(recommended: HeadResult, others: Sequence[HeadResult], *, split: str = "test") -> list[HeadResult]:
    """The ``others`` whose accuracy on ``split`` the test cannot tell from the recommendation's
    (:func:`versus_recommended`); one that is significantly more accurate is no tie but one val missed
    (:func:`significantly_better`)."""
    tied = [r for r, p in versus_recommended(recommended, others, split=split) if p >= ALPHA]
    return ranked(tied, _candidate)  # best first by the rule


def significantly_better(recommended: HeadResult, others: Sequence[HeadResult]) -> list[HeadResult]:
    """The ``others`` significantly *more* accurate on test than the recommendation: the val choice missed them."""
    more = int(recommended.test_correct.sum())
    return [r for r, p in versus_recommended(recommended, others) if p < ALPHA and int(r.test_correct.sum()) > more]


@dataclass(frozen=True)
class Scope:
    """The heads an answer ranks: those its comparison trained, so that ``compare-layers`` gives the same answer on
    a fresh home as on one where ``train-heads`` left other heads (mlp, knn) or a full run left heads on layers a
    ``--shortlist`` run dropped. Controls keep their own heads (the raw-pixel baseline is its logistic regression)."""

    heads: frozenset[str]
    layers: dict[str, frozenset[str]] = field(default_factory=dict)  # base tag -> layers trained; absent: every one
    tops: dict[str, str] = field(default_factory=dict)  # base tag -> its top stage tap, trained or not (--shortlist)

    def holds(self, result: HeadResult) -> bool:
        return self.admits(result.base, result.head, result.layer, multi_tap=result.multi_tap)

    def admits(self, base: str, head: str, layer: str, *, multi_tap: bool = False) -> bool:
        if base == PIXELS_TAG:
            return True
        if head not in self.heads:
            return False
        layers = self.layers.get(base)
        return layers is None or multi_tap or layer in layers


@dataclass
class TransferCheck:
    """Does pretraining help at all? The recommendation against controls on the same test images."""

    random_init: HeadResult | None  # the random-init base's best head (chosen on val)
    pixels: HeadResult | None  # logistic regression on downsampled pixels
    chance: float  # the majority class's share of test
    control: HeadResult | None = None  # the better control on val
    gain: PairedGain | None = None  # recommended minus control

    @property
    def verdict(self) -> str:
        return "unmeasured" if self.gain is None else self.gain.verdict


@dataclass(frozen=True)
class Quadrant:
    """The dataset's cell of the 2x2 rule of thumb (size x similarity to ImageNet), what the rule advises there, and
    whether the measured curve agrees (:func:`featurecache.advice.quadrant`)."""

    size: str  # "small" or "large": train images in the smallest class
    images_per_class: int
    similarity: str  # "similar", "different", or "unknown" without ImageNet logits cached
    confidence: float | None  # the reference classifier's mean top-1 probability on the images
    advice: str
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """A head against the one it is measured from, on the same test images: a multilayer head against the best
    single layer, a fine-tuned or augmented-views model against its frozen start, fine-tuning against the
    recommendation."""

    result: HeadResult
    reference: HeadResult
    gain: PairedGain  # result minus reference
    route: str = ""  # how the result was reached, where it says more than its name ("fine-tuned", ...)


def transfer_check(
    heads: dict[str, list[HeadResult]], recommended: HeadResult, paths: Paths, labels: LabelReader
) -> TransferCheck:
    """The recommendation against the best random-init head and the raw-pixel baseline (``heads`` by base tag)."""
    randoms = [r for tag, rs in heads.items() if is_random_tag(tag) for r in rs]
    pixels = heads.get(PIXELS_TAG, [])
    check = TransferCheck(
        random_init=pick_best(randoms, _candidate) if randoms else None,
        pixels=pick_best(pixels, _candidate) if pixels else None,
        chance=majority_share(labels, recommended, paths),
    )
    controls = [c for c in (check.random_init, check.pixels) if c is not None]
    if controls:
        check.control = pick_best(controls, _candidate)
        check.gain = paired_difference(recommended.test_correct, check.control.test_correct)
    return check


def majority_share(labels: LabelReader, recommended: HeadResult, paths: Paths) -> float:
    """The largest class's share of the test images: the accuracy of always answering it."""
    y = labels(str(paths.feature_file(recommended.dataset, recommended.base, "test")))
    return float(np.bincount(y).max() / len(y)) if len(y) else float("nan")


def class_counts(dataset: str, base_tag: str, paths: Paths) -> dict[str, dict[str, int]]:
    """Per split, the number of readable images of each class (valid rows), by class name."""
    out = {}
    for split in ("train", "val", "test"):
        labels, _, valid = store.read_rows(paths.feature_file(dataset, base_tag, split))
        names = store.read_metadata(paths.feature_file(dataset, base_tag, split))["class_names"]
        out[split] = dict(zip(names, np.bincount(labels[valid], minlength=len(names)).tolist(), strict=True))
    return out


@dataclass
class Answer:
    """Everything the report and the terminal say about one dataset."""

    dataset: str
    recommended: HeadResult
    ties: list[HeadResult]  # neither significantly worse nor better on test (the recommendation excluded)
    better_on_test: list[HeadResult]  # significantly better on test: the val choice missed them
    val_ties: list[HeadResult]  # other layers' val-selected heads not significantly different on val
    curves: dict[str, list[HeadResult]]  # base tag (controls included) -> val-selected head per layer
    heads: dict[str, list[HeadResult]]  # base tag (controls included) -> every frozen head (the same objects)
    transfer: TransferCheck
    class_counts: dict[str, int]  # smallest class per split
    n_classes: int
    distance: dict[str, float] | None  # ImageNet confidence of the reference classifier (featurecache.report)
    quadrant: Quadrant | None = None  # filled with the words (featurecache.advice.explain)
    finetune: Comparison | None = None  # fine-tuned from the recommendation, against it (compare-layers --finetune)
    beyond: list[Comparison] = field(default_factory=list)  # fine-tuned / +aug routes (featurecache.report)
    multilayer: list[Comparison] = field(default_factory=list)  # multi-tap heads vs the best single layer
    layer_scores: Any = None  # featurecache.layer_scores.LayerTauTable of the recommended base (the report adds it)
    sentence: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the comparison that produced it (extraction and training included)
    copies_of_train: dict[str, int] = field(default_factory=dict)  # split -> images byte-identical to train ones
    untested: dict[str, list[str]] = field(default_factory=dict)  # val/test -> classes with no readable image there
    scope: Scope | None = None  # the heads ranked (None: every current one); the report's other tables keep to it

    @property
    def compared(self) -> list[HeadResult]:
        """Every pretrained head the answer ranks, the recommendation included: the family its tests adjust over."""
        return [r for base, rs in self.heads.items() if not is_control(base) for r in rs]

    @property
    def several_bases(self) -> bool:
        """More than one pretrained base was compared (names then carry the base)."""
        return sum(not is_control(b) for b in self.curves) > 1


def compute_answer(
    dataset: str,
    bases: Sequence[str],
    paths: Paths,
    *,
    distance: dict[str, float] | None = None,
    scope: Scope | None = None,
) -> Answer:
    """The answer for ``dataset`` over the pretrained ``bases`` (base tags), read from the saved heads: those in
    ``scope``, or every current one without it (``featurecache.report.build_report``)."""
    labels = LabelReader()

    def saved(tag: str) -> list[HeadResult]:
        return [r for r in head_results(dataset, tag, paths, labels) if scope is None or scope.holds(r)]

    results = [r for b in bases for r in saved(b)]
    if not results:
        raise FeaturecacheError(
            f"no trained heads for {dataset} x {', '.join(bases)} under {paths.models / dataset}; run "
            f"`featurecache compare-layers {dataset}` (it extracts and trains first)"
        )
    recommended = pick_best(results, _candidate)
    heads = {b: [r for r in results if r.base == b] for b in bases}
    for tag in [random_tag(b) for b in bases] + [PIXELS_TAG]:
        if control := saved(tag):
            heads[tag] = control
    curves = {b: layer_curve(rs) for b, rs in heads.items() if rs}
    same_base_curve = curves[recommended.base]
    per_class = class_counts(dataset, recommended.base, paths)
    answer = Answer(
        dataset=dataset,
        recommended=recommended,
        ties=tie_set(recommended, results),
        better_on_test=significantly_better(recommended, results),
        val_ties=[r for r in tie_set(recommended, same_base_curve, split="val") if r.layer != recommended.layer],
        curves=curves,
        heads=heads,
        transfer=transfer_check(heads, recommended, paths, labels),
        class_counts={split: min(counts.values()) for split, counts in per_class.items()},
        untested={
            split: [c for c, n in counts.items() if n == 0]
            for split, counts in per_class.items()
            if split != "train" and 0 in counts.values()
        },  # fmt: skip
        n_classes=len(per_class["test"]),  # every split of a cache holds every class name
        distance=distance,
        scope=scope,
    )
    answer.multilayer = multilayer_comparisons(heads, bases)
    return answer


def multilayer_comparisons(heads: dict[str, list[HeadResult]], bases: Sequence[str]) -> list[Comparison]:
    """Each multi-tap head against the best single-layer head of its base (chosen on val), on the same test
    images: paired difference with its 95% interval."""
    out = []
    for base in bases:
        single = [r for r in heads.get(base, []) if not r.multi_tap]
        for multi in (r for r in heads.get(base, []) if r.multi_tap):
            if single:
                best = pick_best(single, _candidate)
                gain = paired_difference(multi.test_correct, best.test_correct)
                out.append(Comparison(result=multi, reference=best, gain=gain))
    return out
