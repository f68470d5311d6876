"""How often a paired 95% interval of a difference in accuracy covers the true difference: Newcombe's hybrid score
interval (what featurecache reports, featurecache.metrics.paired_difference) against a paired percentile bootstrap
(what it reported before), on simulated pairs of correlated 0/1 outcomes at test-set sizes users have.

Each setting draws ``trials`` test sets of ``n`` images from a Gaussian copula: model A right with probability
``p_a``, model B with ``p_b``, their latent scores correlated ``rho`` (two heads on the same images agree more than
chance). Coverage near 0.95 is right; a zero-width share above 0 is an interval that claims certainty it lacks.

    python -m benchmarks.paired_interval        (also the ``coverage`` section of ``make bench``)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (n, p_a, p_b, rho): a large test set, a mid one, and the small ones where the bootstrap collapses.
SETTINGS = ((200, 0.60, 0.55, 0.3), (50, 0.80, 0.75, 0.5), (30, 0.90, 0.90, 0.7), (15, 0.95, 0.90, 0.5))


def coverage(n: int, p_a: float, p_b: float, rho: float, *, trials: int = 600, seed: int = 0) -> dict[str, float]:
    """Coverage and zero-width share of both intervals over ``trials`` simulated test sets."""
    from scipy.stats import norm

    from featurecache.metrics import bootstrap_ci, paired_difference

    rng = np.random.default_rng(seed)
    cut = norm.ppf([p_a, p_b])
    truth = p_a - p_b
    hits = {"newcombe": 0, "bootstrap": 0}
    zero = {"newcombe": 0, "bootstrap": 0}
    intervals: dict[str, Callable[[np.ndarray, np.ndarray, int], tuple[float, float]]] = {
        "newcombe": lambda a, b, t: tuple(paired_difference(a, b)[1:]),
        "bootstrap": lambda a, b, t: bootstrap_ci(a.astype(float) - b.astype(float), seed=t),
    }
    for t in range(trials):
        latent = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
        a, b = latent[:, 0] < cut[0], latent[:, 1] < cut[1]
        for name, interval in intervals.items():
            low, high = interval(a, b, t)
            hits[name] += low <= truth <= high
            zero[name] += high - low == 0
    return {
        **{f"{k}_coverage": v / trials for k, v in hits.items()},
        **{f"{k}_zero": v / trials for k, v in zero.items()},
    }


def main() -> int:
    for n, p_a, p_b, rho in SETTINGS:
        c = coverage(n, p_a, p_b, rho)
        print(f"n={n:3d} p={p_a:.2f}/{p_b:.2f} rho={rho:.1f}: Newcombe covers {c['newcombe_coverage']:.3f} "
              f"(zero-width {c['newcombe_zero']:.3f}); bootstrap covers {c['bootstrap_coverage']:.3f} "
              f"(zero-width {c['bootstrap_zero']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
