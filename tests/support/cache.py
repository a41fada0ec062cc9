"""What a flow's local content cache holds, read the way the cache stores it."""

from __future__ import annotations

from pathlib import Path

from prefect_roboflow.flows._storage.entries import ENTRIES_FILE, LocalEntries

__all__ = ["cached_entries"]


def cached_entries(folder: Path) -> int:
    """How many entries the local cache in ``folder`` holds (its SQLite file; 0 when there is none)."""
    return LocalEntries(folder).count() if (folder / ENTRIES_FILE).exists() else 0
