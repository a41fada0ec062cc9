"""Pipelining: each batch's task chain submitted while the batches before it finish.

While one batch's tasks finish (their last requests, then ~0.1 s of Prefect bookkeeping), the
next is already reading its images and sending requests, so the server never idles between
batches. The engine's concurrency limit still bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from typing import TypeVar

from prefect.context import SyncClientContext
from prefect.futures import PrefectFuture

__all__ = ["finished", "pipelined"]

T = TypeVar("T")
F = TypeVar("F")


def pipelined(batches: Iterable[T], submit: Callable[[T], F], window: int = 2) -> Iterator[tuple[T, F]]:
    """Submit work for up to ``window`` batches ahead, yielding ``(batch, future)`` in order."""
    pending: deque[tuple[T, F]] = deque()
    for batch in batches:
        pending.append((batch, submit(batch)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


async def finished(
    batches: Iterable[T], submit: Callable[[T], PrefectFuture[T]], window: int = 2
) -> AsyncGenerator[T, None]:
    """Each batch as its submitted tasks return it, in order, ``window`` batches in flight.

    One sync API client serves every task of the run: a task run in a worker thread otherwise
    opens its own (~20 ms of CPU each, mostly its TLS context: the warm run's largest cost). The
    tasks are submitted from a context that holds it (Prefect's sync flows do the same), entered
    and left inside that context, wherever this generator is closed.
    """
    shared = contextvars.copy_context()
    client = shared.run(_enter_sync_client)
    try:
        for _, future in pipelined(batches, lambda batch: shared.run(submit, batch), window):
            # The steps run in the task runner's threads meanwhile; the loop stays free for the
            # run's own requests (the progress artifact) while this waits.
            await asyncio.to_thread(future.wait)
            yield future.result()
    finally:
        shared.run(client.__exit__, None, None, None)


def _enter_sync_client() -> SyncClientContext:
    """The current sync client context entered (a new one when there is none)."""
    context = SyncClientContext.get() or SyncClientContext()
    return context.__enter__()
