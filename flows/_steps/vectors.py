"""Embedding vectors scaled to unit length: the one `normalise` of the steps, the searches and the index."""

from __future__ import annotations

import numpy as np

from prefect_roboflow.blocks.exceptions import InvalidInputError

__all__ = ["normalise"]


def normalise(vectors: np.ndarray, field: str | None = None) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32.

    Without ``field`` a zero row stays zero (a failed embedding scores 0 against everything). With
    ``field`` (vectors given by a user or read from storage), a non-finite or zero row is refused.

    Raises:
        InvalidInputError: naming ``field``, for a NaN/inf value or a zero row.

    Examples:
        ```python
        normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))  # [[0.6, 0.8], [0.0, 0.0]]
        normalise(np.array([[0.0, 0.0]]), "vectors")  # InvalidInputError: vectors: row 0 is a zero vector
        ```
    """
    array = np.asarray(vectors)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    if field is not None:
        if not np.isfinite(array).all():
            raise InvalidInputError(field, "vectors must be finite (no NaN or inf)")
        if (norms == 0).any():
            raise InvalidInputError(field, f"row {int(np.flatnonzero(norms == 0)[0])} is a zero vector")
    return np.ascontiguousarray(array / np.where(norms == 0, 1.0, norms), dtype=np.float32)
