"""The answer in words: a gap on test is called noise where the test images cannot tell it from zero."""

from __future__ import annotations

import numpy as np

from featurecache.advice import _verdict, sentence
from featurecache.answer import Answer, HeadResult, TransferCheck


def result(layer: str, depth: float, test: float, head: str = "logreg") -> HeadResult:
    correct = np.ones(6, bool)
    return HeadResult("d", "base", layer, head, depth, 1.0, test, (0.0, 1.0), correct, correct)


def answer(recommended: HeadResult, curve: list[HeadResult], ties: list[HeadResult]) -> Answer:
    chance = TransferCheck(random_init=None, pixels=None, chance=0.5)  # two classes; the heads are right on all 6
    return Answer("d", recommended, ties, [], [], {"base": curve}, {"base": curve}, chance, {"train": 12}, 2, None)


def test_a_gap_to_a_tied_layer_is_called_noise_and_a_significant_one_is_not():
    early, top = result("early", 0.2, 1.0), result("view", 1.0, 5 / 6)
    tied = sentence(answer(early, [early, top], ties=[top]))
    assert tied.startswith("For this data an early layer (`early`) scores 16.7 points above the top (`view`) on "
                           "test, a gap within noise (`view / logreg` is statistically tied with it)")  # fmt: skip
    apart = sentence(answer(early, [early, top], ties=[]))
    assert "beats the top (`view`) by 16.7 points" in apart and "noise" not in apart
    assert "nothing else is statistically tied" in apart
    lower, best_top = result("early", 0.2, 5 / 6), result("view", 1.0, 1.0)
    on_top = sentence(answer(best_top, [lower, best_top], ties=[lower]))
    assert on_top.startswith("For this data val chose the top layer (`view`)")  # val chose it; "best" is not known
    assert "the best lower layer on val (`early`) is 16.7 points below it on test, a gap within noise" in on_top


def test_beats_the_top_only_when_no_head_at_the_top_is_tied_with_it():
    """The val-chosen top head at 90% is no tie, but another head at the top layer is: the gap is noise."""
    middle, top = result("middle", 0.5, 0.95), result("view", 1.0, 0.90)
    top_svm = result("view", 1.0, 0.95, head="linear_svm")
    said = sentence(answer(middle, [middle, top], ties=[top_svm]))
    assert "a middle layer (`middle`) scores 5.0 points above the top (`view`) on test, a gap within noise " in said
    assert "`view / linear_svm` is statistically tied with it" in said and "beats" not in said


def test_a_layer_test_found_significantly_better_is_named_in_the_sentence():
    """Val chose the top layer; a lower layer beat it significantly on test: the sentence must not read as if the
    top were best."""
    early, top = result("early", 0.2, 0.95), result("view", 1.0, 0.90)
    a = answer(top, [early, top], ties=[])
    a.better_on_test = [early]
    said = sentence(a)
    assert said.startswith("For this data val chose the top layer (`view`)")
    assert "; but `early / logreg` scored significantly higher on test (val missed it)" in said


def test_the_2x2_rule_agrees_only_where_the_test_images_can_tell_the_layers_apart():
    early, top = result("early", 0.2, 1.0), result("view", 1.0, 5 / 6)
    assert _verdict(answer(early, [early, top], ties=[]), "earlier") == (
        "agrees: an earlier layer (`early`, depth 0.20) is recommended"
    )
    assert _verdict(answer(early, [early, top], ties=[top]), "earlier") == (
        "is consistent with it: an earlier layer (`early`, depth 0.20) is recommended, a layer near the top tied"
    )
    # A layer at depth 0.96 is the top's neighbour: recommending it does not bear out "earlier layers".
    upper = result("upper", 0.96, 1.0)
    assert _verdict(answer(upper, [early, upper, top], ties=[]), "earlier") == (
        "disagrees: a layer near the top (`upper`, depth 0.96) is recommended, and no earlier layer is tied with it"
    )
    assert _verdict(answer(upper, [early, upper, top], ties=[early]), "earlier") == (
        "is consistent with it: a layer near the top (`upper`, depth 0.96) is recommended, an earlier one "
        "(`early`, depth 0.20) statistically tied"
    )
    lower, best_top = result("early", 0.2, 5 / 6), result("view", 1.0, 1.0)
    assert _verdict(answer(best_top, [lower, best_top], ties=[]), "top") == "agrees: the top layer is recommended"
    assert _verdict(answer(best_top, [lower, best_top], ties=[lower]), "top") == (
        "is consistent with it: the top layer is recommended, earlier ones tied"
    )


def test_fine_tuning_is_judged_by_the_one_gain_rule_a_significant_loss_included():
    from featurecache.answer import Comparison
    from featurecache.metrics import PairedGain

    top = result("view", 1.0, 5 / 6)
    judged = {}
    for gain in (PairedGain(0.1, 0.02, 0.2), PairedGain(0.01, -0.05, 0.06), PairedGain(-0.1, -0.2, -0.03)):
        a = answer(top, [top], ties=[])
        a.finetune = Comparison(result("view", 1.0, 1.0, head="finetuned-logreg"), top, gain, "fine-tuned from view")
        judged[gain.verdict] = _verdict(a, "finetune")
    assert judged == {
        "helps": "agrees: fine-tuning gains significantly",
        "no measurable gain": "is not borne out: fine-tuning's gain is not significant",
        "hurts": "disagrees: fine-tuning loses significantly",
    }


def test_a_fine_tuned_model_that_kept_its_frozen_head_says_so_in_the_answer_and_the_report():
    """compare-layers --finetune printed 'Fine-tuning (view / finetuned-logreg): test 83.3%, +0.0 [...] points over
    the recommendation' when no epoch beat the frozen head: the model was that head, which nothing said."""
    import dataclasses

    from featurecache.answer import Comparison
    from featurecache.metrics import PairedGain
    from featurecache.report import _beyond_table, answer_block

    top, gain = result("view", 1.0, 5 / 6), PairedGain(0.0, -0.116, 0.116)
    kept = dataclasses.replace(result("view", 1.0, 5 / 6, head="finetuned-logreg"), kept_frozen=True)
    a = answer(top, [top], ties=[])
    a.finetune = Comparison(kept, top, gain, "fine-tuned from view / logreg")
    a.beyond = [Comparison(kept, top, gain, "fine-tuned")]
    assert answer_block(a)[-1] == (
        "**Fine-tuning** (`view / finetuned-logreg`) kept the frozen head it started from (`view / logreg`): no epoch "
        "beat it on val, so this model is that frozen head, not a fine-tuned one; test 83.3%, +0.0 [-11.6, +11.6] "
        "points over the recommendation (paired 95% interval)."
    )
    assert _verdict(a, "finetune") == (
        "is not borne out: no epoch of fine-tuning beat the frozen head on val, so the frozen head was kept"
    )
    (table,) = [block for kind, block in _beyond_table(a) if kind == "table"]
    assert table[1][0][1] == "`view / finetuned-logreg` (= the frozen head: no epoch beat it on val)"
    tuned = dataclasses.replace(kept, kept_frozen=False)  # a model that did beat it reads as before
    a.finetune = Comparison(tuned, top, gain, "fine-tuned from view / logreg")
    assert answer_block(a)[-1].startswith("**Fine-tuning** (`view / finetuned-logreg`): test 83.3%, +0.0")


def test_a_head_significantly_better_on_test_is_named_apart_not_tied():
    from featurecache.answer import significantly_better, tie_set

    def head(layer: str, correct: np.ndarray) -> HeadResult:
        return HeadResult("d", "base", layer, "logreg", 0.5, 1.0, correct.mean(), (0.0, 1.0), correct, correct)

    rec = head("chosen", np.arange(40) < 20)  # 20 of 40 right
    better = head("better", np.ones(40, bool))  # right on all 20 the recommendation missed: p = 2**-20
    close = head("close", np.arange(40) < 21)  # one discordant image: no evidence either way
    assert tie_set(rec, [rec, better, close]) == [close]
    assert significantly_better(rec, [rec, better, close]) == [better]


def test_a_multilayer_recommendation_is_held_against_the_single_layer_val_chose():
    from featurecache.answer import Comparison
    from featurecache.metrics import PairedGain

    chosen_on_val = result("mid", 0.5, 0.80)
    best_on_test = HeadResult("d", "base", "view", "logreg", 1.0, 0.5, 0.95, (0.0, 1.0), np.ones(6, bool),
                              np.ones(6, bool))  # fmt: skip
    multi = HeadResult("d", "base", "all-stages", "multilayer", 1.0, 1.0, 0.85, (0.0, 1.0), np.ones(6, bool),
                       np.ones(6, bool), multi_tap=True)  # fmt: skip
    a = answer(multi, [chosen_on_val, best_on_test], ties=[])
    a.multilayer = [Comparison(multi, chosen_on_val, PairedGain(0.05, -0.02, 0.12))]
    text = sentence(a)
    assert "against the best single layer chosen on val (`mid / logreg`) it differs by +5.0 [-2.0, +12.0]" in text
    assert "view" not in text  # the layer best on test is no reference: choosing it there would flatter nothing


def test_a_recommendation_at_the_majority_share_is_said_to_have_learned_nothing_measurable():
    from featurecache.advice import warnings

    constant = np.arange(15) < 14  # 14 of 15 right: what always answering a 14-image class scores
    rec = HeadResult("d", "base", "mid", "logreg", 0.5, 1.0, 14 / 15, (0.70, 0.99), constant, constant)
    a = answer(rec, [rec], ties=[])
    a.transfer = TransferCheck(random_init=None, pixels=None, chance=14 / 15)
    assert warnings(a)[0].startswith("Not measurably better than always answering the largest class: test 93.3%")
    assert warnings(a)[0].endswith(
        "The classes are imbalanced: read the leaderboard's balanced accuracy, and add images of the small ones."
    )  # 14 of 15 in one of two classes
    a.transfer = TransferCheck(random_init=None, pixels=None, chance=0.5)
    a.recommended = HeadResult("d", "base", "mid", "logreg", 0.5, 1.0, 0.5, (0.2, 0.8), constant[:4], constant[:4])
    assert warnings(a)[0].endswith(
        "With 4 test images only a large margin over chance shows: add images to test (and val)."
    )  # balanced: too few images, not imbalance
    assert _verdict(a, "earlier") == "cannot tell: the recommendation is not measurably above chance"
    a.transfer = TransferCheck(random_init=None, pixels=None, chance=1 / 3)  # three balanced classes
    assert not any(w.startswith("Not measurably better") for w in warnings(a))


def test_a_layer_that_beats_the_recommendation_on_test_decides_the_2x2_verdict():
    """The top layer significantly better than val's middle choice is no tie: the rule for the top layer is borne
    out on test, the rule for earlier layers is not (a one-sided tie set read 'agrees' and 'beats the top')."""
    mid, top = result("mid", 0.5, 0.75), result("view", 1.0, 1.0)
    a = answer(mid, [mid, top], ties=[])
    a.better_on_test = [top]
    assert _verdict(a, "top").startswith("is consistent with it on test: `view`, depth 1.00 beats the recommendation")
    assert _verdict(a, "earlier").startswith("disagrees on test: `view`, depth 1.00 beats the recommendation")


def test_a_class_with_no_test_image_is_named_in_the_answer():
    from featurecache.advice import warnings

    top = result("view", 1.0, 1.0)
    a = answer(top, [top], ties=[])
    a.untested = {"test": ["green"]}
    assert "test has no image of green: its accuracy is never measured there, and the test scores are over the " \
           "other classes" in warnings(a)[0]  # fmt: skip


def test_a_test_split_of_one_class_gives_no_2x2_verdict():
    top = result("view", 1.0, 1.0)
    a = answer(top, [top], ties=[])
    a.transfer = TransferCheck(random_init=None, pixels=None, chance=1.0)
    assert _verdict(a, "top") == _verdict(a, "earlier") == "cannot tell: test holds images of one class only"


def test_a_shortlist_without_the_top_layer_calls_no_trained_layer_the_top():
    """compare-layers --shortlist 3 kept layers up to depth 0.35: the answer said "val chose the top layer
    (features.6.add)" and the 2x2 verdict "a layer near the top (features.6.add, depth 0.35)"."""
    from featurecache.answer import Scope

    early, middle = result("features.3.add", 0.18, 5 / 6), result("features.6.add", 0.35, 1.0)
    a = answer(middle, [early, middle], ties=[])
    a.scope = Scope(heads=frozenset({"logreg"}), layers={"base": frozenset({"features.3.add", "features.6.add"})},
                    tops={"base": "flatten"})  # fmt: skip
    said = sentence(a)
    assert said.startswith("For this data val chose an early layer (`features.6.add`, depth 0.35) among the layers "
                           "trained; the top layer (`flatten`) was not trained here (--shortlist)")  # fmt: skip
    assert "top layer (`features.6.add`)" not in said
    for kind in ("top", "earlier"):
        assert _verdict(a, kind) == "cannot tell: the top layer (`flatten`) was not trained here (--shortlist)"
    a.scope = Scope(heads=frozenset({"logreg"}), tops={"base": "features.6.add"})  # the top was trained: as before
    assert sentence(a).startswith("For this data val chose the top layer (`features.6.add`)")


def test_a_gap_tied_only_by_the_adjustment_for_every_head_says_so():
    """100% vs 60% on 20 test images, 8 to 0 discordant: p = 0.008 on its own, tied only once adjusted over the
    heads compared; the sentence called it plain noise."""
    import numpy as np

    def head(layer: str, depth: float, correct: np.ndarray) -> HeadResult:
        return HeadResult("d", "base", layer, "logreg", depth, 1.0, correct.mean(), (0.0, 1.0), correct, correct)

    early, top = head("early", 0.2, np.ones(20, bool)), head("view", 1.0, np.arange(20) >= 8)
    said = sentence(answer(early, [early, top], ties=[top]))
    assert "a gap within noise (`view / logreg` is statistically tied with it once adjusted for the 1 head " in said
    assert "on its own the pair differs, exact McNemar p = 0.008)" in said
    close = head("view", 1.0, np.arange(20) >= 1)  # one discordant image: noise, said plainly
    assert "on its own" not in sentence(answer(early, [early, close], ties=[close]))
