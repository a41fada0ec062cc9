"""The drift methods against the libraries they stand on, on planted embeddings.

Parity: each method's null is computed in one batch over all relabellings, apart from the observed
statistic (which scikit-learn / scipy compute); fed the true labelling, the batch must give what the
library gives: scikit-learn's `Ridge` + `cross_val_predict` + `roc_auc_score`, `scipy.spatial.distance.cosine`,
`scipy.stats.ks_2samp` (exact p-values for small windows), and the unbiased MMD² written out pair by
pair. Then a planted drift is found, the same windows give the same verdict for a seed, and a
window needs 2 rows. (The false-alarm rate is tests/unit/test_drift_calibration.py's.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cosine
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import PredefinedSplit, cross_val_predict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.drift_data import make_space, sample
from prefect_roboflow.flows._drift import methods
from prefect_roboflow.flows._drift.methods import METHODS, drift_test


def _windows(n: int, m: int, seed: int = 0, **drift: float) -> tuple[np.ndarray, np.ndarray]:
    space = make_space(seed)
    rng = np.random.default_rng(seed)
    return sample(space, rng, n), sample(space, rng, m, **drift)


def _true_labels(n: int, m: int) -> np.ndarray:
    return np.r_[np.zeros(n), np.ones(m)][:, None]


@pytest.mark.parametrize(("n", "m"), [(300, 40), (60, 30)])  # the primal and the dual ridge solve
def test_classifier_batch_matches_scikit_learn(n: int, m: int) -> None:
    reference, current = _windows(n, m, shift=0.05)
    x = methods._standardised(reference, current)
    y = _true_labels(n, m)
    folds = methods._folds(len(x), np.random.default_rng(1))
    ridge = Ridge(alpha=methods._ridge_alpha(len(x)))
    expected = cross_val_predict(ridge, x, y[:, 0], cv=PredefinedSplit(folds))
    batch = methods._out_of_fold(x, y, folds)
    np.testing.assert_allclose(batch[:, 0], expected, rtol=1e-7, atol=1e-9)
    gap = expected[n:].mean() - expected[:n].mean()  # the statistic: mean prediction, current less reference
    assert methods._gaps(y, batch)[0] == pytest.approx(gap, rel=1e-6, abs=1e-9)
    score, statistic, _ = methods._domain_classifier(reference, current, 0, np.random.default_rng(1))
    assert score == roc_auc_score(y[:, 0], expected) and statistic == pytest.approx(gap, rel=1e-9, abs=1e-12)


def test_mean_cosine_batch_matches_scipy() -> None:
    reference, current = _windows(200, 50, shift=0.05)
    observed, statistic, _ = methods._mean_cosine(reference, current, 0, np.random.default_rng(0))
    assert statistic == observed
    assert observed == cosine(reference.mean(axis=0, dtype=np.float64), current.mean(axis=0, dtype=np.float64))
    # the batch on the true labelling: current rows are the last m
    x = np.vstack([reference, current]).astype(np.float32)
    sums = _true_labels(200, 50).T.astype(np.float32) @ x
    batch = methods._cosine_distances((x.sum(axis=0) - sums) / 200, sums / 50)
    assert batch[0] == pytest.approx(observed, rel=1e-5)


@pytest.mark.parametrize("ties", [False, True])
def test_ks_statistics_batch_matches_scipy(ties: bool) -> None:
    reference, current = _windows(120, 30, shift=0.05)
    if ties:  # rounded values tie often: the cumulative-sum path takes those components
        reference, current = np.round(reference, 2), np.round(current, 2)
    expected = stats.ks_2samp(reference, current, axis=0, method="auto")
    pooled = np.vstack([reference, current])
    order = np.ascontiguousarray(np.argsort(pooled, axis=0, kind="stable").T)
    labels = _true_labels(120, 30).T.astype(np.int8)
    values = np.take_along_axis(pooled.T, order, axis=1)
    run_end = np.ones(values.shape)
    run_end[:, :-1] = values[:, 1:] != values[:, :-1]
    np.testing.assert_allclose(methods._ks_by_cumsum(order, run_end, labels, 120, 30)[0], expected.statistic)
    if not ties:
        ranks = np.empty(order.shape, dtype=np.int32)
        np.put_along_axis(ranks, order, np.arange(1, 151, dtype=np.int32)[None, :], axis=1)
        side = np.arange(120, 150)[None, :]
        np.testing.assert_allclose(methods._ks_by_positions(ranks, side, 120)[0], expected.statistic)


def test_share_drifted_uses_exact_ks_p_values() -> None:
    """At 5 rows a side the exact KS p-value of a complete separation's neighbour (D = 0.8) is
    0.079, where the asymptotic formula gave 0.036: with exact p-values no component drifts."""
    a = np.linspace(0.0, 1.0, 5)[:, None]
    b = np.r_[0.5, np.linspace(1.1, 2.0, 4)][:, None]
    exact = stats.ks_2samp(a, b, axis=0, method="auto")
    assert exact.statistic[0] == pytest.approx(0.8) and exact.pvalue[0] == pytest.approx(0.0794, abs=1e-4)
    observed, _, _ = methods._share_drifted(a, b, 0, np.random.default_rng(0))
    assert observed == 0.0


@pytest.mark.parametrize(
    ("n", "m", "shift", "decimals"),
    [(150, 40, 0.04, None), (100, 20, 0.0, None), (30, 30, 0.06, None), (1000, 200, 0.01, None), (120, 30, 0.05, 2)],
)
def test_share_drifted_counts_what_scipy_counts(n: int, m: int, shift: float, decimals: int | None) -> None:
    """The share on the true labelling (from the batch's statistics and the critical one) is the
    share of components to which scipy's ``ks_2samp`` gives p < 0.05 — small and large windows,
    drift and none, and rounded values (ties); the critical statistic is the smallest with p < 0.05."""
    reference, current = _windows(n, m, shift=shift)
    if decimals is not None:
        reference, current = np.round(reference, decimals), np.round(current, decimals)
    observed, _, _ = methods._share_drifted(reference, current, 0, np.random.default_rng(0))
    test = stats.ks_2samp(reference, current, axis=0, method="auto")
    assert observed == np.mean(test.pvalue < 0.05)
    candidates = sorted(
        ((float(test.statistic[j]), reference[:, j], current[:, j]) for j in range(reference.shape[1])),
        key=lambda c: c[0],
    )
    critical = methods._critical(candidates)
    assert np.all((test.pvalue < 0.05) == (test.statistic >= critical - 1e-12))
    if shift >= 0.04:
        assert observed > 0


def test_mmd_matches_the_pairwise_formula() -> None:
    reference, current = _windows(40, 25, shift=0.1)
    observed, _, _ = methods._mmd(reference, current, 0, np.random.default_rng(0))
    x = np.vstack([reference, current]).astype(np.float64)
    squared = [((x[i] - x[j]) ** 2).sum() for i in range(len(x)) for j in range(i + 1, len(x))]
    bandwidth = float(np.median(squared))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-((a - b) ** 2).sum() / bandwidth))

    n, m = len(reference), len(current)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(x[n + i], x[n + j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], x[n + j]) for i in range(n) for j in range(m)) / (n * m)
    assert observed == pytest.approx(xx + yy - 2 * xy, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_planted_drift_is_found_and_a_seed_repeats_the_verdict(method: str) -> None:
    reference, current = _windows(400, 200, seed=3, new_cluster=0.5)
    first = drift_test(method, reference, current, seed=5)
    assert first.p_value == 1 / 200 and (first.n_reference, first.n_current) == (400, 200)
    assert drift_test(method, reference, current, seed=5) == first


def test_a_window_needs_two_rows() -> None:
    reference, current = _windows(50, 1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        drift_test("mean_cosine", reference, current)
