"""The answer in words: a gap on test is called noise where the test images cannot tell it from zero."""

from __future__ import annotations

import numpy as np

from featurecache.advice import _verdict, sentence
from featurecache.answer import Answer, HeadResult


def result(layer: str, depth: float, test: float, head: str = "logreg") -> HeadResult:
    correct = np.ones(6, bool)
    return HeadResult("d", "base", layer, head, depth, 1.0, test, (0.0, 1.0), correct, correct)


def answer(recommended: HeadResult, curve: list[HeadResult], ties: list[HeadResult]) -> Answer:
    return Answer("d", recommended, ties, [], [], {"base": curve}, {"base": curve}, None, {"train": 12}, 2, None)


def test_a_gap_to_a_tied_layer_is_called_noise_and_a_significant_one_is_not():
    early, top = result("early", 0.2, 1.0), result("view", 1.0, 5 / 6)
    tied = sentence(answer(early, [early, top], ties=[top]))
    assert tied.startswith("For this data the early layers beat the top by 16.7 points on test (`early` vs `view`), a "
                           "gap within noise (`view / logreg` is statistically tied with it)")  # fmt: skip
    apart = sentence(answer(early, [early, top], ties=[]))
    assert "16.7 points" in apart and "noise" not in apart and "nothing else is statistically tied" in apart
    lower, best_top = result("early", 0.2, 5 / 6), result("view", 1.0, 1.0)
    on_top = sentence(answer(best_top, [lower, best_top], ties=[lower]))
    assert "the best lower layer (`early`) is 16.7 points below it on test, a gap within noise" in on_top


def test_the_2x2_rule_agrees_only_where_the_test_images_can_tell_the_layers_apart():
    early, top = result("early", 0.2, 1.0), result("view", 1.0, 5 / 6)
    assert (
        _verdict(answer(early, [early, top], ties=[]), "earlier") == "agrees: an earlier layer (`early`) is recommended"
    )
    assert _verdict(answer(early, [early, top], ties=[top]), "earlier") == (
        "is consistent with it: an earlier layer (`early`) is recommended, the top one tied"
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
        "no measurable gain": "disagrees: fine-tuning shows no measurable gain",
        "hurts": "disagrees: fine-tuning loses significantly",
    }
