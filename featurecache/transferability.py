"""Training-free transferability scores computed from cached features in seconds.

LogME (You et al., ICML 2021; fixed-point solver of You et al., "Ranking and Tuning Pre-trained Models",
arXiv:2110.10545): the log marginal evidence of a Bayesian linear model that maps the features to each one-hot
label column, maximised over the prior precision alpha and noise precision beta, averaged over classes and
divided by N. Higher means the labels are easier to explain linearly from the features. Like the authors'
code, the sum over log(alpha + beta * sigma_i) runs over the non-zero singular values.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 11  # the fixed point converges in 2-3 steps in practice
RELATIVE_TOLERANCE = 1e-3
EPSILON = 1e-5


def _singular_values(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of ``features`` (N x D), rank-truncated."""
    n, d = features.shape
    if n > d:
        # Eigen-decomposition of the D x D Gram matrix is much cheaper than an N x D SVD when N >> D.
        eigvals, eigvecs = np.linalg.eigh(features.T @ features)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.clip(eigvals[order], 0, None), eigvecs[:, order]
        s = np.sqrt(eigvals)
        keep = s > 1e-10
        u = (features @ eigvecs[:, keep]) / s[keep]
        return u, s[keep]
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    keep = s > 1e-10
    return u[:, keep], s[keep]


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME score of ``features`` (N x D) for integer class ``labels`` (N,); higher transfers better."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    n, d = f.shape
    u, s = _singular_values(f)
    sigma = s**2
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        x2 = (u.T @ y) ** 2
        residual_outside = float(y @ y - x2.sum())  # energy of y outside the feature span
        alpha, beta = 1.0, 1.0
        for _ in range(MAX_ITERATIONS):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside
            alpha = gamma / (m2 + EPSILON)
            beta = (n - gamma) / (res2 + EPSILON)
            if abs(alpha / beta - t) / t <= RELATIVE_TOLERANCE:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))
