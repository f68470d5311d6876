"""The statistics behind "how sure": Wilson intervals, exact McNemar, paired differences, the selection rule."""

from __future__ import annotations

import numpy as np
import pytest

from featurecache.metrics import classification_scores, mcnemar_worse_p, paired_difference, wilson_interval
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
    # b = 4 (reference alone right), c = 1 (other alone right): P(X >= 4 | n = 5, 1/2) = (5 + 1) / 32
    assert mcnemar_worse_p(ref, other) == pytest.approx(6 / 32)
    assert mcnemar_worse_p(other, ref) == pytest.approx(31 / 32)  # P(X >= 1 | n = 5)
    assert mcnemar_worse_p(ref, ref) == 1.0  # no discordant pair: no evidence either way
    six = np.ones(6, bool)
    assert mcnemar_worse_p(six, ~six) == pytest.approx(1 / 64)  # 6 of 6 discordant, all one way


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
