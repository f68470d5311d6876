"""The answer in words: the plain sentence, the warnings, and the classic 2x2 rule held against the measurement.

The 2x2 rule of thumb (cs231n "Transfer Learning"; Yosinski et al. 2014): a *small* dataset *similar* to ImageNet
wants a linear classifier on top-layer features; small and *different* wants features from earlier layers; a
*large* dataset can afford fine-tuning. Size is the smallest class's train images; similarity is measured, not
assumed: the mean max-softmax confidence of EfficientNet-Lite0's ImageNet classifier on the train images
(:func:`featurecache.report.imagenet_distance`).
"""

from __future__ import annotations

from collections.abc import Sequence

from featurecache.answer import ALPHA, MIN_IMAGES_PER_CLASS, Answer, HeadResult, Quadrant
from featurecache.metrics import PairedGain, mcnemar_p, pts
from featurecache.selection import pick_best

# "Large" is where fine-tuning a CNN stops overfitting quickly; cs231n gives no number, ~1000 per class is ImageNet's
# own scale per class and the usual reading of the rule.
LARGE_IMAGES_PER_CLASS = 1000
# ImageNet-classifier confidence at or above which a dataset counts as similar to ImageNet. Measured on the six
# offline datasets (BENCHMARKS.md, "Layer comparison"): digits/MNIST-like sets score 0.2-0.35, real photos above 0.5.
SIMILAR_CONFIDENCE = 0.45
EARLY_DEPTH = 0.4  # relative depth below which a layer is called "early"
UPPER_DEPTH = 0.85  # from here to just below the top tap, "upper"; between the two, "middle"
MAX_NAMES = 4  # names listed in a sentence before "and N more"

RULE = {
    ("small", "similar"): ("a linear classifier on top-layer features", "top"),
    ("small", "different"): ("a classifier on features from earlier layers", "earlier"),
    ("large", "similar"): ("fine-tune the top of the base", "finetune"),
    ("large", "different"): ("fine-tune more of the base", "finetune"),
}


def names(
    results: Sequence[HeadResult], *, with_base: bool = False, accuracy: bool = False, limit: int = MAX_NAMES
) -> str:
    """```a / h`, `b / h` and 3 more``, optionally each with its test accuracy."""
    shown = [f"`{r.name(with_base=with_base)}`" + (f" {pts(r.test_accuracy)}%" if accuracy else "")
             for r in results[:limit]]  # fmt: skip
    more = len(results) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def top_layer(answer: Answer) -> HeadResult:
    """The val-selected head at the deepest tap of the recommended base."""
    return answer.curves[answer.recommended.base][-1]


def untrained_top(answer: Answer) -> str | None:
    """The recommended base's top stage tap when this comparison trained no head on it (``--shortlist`` kept lower
    layers): then its deepest trained layer is no "top", and nothing measures a gap to the top."""
    top = answer.scope.tops.get(answer.recommended.base) if answer.scope is not None else None
    return top if top is not None and top != top_layer(answer).layer else None


def region(answer: Answer, result: HeadResult) -> str:
    if result.layer == top_layer(answer).layer and untrained_top(answer) is None:
        return "top"
    return "early" if result.depth < EARLY_DEPTH else "middle" if result.depth < UPPER_DEPTH else "upper"


def sentence(answer: Answer) -> str:
    """One plain sentence: where the layer val chose sits, how far it is from the top on test, whether that gap is
    noise, what test found better (val missed it) and what is tied with it."""
    rec = answer.recommended
    if rec.multi_tap:
        text = _multi_tap_sentence(answer)
    elif untrained_top(answer) is not None:
        where = region(answer, rec)
        text = (f"For this data val chose {_a_layer(where, rec, f', depth {rec.depth:.2f}')} among the layers "
                f"trained; the top layer (`{untrained_top(answer)}`) was not trained here (--shortlist), so no gap to "
                "it is measured")  # fmt: skip
    elif region(answer, rec) == "top":
        text = _top_sentence(answer)
    else:
        text = _lower_sentence(answer)
    if answer.better_on_test:
        them = "it" if len(answer.better_on_test) == 1 else "them"
        text += (f"; but {names(answer.better_on_test, with_base=answer.several_bases)} scored significantly higher "
                 f"on test (val missed {them})")  # fmt: skip
    if answer.ties:
        verb = "is" if len(answer.ties) == 1 else "are"
        return text + f"; {names(answer.ties, with_base=answer.several_bases)} {verb} tied with it."
    return text + "; nothing else is statistically tied with it."


def _top_sentence(answer: Answer) -> str:
    """Val chose the top layer: the runner-up as val ranks it (the one rule, never the test scores), and its gap."""
    rec = answer.recommended
    text = f"For this data val chose the top layer (`{rec.layer}`)"
    lower = [r for r in answer.curves[rec.base] if r.layer != rec.layer]
    if not lower:
        return text
    runner = pick_best(lower, lambda r: r.candidate)
    gap = 100 * (rec.test_accuracy - runner.test_accuracy)
    side = "below" if gap >= 0 else "above"
    return (
        text
        + f"; the best lower layer on val (`{runner.layer}`) is {abs(gap):.1f} points {side} it on test"
        + _noise(answer, [runner] if _tied(answer, runner) else [])
    )


def _lower_sentence(answer: Answer) -> str:
    """Val chose a layer below the top: its gap to the top layer's val-chosen head; "beats" only when no head at the
    top layer is tied with it or better (one tied top head makes the gap noise, whatever the val-chosen one did)."""
    rec, top = answer.recommended, top_layer(answer)
    where = region(answer, rec)
    layer = _a_layer(where, rec)
    tied_top = [r for r in answer.ties if r.base == rec.base and r.layer == top.layer]
    not_worse = tied_top + [r for r in answer.better_on_test if r.base == rec.base and r.layer == top.layer]
    gap = 100 * (rec.test_accuracy - top.test_accuracy)
    if abs(gap) < 0.05:
        return f"For this data {layer} matches the top (`{top.layer}`) on test, and val chose it"
    if gap < 0:
        moved = f"trails the top (`{top.layer}`) by {abs(gap):.1f} points"
    elif not_worse:
        moved = f"scores {gap:.1f} points above the top (`{top.layer}`)"
    else:  # "beats" only for a gap the test images can tell from zero, against every head at the top layer
        moved = f"beats the top (`{top.layer}`) by {gap:.1f} points"
    return f"For this data {layer} {moved} on test" + _noise(answer, tied_top)


def _a_layer(where: str, result: HeadResult, detail: str = "") -> str:
    """``an early layer (`x`)``, ``a middle layer (`x`, depth 0.50)``: a region named with its article."""
    return f"{'an' if where in ('early', 'upper') else 'a'} {where} layer (`{result.layer}`{detail})"


def _multi_tap_sentence(answer: Answer) -> str:
    """The multilayer head against the best single layer chosen on val: the comparison its table shows."""
    rec = answer.recommended
    text = f"For this data a head on {rec.n_taps} stage taps at once (`{rec.name()}`) is chosen"
    versus = next((c for c in answer.multilayer if c.result is rec), None)
    if versus is None:
        return text
    return (f"{text}; against the best single layer chosen on val (`{versus.reference.name()}`) it differs by "
            f"{versus.gain.points()} points on test (paired 95% interval)")  # fmt: skip


def _tied(answer: Answer, other: HeadResult) -> bool:
    return any((r.base, r.layer, r.head) == (other.base, other.layer, other.head) for r in answer.ties)


def _heads(n: int) -> str:
    return f"{n} head{'s' * (n != 1)}"


def _noise(answer: Answer, tied: Sequence[HeadResult]) -> str:
    """A gap to heads the test images cannot tell from the recommendation is said to be so: a point difference
    alone would read as a finding. Where one of them differs on its own (two-sided exact McNemar below alpha) and only
    the adjustment for every head compared makes it a tie, that is said too: 100% vs 60% on 20 test images (8 to 0
    discordant, p = 0.008 alone, 0.16 adjusted over 21 heads) read as plain "noise"."""
    if not tied:
        return ""
    text = f", a gap within noise ({names(tied)} {'is' if len(tied) == 1 else 'are'} statistically tied with it"
    alone = min(mcnemar_p(answer.recommended.test_correct, r.test_correct) for r in tied)
    if alone < ALPHA:
        text += (
            f" once adjusted for the {_heads(len(answer.compared) - 1)} compared; on its own the pair differs, "
            f"exact McNemar p = {alone:.3f}"
        )
    return text + ")"


def quadrant(answer: Answer) -> Quadrant:
    """The 2x2 cell of the dataset, what the rule advises there, and whether the measured curve agrees."""
    per_class = answer.class_counts["train"]
    size = "large" if per_class >= LARGE_IMAGES_PER_CLASS else "small"
    confidence = None if answer.distance is None else answer.distance["confidence"]
    if confidence is None:
        return Quadrant(size, per_class, "unknown", None,
                        "unknown: no ImageNet-classifier logits cached to measure similarity", "n/a")  # fmt: skip
    similarity = "similar" if confidence >= SIMILAR_CONFIDENCE else "different"
    advice, kind = RULE[(size, similarity)]
    return Quadrant(size, per_class, similarity, confidence, advice, _verdict(answer, kind))


def above_chance(answer: Answer) -> bool:
    """Whether the recommendation beats always answering the largest class on test (one-sided exact binomial
    test, α = ALPHA): on imbalanced data a head that learned nothing scores the majority's share."""
    from scipy.stats import binomtest

    rec, chance = answer.recommended, answer.transfer.chance
    n = len(rec.test_correct)
    if n == 0 or not chance < 1:  # no test image, or a single class in test: no baseline to beat (other warnings say)
        return True
    return binomtest(int(rec.test_correct.sum()), n, chance, alternative="greater").pvalue < ALPHA


def _verdict(answer: Answer, kind: str) -> str:
    rec = answer.recommended
    if not answer.transfer.chance < 1 and kind != "finetune":  # one class in test (or none): nothing to compare
        return "cannot tell: test holds images of one class only"
    if not above_chance(answer) and kind != "finetune":
        return "cannot tell: the recommendation is not measurably above chance"
    if rec.multi_tap and kind != "finetune":
        return f"cannot tell: the recommendation reads {answer.recommended.n_taps} stage taps at once (multilayer)"
    if kind in ("top", "earlier") and untrained_top(answer) is not None:
        return f"cannot tell: the top layer (`{untrained_top(answer)}`) was not trained here (--shortlist)"
    if kind in ("top", "earlier"):
        return _layer_verdict(answer, kind)
    if answer.finetune is None:
        return "was not taken: run `featurecache compare-layers --finetune`"
    if answer.finetune.result.kept_frozen:
        return "is not borne out: no epoch of fine-tuning beat the frozen head on val, so the frozen head was kept"
    return {
        "helps": "agrees: fine-tuning gains significantly",
        "hurts": "disagrees: fine-tuning loses significantly",
    }.get(answer.finetune.gain.verdict, "is not borne out: fine-tuning's gain is not significant")


def _layer_verdict(answer: Answer, kind: str) -> str:
    """The rule's layers (the top one, or the early and middle ones) against the measurement on the recommended
    base: a layer that beats the recommendation significantly on test speaks first (val missed it), then the tie
    set (the test images cannot tell those layers from the recommendation; anything else is significantly worse)."""
    rec, top = answer.recommended, top_layer(answer).layer

    def advised(r: HeadResult) -> bool:
        return r.layer == top if kind == "top" else _is_earlier(answer, r)

    def at(r: HeadResult) -> str:
        return f"`{r.layer}`, depth {r.depth:.2f}"

    def same_base(results: list[HeadResult]) -> list[HeadResult]:
        return [r for r in results if r.base == rec.base and not r.multi_tap]

    what = "the top layer" if kind == "top" else "an earlier layer"
    for better in same_base(answer.better_on_test):
        if advised(better) != advised(rec):
            side = "is consistent with it on test" if advised(better) else "disagrees on test"
            return f"{side}: {at(better)} beats the recommendation ({at(rec)}) significantly there; val missed it"
    across = [r for r in same_base(answer.ties) if advised(r) != advised(rec)]
    if advised(rec):
        if not across:
            return (
                "agrees: the top layer is recommended"
                if kind == "top"
                else f"agrees: {what} ({at(rec)}) is recommended"
            )
        tied = "earlier ones tied" if kind == "top" else "a layer near the top tied"
        return (f"is consistent with it: {what} is recommended, {tied}" if kind == "top"
                else f"is consistent with it: {what} ({at(rec)}) is recommended, {tied}")  # fmt: skip
    if kind == "top":
        return ("is consistent with it: the top layer is statistically tied" if across
                else f"disagrees: `{rec.layer}` beats the top layer significantly")  # fmt: skip
    if across:
        return (f"is consistent with it: a layer near the top ({at(rec)}) is recommended, an earlier one "
                f"({at(across[0])}) statistically tied")  # fmt: skip
    return f"disagrees: a layer near the top ({at(rec)}) is recommended, and no earlier layer is tied with it"


def _is_earlier(answer: Answer, result: HeadResult) -> bool:
    """An early or middle layer: what the rule's "features from earlier layers" means, not just any layer but the
    last (a layer at depth 0.96 is the top's neighbour, not an earlier one)."""
    return region(answer, result) in ("early", "middle")


def warnings(answer: Answer) -> list[str]:
    """What a careful reader must know before trusting the recommendation."""
    out = []
    if not above_chance(answer):
        rec = answer.recommended
        out.append(
            f"Not measurably better than always answering the largest class: test {pts(rec.test_accuracy)}% "
            f"[{pts(rec.test_interval[0])}, {pts(rec.test_interval[1])}] against chance {pts(answer.transfer.chance)}% "
            f"(one-sided exact binomial test, α = {ALPHA}). {_why_at_chance(answer)}"
        )
    for split, n in answer.copies_of_train.items():
        out.append(
            f"{n} {split} image{'s are' if n != 1 else ' is'} byte-identical to train images: the heads have seen "
            f"them, so {split} accuracy overstates what they do on new images. Remove the copies from one split "
            f"(the extract log names them)."
        )
    small = {s: n for s, n in answer.class_counts.items() if s != "train" and 0 < n < MIN_IMAGES_PER_CLASS}
    for split, missing in answer.untested.items():
        out.append(
            f"{split} has no image of {', '.join(missing)}: {'its' if len(missing) == 1 else 'their'} accuracy is "
            f"never measured there, and the {split} scores are over the other classes. Add images of every class."
        )
    if small:
        worst = min(small.values())
        out.append(
            f"Small sample: {' and '.join(f'{s} has as few as {n} image(s) in a class' for s, n in small.items())} "
            f"(fewer than {MIN_IMAGES_PER_CLASS}); one image moves that class's accuracy by {100 / max(worst, 1):.0f} "
            f"points, so close rankings are noise. Add images to val/test."
        )
    if answer.val_ties:
        out.append(
            f"The val choice is within noise: the heads val chose at {len(answer.val_ties)} other "
            f"layer{'s' * (len(answer.val_ties) != 1)} ({names(answer.val_ties)}) are not significantly different "
            f"from `{answer.recommended.name()}` on val (two-sided exact McNemar, Holm-adjusted, α = {ALPHA})."
        )
    if answer.better_on_test:
        out.append(
            f"{names(answer.better_on_test, with_base=answer.several_bases)} beat the recommendation significantly on "
            f"test: val chose badly here (a larger val split would help)."
        )
    transfer = answer.transfer
    if transfer.verdict in ("hurts", "no measurable gain") and transfer.control is not None:
        control = f"the best control ({transfer.control.base}, `{transfer.control.name()}`)"
        out.append(
            f"Pretraining shows no significant gain here: the recommendation's gain over {control} is "
            f"{gain_text(transfer.gain)} points (paired 95% interval), an interval that includes 0."
            if transfer.verdict != "hurts"
            else f"Pretraining hurts here: {control} beats the recommendation ({gain_text(transfer.gain)} points)."
        )
    return out


def _why_at_chance(answer: Answer) -> str:
    """What to do about a recommendation at chance: imbalanced classes hide it behind the majority's share; balanced
    ones, behind too few test images."""
    if answer.transfer.chance > 1.5 / max(answer.n_classes, 1):
        return "The classes are imbalanced: read the leaderboard's balanced accuracy, and add images of the small ones."
    n = len(answer.recommended.test_correct)
    return f"With {n} test images only a large margin over chance shows: add images to test (and val)."


def gain_text(gain: PairedGain | None) -> str:
    """A paired gain in points: ``+1.2 [-0.5, +3.0]``, or ``n/a`` when it was not measured."""
    return "n/a" if gain is None else gain.points()


def transfer_sentence(answer: Answer) -> str:
    t = answer.transfer
    if t.control is None:
        return f"Chance (the largest class) is {pts(t.chance)}%; no control was trained."
    head = f"Against the best control ({t.control.base}, `{t.control.name()}`, test {pts(t.control.test_accuracy)}%)"
    verdict = {"helps": "pretrained features gain", "hurts": "pretrained features lose",
               "no measurable gain": "pretrained features' gain is not significant"}[t.verdict]  # fmt: skip
    return f"{head} {verdict}: {gain_text(t.gain)} points (paired 95% interval); chance is {pts(t.chance)}%."


def explain(answer: Answer) -> Answer:
    """Fill the answer's words (sentence, quadrant, warnings) from its numbers; returns it."""
    answer.sentence = sentence(answer)
    answer.quadrant = quadrant(answer)
    answer.warnings = warnings(answer)
    return answer
