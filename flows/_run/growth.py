"""Batch growth: a run's records cut into batches that grow over a cached rerun.

Batches hold ``batch_size`` images, except on a cached rerun: after a batch that sent the server
nothing (every result came from the cache), the next batches take `BATCH_GROWTH` times as many,
up to `MAX_BATCH_GROWTH` × ``batch_size`` images and `GROWN_BATCH_BYTES` of files; the first
batch that sends anything brings them back to ``batch_size``. A task run costs Prefect ~20 ms in
the flow's process and ~70 ms on its server whatever its size, and a cached image ~0.1 ms, so a
rerun over 2,400 cached images is 4 task runs instead of 19. A batch grows only over images whose
size is known without reading them (local files, video frames), so the bytes a batch holds stay
bounded; remote images keep ``batch_size``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

from prefect_roboflow.blocks.exceptions import InvalidInputError

from .._storage.access import local_size
from ..records import Batch, ImageRecord

__all__ = ["BATCH_GROWTH", "GROWN_BATCH_BYTES", "MAX_BATCH_GROWTH", "BatchSizes"]

#: A cached rerun's batches grow by this factor after each batch that sent nothing,
BATCH_GROWTH = 4
#: up to this many times ``batch_size`` images,
MAX_BATCH_GROWTH = 16
#: and this many bytes of files (a batch's files are in memory while its task runs).
GROWN_BATCH_BYTES = 64 * 2**20


class BatchSizes:
    """How big a run's next batch is, and its records cut accordingly.

    Raises:
        InvalidInputError: naming ``batch_size``, when it is below 1.
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise InvalidInputError("batch_size", f"must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.size = batch_size  # the next batch's: grows over cached batches (`after`)

    def after(self, sent: bool) -> None:
        """A batch finished: the next ones grow when it sent nothing, and are ``batch_size`` when it sent anything."""
        self.size = self.batch_size if sent else min(self.size * BATCH_GROWTH, self.batch_size * MAX_BATCH_GROWTH)

    def cut(self, records: Iterable[ImageRecord], expected: int) -> Iterator[Batch]:
        """``records`` in batches labelled ``"i/n"``, each as big as `size` says when it is cut
        (``n`` estimated from ``expected`` records and the current size)."""
        records = iter(records)
        held: list[ImageRecord] = []  # a record that did not fit the last batch
        taken = 0
        for index in itertools.count():
            size, batch, held = self.size, held, []
            grows = size > self.batch_size  # only then are the files' sizes looked at
            used = sum(_known_size(r) or 0 for r in batch) if grows else 0
            for record in records:
                known = _known_size(record) if grows else None
                if len(batch) >= self.batch_size and (
                    known is None or len(batch) >= size or used + known > GROWN_BATCH_BYTES
                ):
                    held = [record]
                    break
                used += known or 0
                batch.append(record)
            if not batch:
                return
            taken += len(batch)
            left = math.ceil(max(0, expected - taken) / self.size) if held else 0
            yield Batch(batch, f"{index + 1}/{index + 1 + left}")
            if not held:
                return


def _known_size(record: ImageRecord) -> int | None:
    """A record's bytes without reading them: a video frame's, or a local file's size; None for a remote image."""
    return len(record.data) if record.data is not None else local_size(record.ref)
