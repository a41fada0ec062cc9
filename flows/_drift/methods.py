"""Drift scores between a reference and a current window of embeddings, in numpy, deterministic
for a seed. Each method has a score, a documented default threshold (Evidently 0.7's) and a bound
on the rows it uses, so a 100,000-row reference costs what a few thousand rows cost:

- ``domain_classifier`` (the default): ROC AUC of a logistic regression telling current rows from
  reference rows, scored out of fold (5 stratified folds); drift when AUC > 0.55; 5,000 rows a side.
- ``mean_cosine``: cosine distance ``1 - cos`` between the two windows' mean unit vectors; drift
  when > 0.2; every row.
- ``share_drifted``: the share of components whose two-sample Kolmogorov–Smirnov test gives
  p < 0.05 (asymptotic p-value); drift when the share > 0.2; 10,000 rows a side.
- ``mmd``: unbiased squared maximum mean discrepancy, Gaussian kernel with the median pairwise
  squared distance of the pooled sample as bandwidth; drift when > 0.015; 1,000 rows a side (the
  kernel is quadratic in the rows).

Rows are L2-normalised first (embeddings compare by cosine). Subsamples are drawn without
replacement with ``numpy.random.default_rng(seed)``; the classifier's features are standardised over
both windows (no labels used), its L2 penalty is 0.1 (a near nearest-mean classifier: it cannot buy
a spurious out-of-fold AUC by overfitting) and its five fold models are fitted together by 30 steps
of Nesterov gradient descent (on planted data its AUC matches 300 steps' to 1e-4); numpy only,
scikit-learn is not a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = ["DEFAULT_METHOD", "MAX_ROWS", "METHODS", "THRESHOLDS", "DriftMethod", "drift_score", "roc_auc"]

DriftMethod = Literal["domain_classifier", "mean_cosine", "share_drifted", "mmd"]
DEFAULT_METHOD: DriftMethod = "domain_classifier"
#: Default thresholds: the window has drifted when its score is above.
THRESHOLDS: dict[str, float] = {"domain_classifier": 0.55, "mean_cosine": 0.2, "share_drifted": 0.2, "mmd": 0.015}
#: Rows each method uses per side at most (a random subsample beyond); None: all.
MAX_ROWS: dict[str, int | None] = {
    "domain_classifier": 5_000,
    "mean_cosine": None,
    "share_drifted": 10_000,
    "mmd": 1_000,
}
METHODS: tuple[str, ...] = tuple(THRESHOLDS)
FOLDS = 5
PENALTY = 0.1
STEPS = 30
KS_ALPHA = 0.05


def _subsample(vectors: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or len(vectors) <= limit:
        return vectors
    return vectors[np.sort(rng.choice(len(vectors), size=limit, replace=False))]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann–Whitney U, ties counted half)."""
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def _top_eigenvalue(x: np.ndarray, iterations: int = 20) -> float:
    """The largest eigenvalue of ``x'x / n`` (power iteration)."""
    v = np.ones(x.shape[1], dtype=np.float32) / math.sqrt(x.shape[1])
    for _ in range(iterations):
        v = x.T @ (x @ v)
        v /= np.linalg.norm(v) + 1e-12
    return float(v @ (x.T @ (x @ v))) / len(x)


def _logistic_folds(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of L2-penalised logistic regressions, one per fold, fitted together by
    Nesterov gradient descent (one matrix product a step for all folds)."""
    d = x.shape[1]
    train = (folds[:, None] != np.arange(FOLDS)[None, :]).astype(np.float32)  # n x folds
    n_train = train.sum(axis=0)
    step = 1.0 / (0.25 * (_top_eigenvalue(x) + 1.0) + PENALTY)  # +1: the intercept's column
    w = w_prev = np.zeros((d, FOLDS), dtype=np.float32)
    b = b_prev = np.zeros(FOLDS, dtype=np.float32)
    for k in range(1, STEPS + 1):
        momentum = np.float32((k - 1) / (k + 2))
        wy, by = w + momentum * (w - w_prev), b + momentum * (b - b_prev)
        p = 1.0 / (1.0 + np.exp(-(x @ wy + by)))
        error = (p - y[:, None]) * train
        w_prev, b_prev = w, b
        w = wy - np.float32(step) * (x.T @ error / n_train + PENALTY * wy)
        b = by - np.float32(step) * (error.sum(axis=0) / n_train)
    return np.einsum("nd,dn->n", x, w[:, folds]) + b[folds]


def domain_classifier(reference: np.ndarray, current: np.ndarray, rng: np.random.Generator) -> float:
    """Out-of-fold ROC AUC of a classifier telling current rows (1) from reference rows (0)."""
    x = np.vstack([reference, current]).astype(np.float32)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + np.float32(1e-6))  # label-free standardisation
    y = np.concatenate([np.zeros(len(reference), np.float32), np.ones(len(current), np.float32)])
    folds = np.empty(len(y), dtype=np.int64)
    for label in (0.0, 1.0):  # stratified: each fold gets its share of both windows
        members = np.flatnonzero(y == label)
        folds[rng.permutation(members)] = np.arange(len(members)) % FOLDS
    return roc_auc(y.astype(bool), _logistic_folds(x, y, folds))


def mean_cosine(reference: np.ndarray, current: np.ndarray, rng: np.random.Generator) -> float:
    """Cosine distance between the mean unit vectors of the two windows."""
    a, b = reference.mean(axis=0, dtype=np.float64), current.mean(axis=0, dtype=np.float64)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(1.0 - (a @ b) / denominator) if denominator > 0 else 1.0


def _kolmogorov_p(statistic: np.ndarray, n: int, m: int) -> np.ndarray:
    """Asymptotic two-sided p-values of two-sample KS statistics (Kolmogorov's series, Stephens' correction)."""
    effective = math.sqrt(n * m / (n + m))
    lam = (effective + 0.12 + 0.11 / effective) * statistic
    k = np.arange(1, 101, dtype=np.float64)[:, None]
    series = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam[None, :] ** 2), axis=0)
    return np.clip(np.where(lam < 0.2, 1.0, series), 0.0, 1.0)


def ks_statistics(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per-component two-sample Kolmogorov–Smirnov statistics (all components in one sort).

    Along each component's pooled sorted values, the difference of the two empirical CDFs moves
    by ``+1/n`` at a reference value and ``-1/m`` at a current one; its largest magnitude at the
    end of a run of tied values is the statistic.
    """
    n, m = len(reference), len(current)
    pooled = np.ascontiguousarray(np.vstack([reference, current]).T)  # a component per row: sorts in place
    order = np.argsort(pooled, axis=1)
    difference = np.cumsum(np.where(order < n, 1.0 / n, -1.0 / m), axis=1)
    values = np.take_along_axis(pooled, order, axis=1)
    run_end = np.ones(pooled.shape, dtype=bool)
    run_end[:, :-1] = values[:, 1:] != values[:, :-1]
    return np.abs(np.where(run_end, difference, 0.0)).max(axis=1)


def share_drifted(reference: np.ndarray, current: np.ndarray, rng: np.random.Generator) -> float:
    """Share of components whose KS test rejects equality at ``KS_ALPHA``."""
    p = _kolmogorov_p(ks_statistics(reference, current), len(reference), len(current))
    return float((p < KS_ALPHA).mean())


def mmd(reference: np.ndarray, current: np.ndarray, rng: np.random.Generator) -> float:
    """Unbiased squared MMD with a Gaussian kernel (median-distance bandwidth)."""
    x, y = reference.astype(np.float64), current.astype(np.float64)
    pooled = np.vstack([x, y])
    squares = (pooled**2).sum(axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    off_diagonal = distances[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(off_diagonal)) or 1.0  # the squared median distance
    kernel = np.exp(-distances / bandwidth)
    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


_SCORES: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], float]] = {
    "domain_classifier": domain_classifier,
    "mean_cosine": mean_cosine,
    "share_drifted": share_drifted,
    "mmd": mmd,
}


def drift_score(method: str, reference: np.ndarray, current: np.ndarray, seed: int = 0) -> float:
    """``method``'s score of ``current`` against ``reference`` (rows: unit vectors, see `_steps.vectors.normalise`),
    each side subsampled to ``MAX_ROWS[method]``, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    limit = MAX_ROWS[method]
    return _SCORES[method](_subsample(reference, limit, rng), _subsample(current, limit, rng), rng)
