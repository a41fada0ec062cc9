"""Drift tests between a reference and a current window of embeddings: each method's score, and a
p-value from a permutation null of its statistic (the score itself, except for the domain
classifier: see below), deterministic for a seed.

Under "no drift" the two windows are draws from one distribution, so which rows are "current" is
an arbitrary labelling of the pooled rows. A method computes its statistic on the true labelling
and on ``permutations`` random relabellings (same sizes); the p-value is ``(1 + #null ≥ observed) /
(1 + permutations)``, which is at most α with probability at most α whatever the data look like
(anisotropic, clustered, few rows): the false-alarm rate is bounded by construction, and measured
(tests/unit/test_drift_calibration.py, benchmarks/drift_power.py). Every null here is cheap: the
relabellings enter each statistic through one matrix product, never a refit per permutation.

- ``domain_classifier`` (a default, with ``mean_cosine``: see `DEFAULT_METHODS`): a ridge
  classifier (scikit-learn's `Ridge` on the 0/1 labels, i.e. a shrunk linear discriminant;
  `cross_val_predict` over 5 folds) telling current rows from reference rows; 2,500 rows a side
  (a small window gains from a large reference too: a 5% cluster in 200 rows was found in 62% of
  windows against 1,000 reference rows, in 100% against 2,000, at 1.4 × the time). Its *score* is
  the out-of-fold ROC AUC (`roc_auc_score`; 0.5 = no drift, what effect-size floors compare), its
  *statistic* the gap between the mean out-of-fold prediction of current and of reference rows.
  The AUC is a rank statistic: a new cluster of 5% of the window can move it by 0.025 at most,
  within its noise at 200 rows, where the few far-off rows move the mean prediction a lot
  (measured with benchmarks/drift_power.py's planted data: that cluster found in 62% of windows by
  the gap, 15% by the AUC; mean shifts as often or more). The folds are drawn without looking at
  the labels, and a ridge fit is linear in the labels, so the out-of-fold predictions of every
  relabelling come from the same five factorisations. A logistic regression has no such
  shortcut: its null would be a refit per fold and permutation (scikit-learn's
  `LogisticRegression` took 0.4–1 s per fit at 2,000 × 512 here, so minutes per window), so it is
  not used.
- ``mean_cosine`` (a default): cosine distance between the two windows' mean vectors
  (`scipy.spatial.distance.cosine`); 10,000 rows a side.
- ``share_drifted``: the share of components whose two-sample Kolmogorov–Smirnov test
  (`scipy.stats.ks_2samp(..., method="auto")`: exact for small windows) gives p < 0.05; 1,000
  rows a side. Components are correlated, so the share's null is not binomial: it is permuted
  too. For given sizes a KS p-value is a decreasing function of the statistic, so a labelling's
  share is the share of its statistics at or above the critical one — the smallest realised
  statistic to which ``ks_2samp`` itself gives p < 0.05 (bisection). The statistics of the true
  labelling and of every relabelling come from one batch over the pooled rows' ranks (equal to
  ``ks_2samp``'s: tests/unit/test_drift_methods.py): ``ks_2samp`` loops over components in Python
  (measured 24 ms for 512 components at 20 + 100 rows, 143 ms at 1,000 + 1,000), which per
  relabelling would be 5 to 28 s a window.
- ``mmd``: unbiased squared maximum mean discrepancy, Gaussian kernel (`sklearn.metrics.pairwise.rbf_kernel`)
  with the median pairwise squared distance of the pooled rows as bandwidth; 1,000 rows a side.

Each side is subsampled without replacement beyond its bound (``numpy.random.default_rng(seed)``):
a test on a random subsample is as valid as on the whole, and a 100,000-row reference costs what
a few thousand rows cost. A window under `MIN_ROWS` rows gets no verdict (see `MIN_ROWS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from scipy import linalg, stats
from scipy.spatial.distance import cosine
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from threadpoolctl import ThreadpoolController

__all__ = [
    "ALPHA",
    "DEFAULT_METHODS",
    "MAX_ROWS",
    "METHODS",
    "MIN_ROWS",
    "PERMUTATIONS",
    "DriftMethod",
    "DriftTest",
    "drift_score",
    "drift_test",
]

DriftMethod = Literal["domain_classifier", "mean_cosine", "share_drifted", "mmd"]
#: What a run tests by default: the classifier finds small shifts along directions of little variance
#: (where a mean distance sees nothing), the mean distance finds new clusters and broad changes with
#: fewer rows (where the classifier's 5 folds leave each model few rows). Measured in
#: benchmarks/drift_power.py: neither alone matches Evidently's power in every cell; the pair does.
#: A run tests each of its k methods at alpha / k (Bonferroni), so the run alarms on at most alpha.
DEFAULT_METHODS: tuple[DriftMethod, ...] = ("domain_classifier", "mean_cosine")
METHODS: tuple[str, ...] = ("domain_classifier", "mean_cosine", "share_drifted", "mmd")
#: The default significance level: a window is drifted when its p-value is at most this.
ALPHA = 0.05
#: Relabellings per test by default (p-values on a grid of 1/200; ≥ 19 are needed to reach 0.05).
PERMUTATIONS = 199
#: Rows each side needs for a verdict; below it a window is "insufficient data". Calibrated in
#: benchmarks/drift_power.py ("minimum window"): the false-alarm rate stays ≤ α at every size (it
#: is a permutation test), but under 20 rows the default method misses most of a drift that it
#: finds in ≥ 95% of 50-row windows, so a quiet verdict would say little.
MIN_ROWS = 20
#: Rows each method uses per side at most (a random subsample beyond).
MAX_ROWS: dict[str, int] = {"domain_classifier": 2_500, "mean_cosine": 10_000, "share_drifted": 1_000, "mmd": 1_000}
FOLDS = 5
#: The ridge penalty, per training row (features standardised). Measured on planted drifts: 0.1 finds
#: a small mean shift in 30/30 windows of 200 rows where 1.0 finds 24/30 and 10 finds 6/30.
PENALTY = 0.1
KS_ALPHA = 0.05


@dataclass(frozen=True)
class DriftTest:
    """One method's score on the two windows (what a floor compares), the statistic its permutation
    p-value is of (the score itself, except for ``domain_classifier``), and that p-value."""

    method: str
    score: float
    statistic: float
    p_value: float
    permutations: int
    n_reference: int
    n_current: int


def _subsample(vectors: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(vectors) <= limit:
        return vectors
    return vectors[np.sort(rng.choice(len(vectors), size=limit, replace=False))]


def _relabellings(n: int, m: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random labellings of ``n + m`` pooled rows, ``m`` of them current: a (rows, count) 0/1 matrix."""
    labels = np.zeros((count, n + m), dtype=np.float32)
    chosen = rng.permuted(np.tile(np.arange(n + m), (count, 1)), axis=1)[:, :m]
    np.put_along_axis(labels, chosen, 1.0, axis=1)
    return np.ascontiguousarray(labels.T)


def _p_value(observed: float, null: np.ndarray) -> float:
    """The permutation p-value; a null value within rounding of the observed one counts as reaching it."""
    reached = int(np.count_nonzero(null >= observed - 1e-9 * max(1.0, abs(observed))))
    return (1 + reached) / (1 + len(null))


# -- domain classifier -------------------------------------------------------------------------


def _folds(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced folds drawn without the labels (so a relabelling keeps the same folds)."""
    return rng.permutation(np.arange(rows) % FOLDS)


def _standardised(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    x = np.vstack([reference, current]).astype(np.float64)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)  # label-free: the same for every relabelling


def _ridge_alpha(rows: int) -> float:
    return PENALTY * rows * (FOLDS - 1) / FOLDS


def _out_of_fold(x: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold scores of ridge regressions (with intercept) of each labelling column on ``x``:
    one factorisation per fold serves every column (of the features' Gram matrix, or of the rows'
    when a fold trains on fewer rows than there are features, as scikit-learn's solver does)."""
    rows, dim = x.shape
    scores = np.empty(labels.shape, dtype=np.float64)
    alpha = _ridge_alpha(rows)
    primal = rows - rows // FOLDS >= dim
    if primal:  # the folds' Gram matrices from the whole one, less each test fold's
        gram, sums, xy, label_sums = x.T @ x, x.sum(axis=0), x.T @ labels, labels.sum(axis=0)
    for k in range(FOLDS):
        test = folds == k
        xs, ys = x[test], labels[test]
        n_train = rows - len(xs)
        if primal:
            mean = (sums - xs.sum(axis=0)) / n_train
            train_label_sums = label_sums - ys.sum(axis=0)
            centred_gram = gram - xs.T @ xs - n_train * np.outer(mean, mean)
            centred_xy = xy - xs.T @ ys - np.outer(mean, train_label_sums)
            label_mean = train_label_sums / n_train
            weights = linalg.cho_solve(linalg.cho_factor(centred_gram + alpha * np.eye(dim)), centred_xy)
        else:
            train_x, train_y = x[~test], labels[~test]
            mean, label_mean = train_x.mean(axis=0), train_y.mean(axis=0)
            centred_x = train_x - mean
            kernel = centred_x @ centred_x.T + alpha * np.eye(n_train)
            weights = centred_x.T @ linalg.cho_solve(linalg.cho_factor(kernel), train_y - label_mean)
        scores[test] = (xs - mean) @ weights + label_mean
    return scores


def _gaps(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Mean prediction of the rows labelled 1 less that of the rows labelled 0, per column."""
    ones = labels.sum(axis=0)
    on_ones = (predictions * labels).sum(axis=0)
    return on_ones / ones - (predictions.sum(axis=0) - on_ones) / (len(labels) - ones)


def _domain_classifier(
    reference: np.ndarray, current: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    x = _standardised(reference, current)
    y = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    folds = _folds(len(x), rng)
    predicted = cross_val_predict(Ridge(alpha=_ridge_alpha(len(x))), x, y, cv=PredefinedSplit(folds))
    score = float(roc_auc_score(y, predicted))
    gap = float(predicted[y == 1].mean() - predicted[y == 0].mean())
    labels = _relabellings(len(reference), len(current), count, rng).astype(np.float64)
    return score, gap, _gaps(labels, _out_of_fold(x, labels, folds))


# -- mean cosine -------------------------------------------------------------------------------


def _cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - dot / np.maximum(norms, 1e-300)


def _mean_cosine(
    reference: np.ndarray, current: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    observed = float(cosine(reference.mean(axis=0, dtype=np.float64), current.mean(axis=0, dtype=np.float64)))
    x = np.vstack([reference, current]).astype(np.float32)
    n, m = len(reference), len(current)
    current_sums = (_relabellings(n, m, count, rng).T @ x).astype(np.float64)  # count x dim
    reference_sums = x.sum(axis=0, dtype=np.float64)[None, :] - current_sums
    return observed, observed, _cosine_distances(reference_sums / n, current_sums / m)


# -- share of drifted components ---------------------------------------------------------------


def _ks_by_positions(ranks: np.ndarray, side: np.ndarray, other: int) -> np.ndarray:
    """Two-sample KS statistics of each component for each labelling, without ties: ``ranks`` (dim
    x rows) are the pooled rows' 1-based ranks per component, ``side`` (count x s) the rows of the
    smaller window in each labelling, ``other`` the larger window's size; a (count, dim) array.

    Between two of the smaller window's values the ECDF gap F_other - F_side only grows, so its
    extremes are just before the i-th smallest of them (at rank p_i: (p_i - i)/other - (i-1)/s)
    and just after it ((p_i - i)/other - i/s)."""
    s = side.shape[1]
    i = np.arange(1, s + 1, dtype=np.float64)
    result = np.empty((len(side), ranks.shape[0]))
    for start in range(0, len(side), 8):
        positions = np.sort(ranks[:, side[start : start + 8]].transpose(1, 0, 2), axis=-1)  # chunk x dim x s
        before = (positions - i) / other
        result[start : start + 8] = np.maximum((before - (i - 1) / s).max(axis=-1), (i / s - before).max(axis=-1))
    return result


def _ks_by_cumsum(order: np.ndarray, run_end: np.ndarray, labels: np.ndarray, n: int, m: int) -> np.ndarray:
    """The same with ties: the ECDF gap at the end of each run of tied values, along the pooled
    sort ``order`` (dim x rows) of each component; ``labels``: count x rows, 1 for current."""
    seen = np.arange(1, order.shape[1] + 1) / n
    result = np.empty((len(labels), order.shape[0]))
    for start in range(0, len(labels), 8):
        counts = np.cumsum(labels[start : start + 8][:, order], axis=-1, dtype=np.int32)  # chunk x dim x rows
        result[start : start + 8] = (np.abs(seen - counts * (1.0 / n + 1.0 / m)) * run_end).max(axis=-1)
    return result


def _critical(
    candidates: list[tuple[float, np.ndarray, np.ndarray]],
) -> float:
    """The smallest KS statistic whose p-value is below `KS_ALPHA` (``inf`` if none), by bisection
    over realised statistics: ``(statistic, reference column, current column)`` sorted by statistic;
    each p-value is scipy's for that realisation (for given sizes it depends on the statistic alone)."""
    low, high = 0, len(candidates)  # the answer's index lies in [low, high]; high: none
    while low < high:
        middle = (low + high) // 2
        _, a, b = candidates[middle]
        if stats.ks_2samp(a, b, method="auto").pvalue < KS_ALPHA:
            high = middle
        else:
            low = middle + 1
    return candidates[low][0] if low < len(candidates) else float("inf")


def _share_drifted(
    reference: np.ndarray, current: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    n, m = len(reference), len(current)
    pooled = np.vstack([reference, current])
    order = np.ascontiguousarray(np.argsort(pooled, axis=0, kind="stable").T)  # dim x rows
    values = np.take_along_axis(pooled.T, order, axis=1)
    truth = np.r_[np.zeros(n, dtype=np.int8), np.ones(m, dtype=np.int8)][None, :]
    labels = np.vstack([truth, _relabellings(n, m, count, rng).T.astype(np.int8)])  # count + 1 x rows; row 0: true
    ranks = np.empty(order.shape, dtype=np.int32)
    np.put_along_axis(ranks, order, np.arange(1, len(pooled) + 1, dtype=np.int32)[None, :], axis=1)
    smaller = 1 if m <= n else 0  # the side whose rows are gathered: fewer of them
    side = np.argsort(labels != smaller, axis=1, kind="stable")[:, : min(n, m)]
    statistics = _ks_by_positions(ranks, side, max(n, m))
    tied = (values[:, 1:] == values[:, :-1]).any(axis=1)  # float32 values do tie now and then
    if tied.any():
        run_end = np.ones((int(tied.sum()), len(pooled)))
        run_end[:, :-1] = values[tied, 1:] != values[tied, :-1]
        statistics[:, tied] = _ks_by_cumsum(order[tied], run_end, labels, n, m)
    # candidates for the critical statistic: each distinct realised value, with one realisation
    _, first = np.unique(np.round(statistics, 12), return_index=True)
    candidates = []
    for flat in first:
        b, j = divmod(int(flat), pooled.shape[1])
        is_current = labels[b].astype(bool)
        candidates.append((float(statistics[b, j]), pooled[~is_current, j], pooled[is_current, j]))
    candidates.sort(key=lambda c: c[0])
    shares = (statistics >= _critical(candidates) - 1e-12).mean(axis=1)
    return float(shares[0]), float(shares[0]), shares[1:]


# -- MMD ---------------------------------------------------------------------------------------


def _mmd(
    reference: np.ndarray, current: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    x = np.vstack([reference, current]).astype(np.float64)
    squared = euclidean_distances(x, squared=True)
    bandwidth = float(np.median(squared[np.triu_indices(len(x), k=1)])) or 1.0
    kernel = rbf_kernel(x, gamma=1.0 / bandwidth)
    n, m = len(reference), len(current)
    labels = np.c_[np.r_[np.zeros(n), np.ones(m)], _relabellings(n, m, count, rng)]  # column 0: observed
    reference_side = 1.0 - labels
    row_sums = kernel.sum(axis=1)
    kernel_ref = kernel @ reference_side
    within_ref = (reference_side * kernel_ref).sum(axis=0)  # a'Ka
    across = row_sums @ reference_side - within_ref  # a'Kc
    within_cur = row_sums.sum() - 2 * (row_sums @ reference_side) + within_ref  # c'Kc
    diagonal = 1.0  # the Gaussian kernel of a row with itself
    values = (
        (within_ref - n * diagonal) / (n * (n - 1))
        + (within_cur - m * diagonal) / (m * (m - 1))
        - 2.0 * across / (n * m)
    )
    return float(values[0]), float(values[0]), values[1:]


def _sides(
    method: str, reference: np.ndarray, current: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Both windows subsampled to the method's bound."""
    limit = MAX_ROWS[method]
    return _subsample(reference, limit, rng), _subsample(current, limit, rng)


#: Each method: (score, statistic, the statistic on each relabelling).
_TESTS: dict[str, Callable[[np.ndarray, np.ndarray, int, np.random.Generator], tuple[float, float, np.ndarray]]] = {
    "domain_classifier": _domain_classifier,
    "mean_cosine": _mean_cosine,
    "share_drifted": _share_drifted,
    "mmd": _mmd,
}


@cache
def _threadpools() -> ThreadpoolController:
    """The loaded BLAS libraries, found once (a lookup scans every loaded library: ~10 ms a test)."""
    return ThreadpoolController()


def drift_test(
    method: str, reference: np.ndarray, current: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0
) -> DriftTest:
    """``method``'s score and statistic of ``current`` against ``reference`` (rows: unit vectors)
    and the statistic's permutation p-value, each side subsampled to ``MAX_ROWS[method]``; deterministic for ``seed``.

    Both windows need at least 2 rows (a caller gives no verdict under `MIN_ROWS`)."""
    if min(len(reference), len(current)) < 2:
        raise ValueError(f"each window needs at least 2 rows, got {len(reference)} and {len(current)}")
    rng = np.random.default_rng(seed)
    reference, current = _sides(method, reference, current, rng)
    with _threadpools().limit(limits=1, user_api="blas"):
        score, statistic, null = _TESTS[method](reference, current, permutations, rng)
    p_value = _p_value(statistic, null)
    return DriftTest(method, score, statistic, p_value, permutations, len(reference), len(current))


def drift_score(method: str, reference: np.ndarray, current: np.ndarray, seed: int = 0) -> float:
    """``method``'s score alone (no null), as `drift_test` computes it."""
    rng = np.random.default_rng(seed)
    reference, current = _sides(method, reference, current, rng)
    with _threadpools().limit(limits=1, user_api="blas"):
        return _TESTS[method](reference, current, 0, rng)[0]
