"""The Evidently side of the drift power benchmark; runs in Evidently's own virtualenv
(benchmarks/drift_evidently.sh), never in the project's.

Reads lines from stdin, each the path of an ``.npz`` with ``current`` (trials x rows x dim), a
``reference`` pool (rows x dim) and ``reference_index`` (trials x rows: each trial's reference
rows in the pool); answers each with a JSON
line: per trial, Evidently 0.7's embedding drift verdict by its default method (``model()``: a
`SGDClassifier` on half the rows, ROC AUC on the other half; ``bootstrap`` when the reference has
fewer than 1,000 rows, as `EmbeddingsDriftMetric` chooses) and by the same method with
``bootstrap=True`` (its random-classifier 95th percentile in place of the 0.55 threshold).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
from evidently.legacy.metrics.data_drift.embedding_drift_methods import model


def verdicts(reference: np.ndarray, current: np.ndarray) -> dict[str, bool]:
    frames = lambda: (pd.DataFrame(current), pd.DataFrame(reference))  # noqa: E731 - the method mutates its frames
    default = model(bootstrap=len(reference) < 1000)
    _, default_drift, _ = default(*frames())
    _, bootstrap_drift, _ = model(bootstrap=True)(*frames())
    return {"evidently_default": bool(default_drift), "evidently_bootstrap": bool(bootstrap_drift)}


def main() -> int:
    for line in sys.stdin:
        with np.load(line.strip()) as cell:
            pool, index, current = cell["reference"], cell["reference_index"], cell["current"]
        results = [verdicts(pool[index[t]], current[t]) for t in range(len(current))]
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
