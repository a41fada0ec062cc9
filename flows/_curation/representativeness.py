"""Representativeness: how central a row is in its cluster (k-means with 20 clusters).

FiftyOne Brain's ``compute_representativeness`` (method ``"cluster-center"``) clusters the
embeddings with scikit-learn's ``KMeans(n_clusters=20, random_state=1234)``, takes each sample's
Euclidean distance to its cluster's centre and divides it by the largest distance in that cluster.
Its documentation promises a score "proportional to proximity to cluster centers"; its code (0.25
to 0.27) returns that normalised *distance*, so its most representative samples are the farthest
from their centres. Here the score is the documented one, ``1 - distance / largest distance in
the cluster``: 1 at the centre, 0 at the cluster's edge.

The centres are fitted on up to `KMEANS_ROWS` rows spread over the sketch's sample (every row up to
20,000 rows: then the clusters are FiftyOne's own) with the full vectors, and every row's distance
is exact, measured as the index streams by (`Clusters.observe`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLUSTERS", "Clusters"]

#: k-means clusters, as FiftyOne Brain.
CLUSTERS = 20
#: FiftyOne Brain's k-means seed.
KMEANS_SEED = 1234
#: Rows the k-means is fitted on at most (the sample's first; below it, FiftyOne's own clusters).
KMEANS_ROWS = 20_000


class Clusters:
    """k-means centres fitted on a sample; each streamed row's cluster and distance to its centre."""

    def __init__(self, sample: np.ndarray, rows: int) -> None:
        from sklearn.cluster import KMeans

        fit_on = sample[:: max(1, -(-len(sample) // KMEANS_ROWS))]  # evenly over the sample
        clusters = min(CLUSTERS, len(fit_on))
        fitted = KMeans(n_clusters=clusters, random_state=KMEANS_SEED).fit(fit_on)
        self.centres = np.asarray(fitted.cluster_centers_, dtype=np.float32)
        self.cluster = np.zeros(rows, dtype=np.int16)
        self.distance = np.zeros(rows, dtype=np.float32)

    def observe(self, start: int, vectors: np.ndarray) -> None:
        """Assign a block of rows (``start`` onwards) to their nearest centre."""
        squared = (
            np.einsum("nd,nd->n", vectors, vectors)[:, None]
            - 2.0 * vectors @ self.centres.T
            + np.einsum("cd,cd->c", self.centres, self.centres)[None, :]
        )
        nearest = squared.argmin(axis=1)
        stop = start + len(vectors)
        self.cluster[start:stop] = nearest
        self.distance[start:stop] = np.sqrt(np.maximum(squared[np.arange(len(vectors)), nearest], 0.0))

    def representativeness(self) -> np.ndarray:
        """``1 - distance / largest distance in the row's cluster`` (a one-point cluster scores 1)."""
        largest = np.zeros(len(self.centres), dtype=np.float32)
        np.maximum.at(largest, self.cluster.astype(np.int64), self.distance)
        scale = largest[self.cluster.astype(np.int64)]
        return np.where(scale > 0, 1.0 - self.distance / np.where(scale > 0, scale, 1.0), 1.0).astype(np.float32)
