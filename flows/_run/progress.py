"""A run's progress artifact, advanced by the images of each finished batch."""

from __future__ import annotations

import time
from uuid import UUID

from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

__all__ = ["Progress"]


class Progress:
    """A progress artifact on the flow run, advanced by the images of each finished batch.

    Updates go to the API at most once per ``interval`` seconds (and always at the end): a
    cached rerun finishes a batch in milliseconds, and an API call per batch would dominate it.
    """

    def __init__(self, total: int, description: str, interval: float = 1.0) -> None:
        self.total = max(1, total)
        self.description = description
        self.done = 0
        self.interval = interval
        self._sent_at = time.monotonic()
        self._percent = 0.0
        self._id: UUID | None = None

    async def start(self) -> None:
        """Create the artifact, at 0%."""
        self._id = await acreate_progress_artifact(0.0, description=self.description)

    async def advance(self, count: int) -> None:
        """``count`` more images done."""
        self.done += count
        now = time.monotonic()
        if self._id is not None and (self.done >= self.total or now - self._sent_at >= self.interval):
            await self._send(min(100.0, 100.0 * self.done / self.total))

    async def end(self) -> None:
        """Every image done: 100% (a video's frames were estimated from its header)."""
        if self._id is not None and self._percent < 100.0:
            await self._send(100.0)

    async def _send(self, percent: float) -> None:
        assert self._id is not None
        await aupdate_progress_artifact(self._id, percent)
        self._sent_at, self._percent = time.monotonic(), percent
