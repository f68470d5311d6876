"""Training-free transferability scores: LogME against the authors' code, SFDA, NCTI and k-NN on hand-checked
cases, and the properties that a per-layer ranking needs (no reward for width, padding, or noise)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from featurecache.transferability import knn_loo_accuracy, logme, ncti, ncti_components, sfda

# ------------------------------------------------------------------------------------------------ references


def reference_logme_icml(f: np.ndarray, y: np.ndarray) -> float:
    """Transcription of thuml/LogME ``LogME._fit_icml`` + ``each_evidence`` (numba removed): the ICML 2021
    solver, with a full D x D eigendecomposition, hence exact for N < D as well."""
    fh = f
    f = f.transpose()
    D, N = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64)
        epsilon = 1e-5
        alpha = 1.0
        beta = 1.0
        lam = alpha / beta
        tmp = vh @ (f @ np.ascontiguousarray(y_))
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + epsilon)
            beta_de = ((y_ - fh @ m) ** 2).sum()
            beta = (N - gamma) / (beta_de + epsilon)
            new_lam = alpha / beta
            if np.abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (
            D / 2.0 * np.log(alpha)
            + N / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2.0 * (beta_de + epsilon)
            - alpha / 2.0 * (alpha_de + epsilon)
            - N / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / N)
    return float(np.mean(evidences))


def reference_logme_fixed_point(f: np.ndarray, y: np.ndarray) -> float:
    """Transcription of thuml/LogME ``LogME._fit_fixed_point`` (the default there): D/2 log(alpha) with only
    the rank-many non-zero singular values in the log-determinant."""
    N, D = f.shape
    if N > D:
        _, s2, vh = np.linalg.svd(f.transpose() @ f)
        s = np.sqrt(s2)
        k = int(np.sum(s > 1e-10))
        u = (f @ vh.transpose())[:, :k] / s[:k].reshape(1, -1)
        s = s[:k].reshape(-1, 1)
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        s = s.reshape(-1, 1)
    sigma = s**2
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x**2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (N - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (
            D / 2.0 * np.log(alpha)
            + N / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - N / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / N)
    return float(np.mean(evidences))


def reference_sfda(X: np.ndarray, y: np.ndarray) -> float:
    """Transcription of TencentARC/SFDA ``SFDA_Score`` with its ``SFDA`` class and ``iterative_A`` (prints
    dropped): the generalized eigenproblem, as the authors solve it."""
    from scipy import linalg

    X = X.copy()

    def cov(Z: np.ndarray, shrinkage: float = -1) -> np.ndarray:
        emp = np.cov(np.asarray(Z).T, bias=1)
        if shrinkage < 0:
            return emp
        mu = np.trace(emp) / emp.shape[0]
        shrunk = (1.0 - shrinkage) * emp
        shrunk.flat[:: emp.shape[0] + 1] += shrinkage * mu
        return shrunk

    def iterative_a(A: np.ndarray, max_iterations: int = 3) -> float:
        x = A.sum(axis=1)
        for _ in range(max_iterations):
            temp = A @ x
            yv = temp / np.linalg.norm(temp, 2)
            temp = A @ yv
            x = temp / np.linalg.norm(temp, 2)
        return float(x.T @ A @ yv)

    def softmax(Z: np.ndarray) -> np.ndarray:
        Z = Z - Z.max(axis=1, keepdims=True)
        Z = np.exp(Z)
        return Z / Z.sum(axis=1, keepdims=True)

    def fit_proba(Z: np.ndarray, shrinkage: float | None) -> tuple[np.ndarray, float, np.ndarray]:
        classes, yy = np.unique(y, return_inverse=True)
        priors = np.bincount(yy) / float(len(y))
        means = np.zeros((len(classes), Z.shape[1]))
        np.add.at(means, yy, Z)
        means /= np.bincount(yy)[:, None]
        Sw = np.zeros((Z.shape[1], Z.shape[1]))
        for idx, group in enumerate(classes):
            Sw += priors[idx] * np.atleast_2d(cov(Z[yy == group, :]))
        if shrinkage is None:
            shrinkage = max(np.exp(-5 * iterative_a(Sw, max_iterations=3)), 1e-10)
        St = cov(Z, shrinkage=shrinkage)
        mu = np.trace(Sw) / Sw.shape[0]
        shrunk_Sw = (1.0 - shrinkage) * Sw
        shrunk_Sw.flat[:: Sw.shape[0] + 1] += shrinkage * mu
        evals, evecs = linalg.eigh(St - shrunk_Sw, shrunk_Sw)
        evecs = evecs[:, np.argsort(evals)[::-1]]
        coef = means @ evecs @ evecs.T
        intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
        return softmax(Z @ coef.T + intercept), shrinkage, means

    n = len(y)
    num_classes = len(np.unique(y))
    prob, shrinkage, means = fit_proba(X, None)
    prob = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    means_ = np.stack([(means.sum(axis=0) - means[i]) / (num_classes - 1) for i in range(num_classes)])
    for y_ in range(num_classes):
        indices = np.where(y == y_)[0]
        y_prob = prob[indices][:, y_]
        X[indices] = y_prob.reshape(-1, 1) * X[indices] + (1 - y_prob.reshape(-1, 1)) * means_[y_]
    prob, _, _ = fit_proba(X, shrinkage)
    return float(np.sum(prob[np.arange(n), y]) / n)


def reference_ncti_components(X: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Transcription of BUserName/NCTI ``NCTI_Score`` (prints dropped): (seli, ncc, vc) of one model."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    C = np.unique(y).shape[0]
    pca = PCA(n_components=64)
    X = pca.fit_transform(X, y)
    temp = max(np.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    if temp == 1e-10:
        clf = LinearDiscriminantAnalysis(solver="svd")
    else:
        clf = LinearDiscriminantAnalysis(solver="eigen", shrinkage=float(temp))
    low_feat = clf.fit_transform(X, y)
    low_feat = low_feat - np.mean(low_feat, axis=0, keepdims=True)
    seli_score = np.linalg.norm(low_feat, ord="nuc")
    low_pred = clf.predict_proba(X)
    ncc_score = np.sum(low_pred[np.arange(X.shape[0]), y]) / X.shape[0]
    class_pred_nuc = 0
    for c in range(C):
        c_pred = low_pred[(y == c).flatten()]
        class_pred_nuc += np.linalg.norm(c_pred, ord="nuc")
    return float(seli_score), float(ncc_score), float(np.log(class_pred_nuc))


# --------------------------------------------------------------------------------------------------- helpers


def clusters(n: int, d: int, *, n_classes: int = 5, separation: float = 1.0, seed: int = 0) -> tuple:
    """Gaussian classes around random centres: features that explain their labels (more with separation)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.standard_normal((n_classes, d)) * separation
    return centres[y] + rng.standard_normal((n, d)), y


def noise(n: int, d: int, *, n_classes: int = 5, seed: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, n_classes, n)


# ----------------------------------------------------------------------------------------------------- LogME


@pytest.mark.parametrize("shape", [(60, 300), (300, 40), (120, 120)])
def test_logme_agrees_with_the_exact_reference_solver_on_random_features(shape):
    n, d = shape
    X, y = clusters(n, d, separation=0.3)
    X -= X.mean(axis=0)  # ours centers the features; the reference does not
    ours = logme(X, y)
    # Both iterate the same MacKay updates; the reference stops at 1% change in alpha/beta, ours at 0.1%.
    assert ours == pytest.approx(reference_logme_icml(X, y), abs=5e-3)


def test_logme_matches_the_reference_fixed_point_when_rows_exceed_dims():
    X, y = clusters(300, 40, separation=0.3)
    X -= X.mean(axis=0)
    assert logme(X, y) == pytest.approx(reference_logme_fixed_point(X, y), rel=1e-9)


def test_the_reference_fixed_point_rewards_width_and_ours_does_not():
    """The bug we fixed, shown on the authors' own code: with N < D it scores noise above real structure."""
    X_noise, y_noise = noise(80, 640)
    X_real, y_real = clusters(80, 32, separation=0.5)
    assert reference_logme_fixed_point(X_noise, y_noise) > reference_logme_fixed_point(X_real, y_real)
    assert logme(X_noise, y_noise) < logme(X_real, y_real)


@pytest.mark.parametrize("shape", [(80, 640), (200, 640), (1000, 32)])
def test_noise_with_random_labels_scores_below_weak_structure(shape):
    n, d = shape
    assert logme(*noise(n, d)) < logme(*clusters(n, d, separation=0.5))


def test_logme_ignores_constant_columns():
    X, y = clusters(100, 300)
    padded = np.hstack([X, np.full((100, 50), 3.0)])
    assert logme(padded, y) == pytest.approx(logme(X, y), abs=1e-9)


@pytest.mark.parametrize("shape", [(80, 200), (300, 30)])
def test_logme_does_not_grow_when_padded_with_noise_columns(shape):
    n, d = shape
    X, y = clusters(n, d, separation=0.5)
    rng = np.random.default_rng(7)
    for width in (d // 2, 2 * d, 400):
        assert logme(np.hstack([X, rng.standard_normal((n, width))]), y) < logme(X, y)


# ------------------------------------------------------------------------------------------------------ SFDA


def test_sfda_hand_checked_two_class_line():
    """x = (-2, -1, 1, 2), classes (0, 0, 1, 1): every step of the reference worked out in one dimension."""
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = np.array([0, 0, 1, 1])
    # within-class variance 0.25 -> shrinkage exp(-5 * 0.25); in 1-D shrinking towards the mean variance is a
    # no-op, so the LDA weights are means / 0.25 = (-6, 6) and the intercepts -0.5 * 9 + log(1/2) each.
    shrinkage = math.exp(-1.25)
    scores = np.hstack([-6 * x, 6 * x]) - 4.5
    prob = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    soft = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    p_true = soft[np.arange(4), y]
    other_means = np.array([1.5, 1.5, -1.5, -1.5])  # the other class's mean
    mixed = p_true * x[:, 0] + (1 - p_true) * other_means
    means = np.array([mixed[:2].mean(), mixed[2:].mean()])
    within = 0.5 * mixed[:2].var() + 0.5 * mixed[2:].var()
    w = means / ((1 - shrinkage) * within + shrinkage * within)
    scores = np.outer(mixed, w) - 0.5 * means * w
    prob = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert sfda(x, y, folds=None) == pytest.approx(prob[np.arange(4), y].mean(), rel=1e-9)
    assert 0.5 < sfda(x, y, folds=None) < 1.0


@pytest.mark.parametrize("shape", [(200, 20), (90, 60), (50, 120)])  # N > D and N < D (the Woodbury route)
def test_sfda_agrees_with_the_reference(shape):
    X, y = clusters(*shape, separation=0.4, seed=3)
    assert sfda(X, y, folds=None) == pytest.approx(reference_sfda(X, y), rel=1e-6)


def test_sfda_out_of_fold_does_not_reward_width():
    """The reference scores the rows it fitted: Gaussian noise with 10 classes reached 0.995 at 256 dimensions on
    300 rows, above informative 8-d features. Out of fold, noise stays near chance at every width."""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 10
    noise = {d: rng.normal(size=(300, d)) for d in (8, 256, 1280)}
    assert sfda(noise[256], y, folds=None) > 0.9  # the reference's failure, kept callable for comparison
    informative, informative_y = clusters(300, 8, n_classes=10, separation=1.0)
    for d, x in noise.items():
        assert sfda(x, y) < 0.2, d  # chance is 0.1
    assert sfda(informative, informative_y) > max(sfda(x, y) for x in noise.values())


def test_sfda_holds_out_no_row_of_a_one_image_class():
    X, y = clusters(40, 6, separation=1.0)
    lone = np.r_[y, 99]  # class 99 has one row: it stays in every fit and is not scored
    assert 0 < sfda(np.vstack([X, X[:1]]), lone) <= 1
    assert np.isnan(sfda(X[:3], np.array([0, 1, 2])))  # nothing can be held out


def test_sfda_prefers_separated_classes_and_does_not_modify_its_input():
    X, y = clusters(200, 30, separation=1.0)
    before = X.copy()
    assert sfda(X, y) > sfda(*clusters(200, 30, separation=0.1))
    np.testing.assert_array_equal(X, before)


# ------------------------------------------------------------------------------------------------------ NCTI


def test_ncti_combines_min_max_normalized_terms():
    # seli: 1 -> 0, 3 -> 1; ncc: 0.5 -> 0, 0.9 -> 1; vc: 2 -> 1 (lower is better), 1 -> 0
    assert ncti([(1.0, 0.5, 2.0), (3.0, 0.9, 1.0)]) == pytest.approx([-1.0, 2.0])
    assert ncti([(2.0, 0.7, 1.5), (2.0, 0.7, 1.5)]) == [0.0, 0.0]  # a constant term contributes nothing


def test_ncti_components_of_collapsed_classes():
    """Classes collapsed onto their well-separated means (tiny within-class spread): the LDA classifies every
    row with probability ~1, so ncc ~ 1 and each class's probability matrix is ~rank one with nuclear norm
    ~ sqrt(rows): vc ~ log(C sqrt(N/C))."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    X = np.eye(3)[y] * 10 + rng.standard_normal((60, 3)) * 1e-3
    seli, ncc, vc = ncti_components(X, y)
    assert ncc == pytest.approx(1.0, abs=1e-6)
    assert vc == pytest.approx(math.log(3 * math.sqrt(20)), abs=1e-4)
    assert seli > 0


@pytest.mark.parametrize("scale", [0.05, 1.0])  # small features: the shrunk-LDA branch; large: the SVD branch
def test_ncti_components_agree_with_the_reference(scale):
    X, y = clusters(150, 80, separation=0.5, seed=4)
    assert ncti_components(X * scale, y) == pytest.approx(reference_ncti_components(X * scale, y), rel=1e-6)


def test_ncti_ranks_separated_features_first():
    comps = [ncti_components(*clusters(150, 40, separation=s, seed=2)) for s in (0.05, 0.3, 1.0)]
    scores = ncti(comps)
    assert scores[2] > scores[1] > scores[0]


# ------------------------------------------------------------------------------------------------------ k-NN


def test_knn_loo_hand_checked_line():
    # standardization is monotone on one column, so neighbours are those of the raw values
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [5.5]])
    y = np.array([0, 0, 1, 1, 1, 0])
    # 1-NN: 0->1 (0 ok), 1->0 (0 ok), 2->1 (0 wrong), 10->11 (1 ok), 11->10 (1 ok), 5.5->2 (1 wrong)
    assert knn_loo_accuracy(x, y, n_neighbors=1) == pytest.approx(4 / 6)
    # 3-NN: 0:{1,2,5.5}=0,1,0 ok; 1:{0,2,5.5}=0,1,0 ok; 2:{1,0,5.5}=0,0,0 wrong;
    # 10:{11,5.5,2}=1,0,1 ok; 11:{10,5.5,2}=1,0,1 ok; 5.5:{2,1,10}=1,0,1 wrong
    assert knn_loo_accuracy(x, y, n_neighbors=3) == pytest.approx(4 / 6)


def test_knn_tie_goes_to_the_nearest_and_the_row_itself_is_left_out():
    # duplicates with different labels: each row must see the other, never itself
    assert knn_loo_accuracy(np.array([[0.0], [0.0]]), np.array([0, 1]), n_neighbors=1) == 0.0
    x = np.array([[0.0], [1.0], [-1.5], [5.0]])
    y = np.array([1, 1, 0, 0])
    # 2-NN: x=0 sees 1 (class 1) and -1.5 (class 0): a tie, the nearest (class 1) wins -> right;
    # x=1 sees 0 (1) and -1.5 (0): tie -> 1, right; x=-1.5 sees 0, 1 (both 1) -> wrong; x=5 sees 1, 0 -> wrong.
    # (A "lowest class wins ties" rule would give 0/4.)
    assert knn_loo_accuracy(x, y, n_neighbors=2) == pytest.approx(2 / 4)


# ------------------------------------------------------------------------------ real layers (a real base)


@pytest.fixture(scope="module")
def digits_layers(tmp_path_factory) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every stage tap of efficientnet_lite0 on 400 scikit-learn digits (40 per class), extracted for real."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from featurecache.config import Paths
    from featurecache.extract import ExtractOptions, ExtractRequest, extract
    from featurecache.store import load_features

    root = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    counts = dict.fromkeys(range(10), 0)
    for image, label in zip(bunch.images, bunch.target, strict=True):
        if counts[label] >= 40:
            continue
        folder = Path(root / "raw" / "train" / str(label))
        folder.mkdir(parents=True, exist_ok=True)
        # as `featurecache data --datasets digits` writes them: 8x8, values 0..16 scaled to 0..255
        Image.fromarray(np.round(image * (255.0 / 16.0)).astype(np.uint8)).save(folder / f"{counts[label]}.png")
        counts[label] += 1
    paths = Paths(root / "home")
    options = ExtractOptions(progress=False, device="cpu", dtype="float32")
    result = extract(
        ExtractRequest(root / "raw", base="efficientnet_lite0", dataset="digits", splits=("train",)),
        paths=paths,
        options=options,
    )
    layers = {}
    for tap in result[0].taps:
        X, y, _ = load_features(result[0].path, tap)
        layers[tap] = X.astype(np.float64)
    return layers, y


@pytest.mark.slow
@pytest.mark.parametrize("rows", [100, 400])  # 100 rows: fewer than the dims of the 4 widest taps
def test_noise_with_random_labels_scores_below_every_real_layer(digits_layers, rows):
    layers, y = digits_layers
    keep = np.arange(len(y)) if rows >= len(y) else np.sort(np.random.default_rng(0).permutation(len(y))[:rows])
    widths = {tap: X.shape[1] for tap, X in layers.items()}
    assert min(widths.values()) < rows < max(widths.values()) or rows == len(y)
    for d in sorted(set(widths.values())):
        noise_score = logme(*noise(len(keep), d, n_classes=10))
        for tap, X in layers.items():
            assert noise_score < logme(X[keep], y[keep]), (tap, d)


@pytest.mark.slow
def test_logme_agrees_with_the_exact_reference_on_real_layers(digits_layers):
    layers, y = digits_layers
    keep = np.sort(np.random.default_rng(0).permutation(len(y))[:100])
    for X in layers.values():
        Xc = X[keep] - X[keep].mean(axis=0)
        assert logme(Xc, y[keep]) == pytest.approx(reference_logme_icml(Xc, y[keep]), abs=5e-3)


@pytest.mark.slow
def test_real_layer_scores_do_not_grow_when_padded(digits_layers):
    layers, y = digits_layers
    rng = np.random.default_rng(1)
    for X in layers.values():
        base = logme(X, y)
        scale = X.std()
        assert logme(np.hstack([X, np.full((len(y), 64), 5.0)]), y) == pytest.approx(base, abs=1e-9)
        assert logme(np.hstack([X, rng.standard_normal((len(y), 256)) * scale]), y) < base
