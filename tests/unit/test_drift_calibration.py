"""The false-alarm rate of every drift method, measured: windows drawn from the reference's own
distribution (anisotropic, clustered 512-d unit vectors, benchmarks/drift_data.py) must be
reported drifted on at most α = 5% of trials, at the smallest window that gets a verdict
(`MIN_ROWS` rows against a 100-row reference: small windows are where fixed thresholds failed —
the old classifier threshold, AUC > 0.55, alarmed on 35% of 20-row windows).

300 seeded trials, each a fresh reference and window; the bound is 27 alarms (9%). If a method's
true rate were 5%, more than 27 alarms would come with probability 0.13%; if it were 15%, at most
27 with probability 0.14% (binomial tails): the test tells 5% from 15%, and it is deterministic.
The default pair (``domain_classifier`` and ``mean_cosine`` at α/2 each) is held to the same bound.

Each trial's tests run through `drift_test` itself — the statistic from the library (scikit-learn,
scipy), the null from the method's batch over relabellings: what is checked is that the two agree
(an observed statistic computed differently from its null would show here as too many or too few
alarms). They use 39 relabellings instead of the default 199: a permutation p-value
(1 + #null ≥ observed) / (1 + B) is valid for any B, and with 39 the levels are exact — p ≤ 0.05
when at most one relabelling reaches the observed statistic, p ≤ 0.025 when none does. A trial
then costs ~45 ms of CPU (half of it scikit-learn's cross-validation of the observed labelling):
~14 CPU-seconds in all, under a minute at load 17 on 2 cores (benchmarks/drift_power.py measures
the default 199 relabellings at 50 to 1,000 rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.drift_data import make_space, sample
from prefect_roboflow.flows._drift.methods import ALPHA, DEFAULT_METHODS, METHODS, MIN_ROWS, drift_test

TRIALS = 300
BOUND = 27
PERMUTATIONS = 39
REFERENCE_ROWS = 100


def test_the_bound_tells_5_from_15_percent() -> None:
    assert binom.sf(BOUND, TRIALS, 0.05) < 0.002 and binom.cdf(BOUND, TRIALS, 0.15) < 0.002


def test_the_levels_are_reachable_with_these_permutations() -> None:
    smallest = 1 / (1 + PERMUTATIONS)
    assert smallest <= ALPHA / len(DEFAULT_METHODS) and 2 * smallest <= ALPHA


@pytest.fixture(scope="module")
def p_values() -> dict[str, np.ndarray]:
    """Each method's p-value on each trial's same-distribution windows."""
    space = make_space(11)
    found: dict[str, list[float]] = {m: [] for m in METHODS}
    with threadpool_limits(limits=1, user_api="blas"):  # two BLAS threads on a busy machine spin
        for trial in range(TRIALS):
            rng = np.random.default_rng(trial)
            reference, current = sample(space, rng, REFERENCE_ROWS), sample(space, rng, MIN_ROWS)
            for method in METHODS:
                test = drift_test(method, reference, current, permutations=PERMUTATIONS, seed=trial)
                found[method].append(test.p_value)
    return {m: np.array(v) for m, v in found.items()}


@pytest.mark.parametrize("method", METHODS)
def test_false_alarms_at_most_alpha(p_values: dict[str, np.ndarray], method: str) -> None:
    alarms = int((p_values[method] <= ALPHA).sum())
    assert alarms <= BOUND, f"{method}: {alarms} of {TRIALS} same-distribution windows reported drifted"
    # and the p-values are not stuck at 1 (a test that never alarms proves nothing): about uniform
    assert 0.3 < float(np.median(p_values[method])) < 0.7


def test_the_default_pair_at_alpha_over_two(p_values: dict[str, np.ndarray]) -> None:
    each = ALPHA / len(DEFAULT_METHODS)
    alarms = int(np.any([p_values[m] <= each for m in DEFAULT_METHODS], axis=0).sum())
    assert alarms <= BOUND
