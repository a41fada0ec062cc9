"""The vector index's machinery: its on-disk layout, its rows, search and add. `flows/vector_index.py`
is its public face."""
