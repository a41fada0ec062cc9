"""FiftyOne Brain's own uniqueness and representativeness code, run on embeddings (in the side venv `up` makes).

    <venv python> oracle.py embeddings.npy scores.npz

FiftyOne Brain's scores are pure functions of the embeddings: ``_compute_uniqueness``
(fiftyone/brain/internal/core/uniqueness.py) and ``_cluster_ranker`` (.../representativeness.py).
Their modules import ``fiftyone`` (and through it a MongoDB client and server), which does not run
here, so this script takes the two functions' source from the installed fiftyone-brain package and
runs it as it is, with numpy, scikit-learn and scipy. The one stand-in is the similarity index that
``_compute_uniqueness`` asks for its neighbours: FiftyOne's default (the ``sklearn`` backend, metric
``cosine``) answers with exact cosine distances, self included, as scikit-learn's brute-force
``NearestNeighbors(metric="cosine")`` does here.

Writes ``uniqueness``, ``representativeness`` (FiftyOne's output as it is: the distance to the
cluster centre divided by the cluster's largest) and ``cluster`` (its k-means labels).
"""

import ast
import copy
import logging
import sys
import sysconfig
from pathlib import Path

import numpy as np
import sklearn.cluster as skc
from scipy.spatial import cKDTree
from sklearn.neighbors import NearestNeighbors

CORE = Path(sysconfig.get_paths()["purelib"]) / "fiftyone" / "brain" / "internal" / "core"


def _functions(path: Path, names: set[str], namespace: dict) -> dict:
    """Run the definitions of ``names`` from ``path`` in ``namespace``."""
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = names - {node.name for node in body}
    if missing:
        raise SystemExit(f"{path} no longer defines {sorted(missing)}")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


class SklearnNeighbours:
    """What ``_compute_uniqueness`` reads of FiftyOne's sklearn similarity index (metric cosine)."""

    class config:  # the attribute FiftyOne reads
        method = "sklearn"

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = embeddings

    def _kneighbors(self, k: int, return_dists: bool):
        found = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(self.embeddings)
        dists, inds = found.kneighbors(self.embeddings, n_neighbors=k)
        return list(inds), list(dists)


def main() -> None:
    embeddings = np.load(sys.argv[1])
    base = {"np": np, "skc": skc, "cKDTree": cKDTree, "copy": copy, "logger": logging.getLogger("oracle")}
    uniqueness = _functions(CORE / "uniqueness.py", {"_compute_uniqueness"}, dict(base))["_compute_uniqueness"]
    ranker = _functions(CORE / "representativeness.py", {"_cluster_ranker"}, dict(base))["_cluster_ranker"]
    unique = np.asarray(uniqueness(embeddings, SklearnNeighbours(embeddings)), dtype=np.float64)
    representative, clusterer = ranker(embeddings)
    np.savez(sys.argv[2], uniqueness=unique, representativeness=representative, cluster=clusterer.labels_)


if __name__ == "__main__":
    main()
