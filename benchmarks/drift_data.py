"""Planted embeddings for the drift tests and benchmarks: anisotropic, clustered 512-d unit vectors
like a camera's CLIP embeddings, with drifts of known size.

A *space* is a few cluster centres around a common direction (pairwise cosine of rows ≈ 0.3–0.6)
and noise with a power-law spectrum (component variances ∝ 1/k^1.1, in a random rotation): a few
directions carry most of the variance, as in real embeddings. Windows are drawn from it; a drift
is a mean shift (every row moved by ``shift`` along a fixed unit direction before normalising) or
a new cluster (a share of the window drawn around a centre the reference never saw).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM = 512


@dataclass(frozen=True)
class Space:
    """A planted embedding distribution: cluster centres, their weights, the noise's rotation and scales."""

    centres: np.ndarray
    weights: np.ndarray
    rotation: np.ndarray
    scales: np.ndarray
    shift_direction: np.ndarray
    new_centre: np.ndarray


def make_space(seed: int, dim: int = DIM, clusters: int = 6) -> Space:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    common /= np.linalg.norm(common)

    def centre() -> np.ndarray:
        offset = rng.standard_normal(dim)
        offset /= np.linalg.norm(offset)
        return common + 0.8 * offset

    centres = np.stack([centre() for _ in range(clusters)])
    weights = rng.dirichlet(np.full(clusters, 2.0))
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = (1.0 + np.arange(dim)) ** -0.55  # variances ∝ 1/k^1.1
    scales *= 0.7 / np.sqrt((scales**2).sum())  # noise norm ≈ 0.7
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    return Space(centres, weights, rotation, scales, direction, centre())


def sample(
    space: Space, rng: np.random.Generator, rows: int, *, shift: float = 0.0, new_cluster: float = 0.0
) -> np.ndarray:
    """``rows`` unit vectors (float32) from ``space``; ``shift``: every row moved by that much along
    the space's shift direction; ``new_cluster``: that share of the rows (rounded) around the new centre."""
    fresh = round(new_cluster * rows)
    which = rng.choice(len(space.centres), size=rows - fresh, p=space.weights)
    centres = np.vstack([space.centres[which], np.repeat(space.new_centre[None, :], fresh, axis=0)])
    noise = (rng.standard_normal((rows, len(space.scales))) * space.scales) @ space.rotation.T
    vectors = centres + noise + shift * space.shift_direction
    vectors = vectors[rng.permutation(rows)]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
