"""The drift methods on planted embeddings: the same distribution does not drift (false positives
at most 1 of 20 seeds, i.e. ≤ 5%), a shifted one does (at least 19 of 20, ≥ 95%).

Planted windows: unit vectors around a mean direction (noise of the mean's size, as in a cluster of
photos of one scene, pairwise cosine ≈ 0.5). The shifted window's mean direction is at 60° from the
reference's (cosine 0.5): far past every default threshold (mean cosine distance ≈ 0.5 vs 0.2,
AUC ≈ 1 vs 0.55, share ≈ 0.9 vs 0.2, MMD ≈ 0.3 vs 0.015) while the same-distribution scores sit far
under them, so the verdicts do not hinge on a seed. The seeds are fixed: the test is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from prefect_roboflow.flows._drift.methods import METHODS, THRESHOLDS, drift_score, roc_auc

DIM = 512
SEEDS = range(20)
#: Rows per window and method (the classifier and the MMD kernel cost the most).
ROWS = {"domain_classifier": 600, "mean_cosine": 1000, "share_drifted": 1000, "mmd": 400}


def _directions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10_000 + seed)
    a = rng.standard_normal(DIM)
    a /= np.linalg.norm(a)
    r = rng.standard_normal(DIM)
    r -= (r @ a) * a
    r /= np.linalg.norm(r)
    return a.astype(np.float32), (0.5 * a + np.sqrt(0.75) * r).astype(np.float32)


def _window(rng: np.random.Generator, direction: np.ndarray, rows: int) -> np.ndarray:
    noise = rng.standard_normal((rows, DIM)).astype(np.float32) / np.float32(np.sqrt(DIM))
    vectors = direction[None, :] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("method", METHODS)
def test_same_distribution_does_not_drift_and_a_shift_does(method: str) -> None:
    false_positives = detected = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        same, shifted = _directions(seed)
        reference = _window(rng, same, ROWS[method])
        false_positives += drift_score(method, reference, _window(rng, same, ROWS[method]), seed) > THRESHOLDS[method]
        detected += drift_score(method, reference, _window(rng, shifted, ROWS[method]), seed) > THRESHOLDS[method]
    assert false_positives <= 1, f"{method}: {false_positives} of 20 same-distribution windows drifted"
    assert detected >= 19, f"{method}: only {detected} of 20 shifted windows drifted"


def test_scores_are_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    same, shifted = _directions(0)
    reference, current = _window(rng, same, 300), _window(rng, shifted, 300)
    for method in METHODS:
        assert drift_score(method, reference, current, seed=3) == drift_score(method, reference, current, seed=3)


def test_roc_auc_counts_ties_half() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0
