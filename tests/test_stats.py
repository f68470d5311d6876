"""The statistics behind "how sure": Wilson intervals, exact McNemar, paired differences, the selection rule."""

from __future__ import annotations

import numpy as np
import pytest

from featurecache.metrics import classification_scores, holm, mcnemar_p, paired_difference, wilson_interval
from featurecache.selection import Candidate, pick_best, ranked


def test_wilson_does_not_collapse_at_the_edges():
    low, high = wilson_interval(3, 3)
    assert high == 1.0 and low == pytest.approx(0.4385, abs=1e-4)  # 3 of 3 is far from "certainly 100%"
    low, high = wilson_interval(0, 3)
    assert low == 0.0 and high == pytest.approx(0.5615, abs=1e-4)
    low, high = wilson_interval(50, 100)  # textbook value: 0.5 +- 0.0962 (symmetric at p = 0.5)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_scores_report_a_wilson_interval():
    y = np.array([0, 1, 2])
    scores = classification_scores(y, y, n_classes=3)
    assert scores["accuracy"] == 1.0 and scores["accuracy_ci95"][0] < 0.5


def test_exact_mcnemar_on_hand_counted_discordant_pairs():
    ref = np.array([1, 1, 1, 1, 1, 0, 1, 1], bool)
    other = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    # 4 discordant images one way, 1 the other: twice P(X <= 1 | n = 5, 1/2) = 2 * 6 / 32, in either order
    assert mcnemar_p(ref, other) == mcnemar_p(other, ref) == pytest.approx(12 / 32)
    assert mcnemar_p(ref, ref) == 1.0  # no discordant pair: no evidence either way
    six = np.ones(6, bool)
    assert mcnemar_p(six, ~six) == pytest.approx(2 / 64)  # 6 of 6 discordant, all one way
    assert mcnemar_p(np.r_[six, ~six], np.r_[~six, six]) == 1.0  # 6 each way: capped at 1, not 2 * 0.61


def test_the_significance_call_agrees_with_the_paired_interval_beside_it():
    """A one-sided test at 0.05 each way is a 10% test: 3 vs 10 discordant images of 359 gave p = 0.046
    ("significantly better") while the paired 95% interval of the same pair held 0."""
    ref = np.r_[np.ones(346, bool), np.ones(3, bool), np.zeros(10, bool)]
    other = np.r_[np.ones(346, bool), np.zeros(3, bool), np.ones(10, bool)]
    gain = paired_difference(other, ref)
    assert gain.low < 0 < gain.high and mcnemar_p(other, ref) > 0.05


def test_holm_adjusts_step_down_and_keeps_the_order_given():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 * 0.01; max(2 * 0.03, 1 * 0.04)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_twenty_equally_good_heads_rarely_yield_a_significant_difference_from_the_recommendation():
    """The answer's tie set and "significantly better" over ~20 heads: per-head tests at 0.05 named a difference in
    about a quarter of answers where every head was equally accurate; Holm keeps it at most alpha."""
    from featurecache.answer import HeadResult, significantly_better, tie_set

    rng = np.random.default_rng(0)
    hard = rng.random(359) < 0.5  # errors pile up on shared hard images, as they do between layers

    def head(i: int) -> HeadResult:
        correct = rng.random(359) > np.where(hard, 0.06, 0.01)
        return HeadResult("d", "base", f"l{i}", "logreg", 0.5, 0.9, correct.mean(), (0, 1), correct, correct)

    flagged = 0
    for _ in range(200):
        heads = [head(i) for i in range(22)]
        rec, others = heads[0], heads
        flagged += len(tie_set(rec, others)) < 21 or bool(significantly_better(rec, others))
    assert flagged / 200 <= 0.08  # alpha 0.05 plus the simulation's own noise (uncorrected: ~0.25)


def test_paired_difference_is_the_accuracy_gap_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = a.copy()
    b[:40] = False  # b loses 40 images that a gets right (a few were already wrong)
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert 0 < low <= diff <= high


def test_the_paired_interval_does_not_collapse_where_the_two_never_disagree():
    """12 images both right on: a paired bootstrap said +0.0 [+0.0, +0.0]. Newcombe's interval is each accuracy's
    Wilson bound apart: 12 of 12 has a Wilson 95% lower bound of 0.7575, so the difference is within +-0.2425."""
    diff, low, high = paired_difference(np.ones(12, bool), np.ones(12, bool))
    wilson_low = wilson_interval(12, 12)[0]
    assert diff == 0 and (low, high) == (pytest.approx(wilson_low - 1), pytest.approx(1 - wilson_low))
    assert high == pytest.approx(0.2425, abs=1e-4)
    a = np.r_[np.ones(6, bool), np.zeros(6, bool)]  # right and wrong on the same images: fully correlated pairs
    _, low, high = paired_difference(a, a)
    assert low == pytest.approx(-0.1422, abs=1e-4) and high == pytest.approx(0.1422, abs=1e-4)  # not [0, 0]


def test_the_paired_interval_matches_the_published_one():
    """Bentur et al.'s airway data, as Fagerland, Lydersen and Laake (2014) tabulate it: 21 pairs, 1 both yes, 1
    yes-no, 7 no-yes, 12 both no; Newcombe's hybrid score interval of the difference is [-0.507, -0.026]."""
    first = np.r_[np.ones(2, bool), np.zeros(19, bool)]
    second = np.r_[True, False, np.ones(7, bool), np.zeros(12, bool)]
    diff, low, high = paired_difference(first, second)
    assert diff == pytest.approx(-6 / 21) and (round(low, 3), round(high, 3)) == (-0.507, -0.026)


def test_a_paired_gain_helps_or_hurts_only_when_its_whole_interval_is_one_side_of_zero():
    from featurecache.metrics import PairedGain

    assert PairedGain(0.05, 0.01, 0.09).verdict == "helps"
    assert PairedGain(-0.05, -0.09, -0.01).verdict == "hurts"
    assert PairedGain(0.05, 0.0, 0.09).verdict == PairedGain(0.0, -0.01, 0.0).verdict == "no measurable gain"
    assert PairedGain(0.012, -0.005, 0.03).points() == "+1.2 [-0.5, +3.0]"
    diff, low, high = paired_difference(np.ones(30, bool), np.r_[np.ones(20, bool), np.zeros(10, bool)])
    assert (diff, low > 0) == (pytest.approx(1 / 3), True)


def test_selection_rule_breaks_ties_by_simpler_head_then_shallower_layer():
    c = [
        Candidate("b", "deep", "mlp", 0.9, 0.8),
        Candidate("b", "deep", "logreg", 0.9, 0.8),
        Candidate("b", "mid", "logreg", 0.5, 0.8),
        Candidate("b", "mid", "knn", 0.5, 0.8),
        Candidate("b", "top", "mlp", 1.0, 0.7),
    ]
    assert pick_best(c, lambda x: x) == c[2]  # logreg (simplest) at the shallower layer
    assert [x.head for x in ranked(c, lambda x: x)] == ["logreg", "logreg", "knn", "mlp", "mlp"]
    with pytest.raises(ValueError):
        pick_best([], lambda x: x)


def test_exact_ties_rank_multilayer_after_every_single_tap_head_and_fine_tuned_models_last():
    heads = ["finetuned-mlp", "multilayer", "mlp+aug", "mlp", "logreg+aug", "logreg"]
    tied = [Candidate("b", "view", head, 1.0, 0.8) for head in heads]
    assert [x.head for x in ranked(tied, lambda x: x)] == heads[::-1]
