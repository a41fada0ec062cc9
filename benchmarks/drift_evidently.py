"""The Evidently side of the drift power benchmark; runs in Evidently's own virtualenv
(benchmarks/drift_evidently.sh), never in the project's.

Reads lines from stdin, each the path of an ``.npz`` holding ``reference`` (trials x rows x dim) and
``current`` (trials x rows x dim); answers each with a JSON line: per trial, the ROC AUC of Evidently
0.7's default embedding drift method (``model()``: an `SGDClassifier` on half the rows, ROC AUC on
the other half), its verdict (AUC > 0.55; with a reference of ≥ 1,000 rows, as here, this is the
method `EmbeddingsDriftMetric` chooses) and the verdict of ``model(bootstrap=True)`` (AUC above the
95th percentile of 100 seeded random classifiers' AUC on the same test half).

The bootstrap threshold depends on the two sizes alone (the split is seeded, the random classifiers
too), so it is computed once per size pair with Evidently's own `calc_roc_auc_random`, and checked
against ``model(bootstrap=True)`` itself on the first trial of every chunk (same AUC, same verdict).
"""

from __future__ import annotations

import json
import sys
from functools import cache

import numpy as np
import pandas as pd
from evidently.legacy.metrics.data_drift.embedding_drift_methods import calc_roc_auc_random, model
from sklearn.model_selection import train_test_split


@cache
def bootstrap_threshold(n_reference: int, n_current: int) -> float:
    """``model(bootstrap=True)``'s threshold: its split of the labels, its 100 random classifiers."""
    target = pd.Series([1] * n_reference + [0] * n_current)
    _, _, _, y_test = train_test_split(target.to_frame(), target, test_size=0.5, random_state=42, shuffle=True)
    return float(np.percentile([calc_roc_auc_random(y_test, i) for i in range(100)], 95))


def trial(reference: np.ndarray, current: np.ndarray, check: bool) -> dict[str, float | bool]:
    frames = lambda: (pd.DataFrame(current), pd.DataFrame(reference))  # noqa: E731 - the method mutates its frames
    auc, default_drift, _ = model(bootstrap=len(reference) < 1000)(*frames())
    threshold = bootstrap_threshold(len(reference), len(current))
    if check:
        bootstrap_auc, bootstrap_drift, _ = model(bootstrap=True)(*frames())
        assert bootstrap_auc == auc and bool(bootstrap_drift) == (auc > threshold), (auc, bootstrap_auc, threshold)
    return {"auc": float(auc), "default": bool(default_drift), "bootstrap": bool(auc > threshold)}


def main() -> int:
    for line in sys.stdin:
        with np.load(line.strip()) as chunk:
            references, currents = chunk["reference"], chunk["current"]
        results = [trial(references[t], currents[t], check=t == 0) for t in range(len(currents))]
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
