"""Training-free transferability scores computed from cached features in seconds.

Each score takes the features of one layer on the train split (N x D) and the integer labels, and says how
well a cheap head would do on that layer, without training one. Higher is better for all of them.

- :func:`logme` (You et al., ICML 2021): the log marginal evidence of a Bayesian linear model from the features
  to each one-hot label column, maximised over the prior precision alpha and noise precision beta (fixed-point
  solver of You et al., arXiv:2110.10545), averaged over classes and divided by N.
- :func:`sfda` (Shao et al., ECCV 2022, reference code TencentARC/SFDA): self-challenging Fisher discriminant
  analysis; mean probability of the true class under a regularized LDA, refitted after mixing hard examples
  towards the other classes' means; scored out of fold (the reference scores the rows it fitted, which rewards
  width).
- :func:`ncti_components` + :func:`ncti` (Wang et al., ICCV 2023, reference code BUserName/NCTI): how far
  the features are from neural collapse: three terms per candidate, min-max normalized across the candidates
  ranked together (so NCTI ranks a set of layers; a single layer has no NCTI on its own).
- :func:`knn_loo_accuracy`: leave-one-out k-NN accuracy on standardized features, a cheap strong baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MAX_ITERATIONS = 11  # the fixed point converges in 2-3 steps in practice
RELATIVE_TOLERANCE = 1e-3
EPSILON = 1e-5
RANK_TOLERANCE = 1e-10  # singular values below this (relative to the largest) are treated as zero
NCTI_PCA_COMPONENTS = 64  # the reference projects on 64 principal components first
NCTI_SHRINKAGE_COMPONENTS = 32  # ... and sets the LDA shrinkage from the variance of the first 32
KNN_NEIGHBORS = 5


def _singular_values(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and the non-zero singular values of ``features`` (N x D).

    From the eigendecomposition of the smaller Gram matrix (D x D, or N x N when N < D): much cheaper than an
    N x D SVD, and accurate enough for the evidence (tiny singular values are dropped as rank-deficient).
    """
    n, d = features.shape
    gram = features.T @ features if n > d else features @ features.T
    eigvals, eigvecs = np.linalg.eigh(gram)
    order = np.argsort(eigvals)[::-1]
    s = np.sqrt(np.clip(eigvals[order], 0, None))
    eigvecs = eigvecs[:, order]
    keep = s > RANK_TOLERANCE * max(s[0] if len(s) else 0.0, 1.0)
    if n > d:
        return (features @ eigvecs[:, keep]) / s[keep], s[keep]
    return eigvecs[:, keep], s[keep]


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME score of ``features`` (N x D) for integer class ``labels`` (N,); higher transfers better.

    The evidence is that of y ~ N(F w, 1/beta) with w ~ N(0, I_D / alpha). Its log-determinant term
    log|alpha I_D + beta F^T F| has D eigenvalues: alpha + beta sigma_i for the k = rank(F) non-zero sigma_i
    and alpha for the other D - k. The reference fixed-point code (thuml/LogME ``_fit_fixed_point``) keeps only
    the k non-zero ones but still adds D/2 log(alpha): when N < D (so k <= N < D) that leaves
    (D - k)/2 log(alpha) in the score, which grows with the width and with alpha (large for features that
    explain nothing). The reference ICML solver (``_fit_icml``, a full D x D eigendecomposition) has all D
    eigenvalues and is exact; here the D - k zero eigenvalues are accounted for in closed form, so the two
    agree and the score no longer rewards width.

    The features are centered first (the reference does not): a constant column would otherwise act as a free
    intercept for the one-hot labels and raise the score of any layer it is appended to.
    """
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0)
    labels = np.asarray(labels)
    n = f.shape[0]
    u, s = _singular_values(f)
    sigma = s**2
    rank = len(sigma)
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
            # D/2 log(alpha) - (D - k)/2 log(alpha): only the rank counts (see the docstring)
            rank / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


# ------------------------------------------------------------------------------------------------------ SFDA


def _largest_eigenvalue(times: Callable[[np.ndarray], np.ndarray], start: np.ndarray, iterations: int = 3) -> float:
    """Three steps of power iteration from ``start`` (the row sums), as the reference does: cheap, and the
    shrinkage only needs the order of magnitude. ``times(v)`` is the matrix-vector product."""
    x = y = start
    for _ in range(iterations):
        y = times(x)
        y = y / max(np.linalg.norm(y), np.finfo(float).tiny)
        x = times(y)
        x = x / max(np.linalg.norm(x), np.finfo(float).tiny)
    return float(x @ times(y))


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def _solve_shrunk_within(centered: np.ndarray, shrinkage: float, rhs: np.ndarray) -> np.ndarray:
    """Solve ((1 - s) S_w + s tr(S_w)/D I) x = rhs with S_w = centered^T centered / N, never forming S_w when
    N < D (Woodbury: the N x N system instead of the D x D one)."""
    from scipy import linalg

    n, d = centered.shape
    a = shrinkage * float(np.einsum("ij,ij->", centered, centered)) / n / d  # the ridge on the diagonal
    b = (1.0 - shrinkage) / n
    if n >= d:
        matrix = b * (centered.T @ centered)
        matrix.flat[:: d + 1] += a
        return linalg.solve(matrix, rhs, assume_a="sym")
    # (a I + b Z^T Z)^-1 = I/a - (b/a^2) Z^T (I + (b/a) Z Z^T)^-1 Z
    inner = (b / a) * (centered @ centered.T)
    inner.flat[:: n + 1] += 1.0
    return rhs / a - (b / a**2) * (centered.T @ linalg.solve(inner, centered @ rhs, assume_a="sym"))


def _lda_fit(features: np.ndarray, codes: np.ndarray, n_classes: int, shrinkage: float | None) -> tuple:
    """A shrunk LDA fitted on ``features``: ``(coef, intercept, class means, shrinkage used)``; the class
    probabilities of rows ``x`` are ``_softmax(x @ coef.T + intercept)``.

    The reference solves the generalized eigenproblem (S_b, S_w) and keeps every eigenvector V; since
    V^T S_w V = I, V V^T = S_w^-1 and its coefficients are means @ S_w^-1, which one linear solve gives at a
    fraction of the cost of a D x D eigendecomposition. The prior-weighted biased class covariances sum to
    centered^T centered / N (prior_c / N_c = 1 / N).
    """
    n = len(codes)
    counts = np.bincount(codes, minlength=n_classes)
    means = np.zeros((n_classes, features.shape[1]))
    np.add.at(means, codes, features)
    means /= counts[:, None]
    centered = features - means[codes]
    if shrinkage is None:  # the reference's adaptive strength: strong for small-scale features, tiny otherwise

        def within_times(v: np.ndarray) -> np.ndarray:
            return centered.T @ (centered @ v) / n

        largest = _largest_eigenvalue(within_times, within_times(np.ones(features.shape[1])))
        shrinkage = max(float(np.exp(-5.0 * largest)), 1e-10)
    coef = _solve_shrunk_within(centered, shrinkage, means.T).T
    intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(counts / n)
    return coef, intercept, means, shrinkage


def _sfda_true_class(
    fit: tuple[np.ndarray, np.ndarray], scored: tuple[np.ndarray, np.ndarray], n_classes: int
) -> np.ndarray:
    """The reference's two steps fitted on the ``fit`` rows (features, class codes), then the true-class
    probability of each ``scored`` row: fit a shrunk LDA, soften its probabilities with a second softmax, move
    every row towards the mean of the *other* classes' means by one minus its softened true-class probability
    (ConfMix: hard rows move most), refit with the same shrinkage on the moved rows, and read the moved rows."""
    coef, intercept, means, shrinkage = _lda_fit(*fit, n_classes, None)
    others = (means.sum(axis=0) - means) / max(n_classes - 1, 1)  # per class: mean of the other class means

    def moved(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
        softened = _softmax(_softmax(x @ coef.T + intercept))  # the reference softmaxes the probabilities again
        p_true = softened[np.arange(len(codes)), codes][:, None]
        return p_true * x + (1.0 - p_true) * others[codes]

    refit, refit_intercept, _, _ = _lda_fit(moved(*fit), fit[1], n_classes, shrinkage)
    x, codes = scored
    return _softmax(moved(x, codes) @ refit.T + refit_intercept)[np.arange(len(codes)), codes]


SFDA_FOLDS = 5


def sfda(features: np.ndarray, labels: np.ndarray, *, folds: int | None = SFDA_FOLDS) -> float:
    """SFDA score (Shao et al., ECCV 2022): mean probability of the true class under a shrunk LDA refitted on
    "self-challenged" features; higher transfers better. Labels may be any integers (mapped to 0..C-1).

    ``folds=None`` is the reference (TencentARC/SFDA ``SFDA_Score``), which scores the rows it fitted: once D nears
    N the classes separate in sample whatever the labels, and it gave Gaussian noise 0.995 at D = 256, N = 300
    and 1.000 to digits' 1280-wide ``view`` with shuffled labels, so it ranked layers by width. By default each
    row is scored by the LDA fitted on the other folds (stratified, round robin in row order, so deterministic);
    noise then scores at or below 1/C at any width (0.02-0.05 for 10 classes at D = 320 to 1280, N = 1079: the
    overfitted LDA is confidently wrong out of fold). A class with one row is never held out (its mean needs it).
    """
    x = np.asarray(features, dtype=np.float64)
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    if folds is None:
        return float(_sfda_true_class((x, codes), (x, codes), len(classes)).mean())
    fold = np.full(len(codes), -1)
    for c in range(len(classes)):
        rows = np.flatnonzero(codes == c)
        if len(rows) > 1:
            fold[rows] = np.arange(len(rows)) % min(folds, len(rows))
    scores = [_sfda_true_class((x[fold != k], codes[fold != k]), (x[fold == k], codes[fold == k]), len(classes))
              for k in range(folds) if (fold == k).any()]  # fmt: skip
    return float(np.concatenate(scores).mean()) if scores else float("nan")


# ------------------------------------------------------------------------------------------------------ NCTI


def ncti_components(features: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """The three raw NCTI terms of one candidate (Wang et al., ICCV 2023; reference code BUserName/NCTI):
    ``(seli, ncc, vc)``.

    After PCA to 64 components and a shrunk LDA (shrinkage exp(-sum of the first 32 PCA variances), or plain
    SVD-LDA when that underflows): ``seli`` is the nuclear norm of the centered LDA projection (how spread the
    class means are, NC2-like), ``ncc`` the mean LDA probability of the true class (nearest-centre
    classification, NC3-like), ``vc`` the log of the summed per-class nuclear norms of the predicted
    probabilities (within-class variability, NC1-like; lower is closer to collapse). Combine the terms of
    several candidates with :func:`ncti`.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.asarray(features, dtype=np.float64)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    x, variances = _principal_components(x, min(NCTI_PCA_COMPONENTS, x.shape[0] - 1, x.shape[1]))
    shrinkage = max(float(np.exp(-variances[:NCTI_SHRINKAGE_COMPONENTS].sum())), 1e-10)
    if shrinkage == 1e-10:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage)
    projected = lda.fit_transform(x, codes)
    seli = float(np.linalg.norm(projected - projected.mean(axis=0), ord="nuc"))
    proba = lda.predict_proba(x)
    ncc = float(proba[np.arange(len(codes)), codes].mean())
    vc = float(np.log(sum(np.linalg.norm(proba[codes == c], ord="nuc") for c in np.unique(codes))))
    return seli, ncc, vc


def _principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The scores on the top ``k`` principal components and their variances (as sklearn's PCA gives, up to
    the sign of each component, which LDA does not see), from the eigendecomposition of the smaller Gram."""
    centered = x - x.mean(axis=0)
    n, d = centered.shape
    gram = centered.T @ centered if n > d else centered @ centered.T
    eigvals, eigvecs = np.linalg.eigh(gram)
    top = np.argsort(eigvals)[::-1][:k]
    eigvals = np.clip(eigvals[top], 0, None)
    scores = centered @ eigvecs[:, top] if n > d else eigvecs[:, top] * np.sqrt(eigvals)
    return scores, eigvals / (n - 1)


def ncti(components: Sequence[tuple[float, float, float]]) -> list[float]:
    """NCTI scores of candidates ranked together, from their :func:`ncti_components`: each term min-max
    normalized across the candidates, then ``seli + ncc - vc`` (as the reference combines them). A term that
    is equal for every candidate contributes 0."""
    terms = np.asarray(components, dtype=np.float64).reshape(-1, 3)
    low, span = terms.min(axis=0), terms.max(axis=0) - terms.min(axis=0)
    normalized = np.divide(terms - low, span, out=np.zeros_like(terms), where=span > 0)
    return [float(s) for s in normalized[:, 0] + normalized[:, 1] - normalized[:, 2]]


# ------------------------------------------------------------------------------------------------------ k-NN


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, *, n_neighbors: int = KNN_NEIGHBORS) -> float:
    """Leave-one-out accuracy of a k-NN majority vote (Euclidean) on standardized features.

    Each row is classified by its ``n_neighbors`` nearest *other* rows; a tied vote goes to the class of the
    nearest row among the tied classes. Columns are z-scored (constant columns dropped to 0) so that no single
    wide-range channel decides the distances.
    """
    x = np.asarray(features, dtype=np.float64)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    k = min(n_neighbors, len(x) - 1)
    sq = np.einsum("ij,ij->i", x, x)
    correct = 0
    for start in range(0, len(x), 1024):  # blocks keep the distance matrix small for large N
        block = slice(start, min(start + 1024, len(x)))
        d2 = sq[block, None] - 2.0 * x[block] @ x.T + sq[None, :]
        d2[np.arange(d2.shape[0]), np.arange(block.start, block.stop)] = np.inf  # leave the row itself out
        nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
        correct += int(np.sum(_vote(codes[nearest]) == codes[block]))
    return correct / len(x)


def _vote(neighbour_codes: np.ndarray) -> np.ndarray:
    """Majority class per row of ``neighbour_codes`` (ordered nearest first); ties go to the nearest."""
    n_classes = int(neighbour_codes.max()) + 1
    counts = np.zeros((len(neighbour_codes), n_classes), dtype=np.int64)
    rows = np.arange(len(neighbour_codes))
    for j in range(neighbour_codes.shape[1]):
        np.add.at(counts, (rows, neighbour_codes[:, j]), 1)
    best = counts.max(axis=1, keepdims=True)
    tied = counts == best
    # the first neighbour (in distance order) whose class is among the tied winners
    first = np.argmax(tied[rows[:, None], neighbour_codes], axis=1)
    return neighbour_codes[rows, first]
